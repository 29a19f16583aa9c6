"""``onebit export SOURCE --out FILE [--format packed|onnx] [--weights REF]``: a trained run (a run directory,
a folder written by ``onebit push`` or ``hf://ORG/NAME``) as the engine's file or ONNX."""

from __future__ import annotations

import argparse
import os

from rich.console import Console


def register(commands) -> None:
    p = commands.add_parser(
        "export", help="pack a trained run (or a pushed model) into a bit-packed engine or ONNX file"
    )
    p.add_argument(
        "run_dir",
        metavar="SOURCE",
        help="run directory written by `onebit train --out`, folder written by `onebit push`, or hf://ORG/NAME",
    )
    p.add_argument(
        "--out", required=True, metavar="FILE", help="file to write (e.g. model.onebit.safetensors, model.onnx)"
    )
    p.add_argument(
        "--format",
        choices=["packed", "onnx"],
        default=None,
        help="packed engine file or ONNX (standard ops, for onnxruntime); default: from --out's suffix",
    )
    p.add_argument("--weights", default=None, metavar="REF", help=WEIGHTS_HELP)
    p.set_defaults(run=run)


WEIGHTS_HELP = (
    "the source's model with these weights instead: a run directory, a folder written by `onebit push`, "
    "a .safetensors state_dict or hf://ORG/NAME[@REVISION]"
)


def load_model(source: str, weights: str | None = None):
    """``(model, config, weights_path)``: the model (eval mode) of a run directory, a pushed folder or
    ``hf://ORG/NAME``, its ``config.json`` and its weights file; with ``weights``, the source's model
    holding those weights (checked by :func:`onebit.models.pretrained.build`)."""
    from onebit.models.pretrained import build
    from onebit.models.weights import fetch_weights, is_hub_ref, is_pushed_folder
    from onebit.train import load_run, read_run_config

    pushed = is_hub_ref(source) or (os.path.isdir(source) and is_pushed_folder(source))
    if weights is None:
        if pushed:
            found = fetch_weights(source)
            return build(found).eval(), found.config, found.path
        model, meta = load_run(source)
        return model, meta, os.path.join(source, "model.safetensors")
    meta = fetch_weights(source).config if pushed else read_run_config(source)
    run = meta["config"]
    found = fetch_weights(weights)
    model = build(found, run["model"], meta["num_classes"], meta["in_channels"], **run.get("model_kwargs", {}))
    return model.eval(), meta, found.path


def engine_module():
    """``onebit.engine`` with ``pack``/``load``, or a one-line error when this build has none."""
    import importlib

    from onebit.cli import UsageError

    try:
        engine = importlib.import_module("onebit.engine")
    except ImportError as error:
        raise UsageError(f"the packed engine (onebit.engine) is not available in this installation ({error})") from None
    if not all(hasattr(engine, name) for name in ("pack", "load")):
        raise UsageError("the packed engine (onebit.engine) is not available in this installation")
    return engine


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    from onebit.cli import UsageError

    engine = engine_module()
    if not args.out:
        raise UsageError("--out is empty: name the file to write, e.g. model.onebit.safetensors or model.onnx")
    if os.path.isdir(args.out):
        raise UsageError(
            f"--out {args.out} is a directory: name the engine file to write, "
            f"e.g. {os.path.join(args.out, 'model.onebit.safetensors')}"
        )
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out}: {parent} is a file, not a directory")
    model, meta, weights_path = load_model(args.run_dir, args.weights)
    shape = (1, meta["in_channels"], *meta["image_size"])
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed = engine.pack(model, example)
    fmt = args.format or ("onnx" if str(args.out).lower().endswith(".onnx") else "packed")
    if fmt == "onnx":
        from onebit.engine.to_onnx import export_onnx, load_onnx
    try:
        if fmt == "onnx":
            export_onnx(packed, example, args.out)
        else:
            packed.save(args.out)
    except OSError as error:  # e.g. a directory no file can be made in (/proc), or no permission
        raise UsageError(f"--out {args.out}: cannot write the file ({error.strerror or error})") from None
    exported = load_onnx(args.out) if fmt == "onnx" else packed
    with torch.no_grad():
        reference = model(example)
        gap = (torch.as_tensor(exported(example)) - reference).abs()
        gap[torch.isnan(gap) & torch.isnan(reference)] = 0.0  # NaN where the model gives NaN
        diff = gap.max().item()
    # float rounding of the float layers (binary layers are exact), relative to the output's scale
    rounding = 1e-4 * max(1.0, reference.abs().max().item())
    size = os.path.getsize(args.out)
    float_size = os.path.getsize(weights_path)
    source = args.run_dir + (f" with weights {args.weights}" if args.weights else "")
    console.print(
        f"exported {meta['config']['model']} from {source} to {args.out} ({fmt}): {size / 1024:.1f} KiB "
        f"({float_size / max(size, 1):.1f}x smaller than model.safetensors), max |{fmt} - model| = {diff:.2e}",
        highlight=False,
    )
    if not diff <= rounding:
        # a warning, not a failure: the file is written and may be right. A float value within
        # rounding of 0 before a sign can take the other sign in onnxruntime, and the flipped +-1
        # changes the output by far more than rounding (rare, but more likely the more float
        # values a model signs); anything else is a wrong file.
        Console(stderr=True, soft_wrap=True).print(
            f"[yellow]onebit export: warning:[/] {args.out} gives outputs {diff:.2e} away from the model's on the "
            f"check input, more than float rounding ({rounding:.1e}): either a sign of a value within rounding of 0 "
            f"flipped, or the file computes something else; compare `onebit eval` of {source} and of {args.out}",
            highlight=False,
        )
    return 0
