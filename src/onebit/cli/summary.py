"""``onebit summary``: parameters, memory and MACs of a zoo model, per layer."""

from __future__ import annotations

import argparse

from rich.console import Console

from onebit.cli import integer


def register(commands) -> None:
    p = commands.add_parser("summary", help="per-layer parameters, bits, memory and binary/float MACs of a zoo model")
    p.add_argument("model", help="zoo model name (see `onebit models`)")
    p.add_argument(
        "--shape",
        default=None,
        help="input shape CxHxW (default: 1x8x8, the digits, for LeNets; 3x224x224 otherwise)",
    )
    p.add_argument("--num-classes", type=integer(1, 1 << 20), default=10)
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument of the model builder, as for `onebit train` (e.g. float_layers=int8); repeatable",
    )
    p.set_defaults(run=run)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` -> ``(3, 32, 32)``; a one-line error for anything else."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--shape must look like 3x32x32, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"--shape must be positive integers like 3x32x32, got {text!r}")
    return shape


def default_shape(model_name: str) -> tuple[int, ...]:
    return (1, 8, 8) if model_name.startswith("lenet") else (3, 224, 224)


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    from onebit import models
    from onebit.cli.train import parse_model_args
    from onebit.summary import summary

    shape = parse_shape(args.shape) if args.shape else default_shape(args.model)
    model = models.create(
        args.model, num_classes=args.num_classes, in_channels=shape[0], **parse_model_args(args.model_arg)
    )
    try:
        result = summary(model, torch.zeros(1, *shape), name=args.model)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{args.model} does not run on input 1x{'x'.join(map(str, shape))}: {first}") from None
    console.print(str(result), highlight=False, markup=False, end="")
    return 0
