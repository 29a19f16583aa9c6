"""``onebit eval SOURCE [--data ...] [--weights REF]``: test accuracy of a run directory, a folder written by
``onebit push``, ``hf://ORG/NAME``, a packed engine file or an ONNX file."""

from __future__ import annotations

import argparse
import os
import time

from rich.console import Console

from onebit.cli import integer, numbers
from onebit.cli.export import WEIGHTS_HELP


def register(commands) -> None:
    p = commands.add_parser(
        "eval", help="test accuracy of a run, a pushed model (folder or hf://) or a packed engine file"
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="run directory (`onebit train --out`), folder written by `onebit push`, hf://ORG/NAME, "
        "or engine / ONNX file (`onebit export`)",
    )
    p.add_argument("--data", default=None, help="dataset name or directory (default: the run's own data)")
    p.add_argument("--image-size", type=integer(1, 4096), default=None, help="resize images (default: as in the run)")
    p.add_argument("--batch-size", type=integer(1), default=256)
    p.add_argument("--topk", type=integer(1), default=5)
    p.add_argument(
        "--mean",
        type=numbers,
        default=None,
        help="normalize with this mean per channel (default: the run's, from its config.json, else the data's)",
    )
    p.add_argument("--std", type=numbers, default=None, help="normalize with this std per channel (with --mean)")
    p.add_argument(
        "--loader-workers",
        type=integer(0, 256),
        default=0,
        help="worker processes decoding the images (0: in this process)",
    )
    p.add_argument("--weights", default=None, metavar="REF", help=WEIGHTS_HELP)
    p.set_defaults(run=run)


def _run_config(directory: str) -> dict | None:

    from onebit.train import read_run_config

    path = os.path.join(directory, "config.json")
    return read_run_config(directory) if os.path.isfile(path) else None


def run(args: argparse.Namespace, console: Console) -> int:
    import torch
    import torch.nn.functional as F

    from onebit import data as datasets
    from onebit.cli import UsageError
    from onebit.cli.export import load_model
    from onebit.data.loader import IndexBatches, batches_of, make_loader
    from onebit.models.weights import is_hub_ref, is_pushed_folder

    hub = is_hub_ref(args.source)
    if args.weights is not None and not (hub or os.path.isdir(args.source)):
        raise UsageError(
            f"--weights needs a run directory, a pushed folder or hf://ORG/NAME as SOURCE, not {args.source!r}"
        )
    if hub or os.path.isdir(args.source):
        model, meta, _ = load_model(args.source, args.weights)
        what = "pushed" if hub or is_pushed_folder(args.source) else "run"
        weights = f", weights {args.weights}" if args.weights else ""
        kind = f"{meta['config']['model']} ({what} {args.source}{weights})"
    elif os.path.isfile(args.source) and str(args.source).lower().endswith(".onnx"):
        from onebit.engine.to_onnx import load_onnx

        model = load_onnx(args.source)
        meta = _run_config(os.path.dirname(os.path.abspath(args.source)))
        kind = f"onnx {args.source} (onnxruntime)"
    elif os.path.isfile(args.source):
        from onebit.cli.export import engine_module

        model = engine_module().load(args.source)
        meta = _run_config(os.path.dirname(os.path.abspath(args.source)))
        kind = f"packed {args.source}"
    else:
        raise FileNotFoundError(f"{args.source!r} is neither a run directory nor a file")
    if args.batch_size < 1 or args.topk < 1:
        raise ValueError("--batch-size and --topk must be at least 1")
    source = args.data or (meta or {}).get("config", {}).get("data")
    if source is None:
        raise ValueError(f"--data is required: no run configuration found beside {args.source}")
    image_size = args.image_size or (meta or {}).get("config", {}).get("image_size")
    stats = {"mean": meta.get("mean"), "std": meta.get("std")} if meta and meta.get("std") else {}
    if args.mean is not None or args.std is not None:
        stats = {"mean": args.mean, "std": args.std}
    bundle = datasets.load(source, image_size=image_size, **stats)  # normalized as the run was trained
    k = min(args.topk, bundle.num_classes)
    test = bundle.test
    loader = make_loader(test, IndexBatches(torch.arange(len(test)), args.batch_size), args.loader_workers)
    loss, correct, topk, start = 0.0, 0, 0, time.perf_counter()
    with torch.no_grad():
        for x, y in batches_of(loader):
            logits = _scores(model(x), args.source, len(y), bundle.num_classes)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            topk += int((logits.topk(k, dim=1).indices == y[:, None]).any(1).sum())
    n = len(test)
    seconds = time.perf_counter() - start
    console.print(
        f"{kind} on {bundle.name} test ({n} images): loss {loss / n:.4f}, top-{k} accuracy {topk / n:.4f}, "
        f"{seconds:.2f} s",
        highlight=False,
    )
    console.print(f"accuracy: {correct / n:.4f}", highlight=False)
    return 0


def _scores(output, source: str, n: int, num_classes: int):
    """The model's output as float class scores ``[n, classes]``, or a one-line error naming ``source``."""
    import torch

    if isinstance(output, (tuple, list)) or not hasattr(output, "shape"):
        raise ValueError(
            f"{source}: returns a {type(output).__name__}; onebit eval needs one tensor of class scores [N, classes]"
        )
    scores = torch.as_tensor(output).float()
    if scores.dim() != 2 or scores.shape[0] != n:
        raise ValueError(
            f"{source}: gives outputs of shape {list(scores.shape)} for {n} images; "
            "onebit eval needs class scores [N, classes]"
        )
    if scores.shape[1] < num_classes:
        raise ValueError(
            f"{source}: scores {scores.shape[1]} classes, but the data has {num_classes} "
            "(evaluate it on the data it was trained on, or give --data)"
        )
    return scores
