"""``onebit doctor``: why a binary network does not learn, on a zoo model or a saved run."""

from __future__ import annotations

import argparse
import os

from rich.console import Console
from onebit.cli import integer


def register(commands) -> None:
    p = commands.add_parser("doctor", help="find the layer where learning dies (zoo model or saved run)")
    p.add_argument("target", help="zoo model name (see `onebit models`) or a run directory written by `onebit train`")
    p.add_argument("--data", default=None, help="dataset for the batch (default: the run's dataset, or digits)")
    p.add_argument("--batch-size", type=integer(1, 1 << 16), default=64, help="examples in the diagnostic batch (default 64)")
    p.add_argument("--seed", type=integer(0, 2**32 - 1), default=0)
    p.set_defaults(run=run)


def load_target(target: str, data: str | None):
    """(model, data bundle, description) for a zoo name or a run directory."""
    from onebit import data as datasets
    from onebit import models

    looks_like_path = os.path.sep in target or target.startswith(".") or os.path.exists(target)
    if looks_like_path:
        from onebit.train import load_run

        if not os.path.isdir(target):
            raise FileNotFoundError(f"{target!r} is neither a zoo model nor a run directory")
        model, meta = load_run(target)
        bundle = datasets.load(data or meta["config"].get("data", "digits"))
        return model, bundle, f"run {target} ({meta['config']['model']})"
    if target not in models.names():
        raise ValueError(f"unknown model {target!r}; known models: {', '.join(models.names())} (or give a run directory)")
    bundle = datasets.load(data or "digits")
    model = models.create(target, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    return model, bundle, f"{target} (randomly initialized)"


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    from onebit.doctor import doctor

    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2, got {args.batch_size}")
    torch.manual_seed(args.seed)
    model, bundle, what = load_target(args.target, args.data)
    images, labels = bundle.train.tensors
    g = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(labels), generator=g)[: args.batch_size]
    try:
        report = doctor(model, images[index], labels[index])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what} does not run on {bundle.name} images {list(images.shape[1:])}: {first}") from None
    console.print(f"{what} on {bundle.name}", highlight=False, markup=False)
    console.print(report)
    return 0 if report.ok else 1
