"""``onebit export RUN_DIR --out FILE [--format packed|onnx]``: a trained run as the engine's file or ONNX."""

from __future__ import annotations

import argparse
import os

from rich.console import Console


def register(commands) -> None:
    p = commands.add_parser("export", help="pack a trained run into a bit-packed engine file")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `onebit train --out`")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (e.g. model.onebit.safetensors, model.onnx)")
    p.add_argument("--format", choices=["packed", "onnx"], default=None,
                   help="packed engine file or ONNX (standard ops, for onnxruntime); default: from --out's suffix")
    p.set_defaults(run=run)


def engine_module():
    """``onebit.engine`` with ``pack``/``load``, or a one-line error when this build has none."""
    from onebit.cli import UsageError

    import importlib

    try:
        engine = importlib.import_module("onebit.engine")
    except ImportError as error:
        raise UsageError(f"the packed engine (onebit.engine) is not available in this installation ({error})") from None
    if not all(hasattr(engine, name) for name in ("pack", "load")):
        raise UsageError("the packed engine (onebit.engine) is not available in this installation")
    return engine


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    from onebit.train import load_run

    from onebit.cli import UsageError

    engine = engine_module()
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory: name the engine file to write, e.g. {os.path.join(args.out, 'model.onebit.safetensors')}")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out}: {parent} is a file, not a directory")
    model, meta = load_run(args.run_dir)
    shape = (1, meta["in_channels"], *meta["image_size"])
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed = engine.pack(model, example)
    fmt = args.format or ("onnx" if str(args.out).lower().endswith(".onnx") else "packed")
    if fmt == "onnx":
        from onebit.engine.to_onnx import export_onnx, load_onnx

        export_onnx(packed, example, args.out)
        exported = load_onnx(args.out)
    else:
        packed.save(args.out)
        exported = packed
    with torch.no_grad():
        diff = (torch.as_tensor(exported(example)) - model(example)).abs().max().item()
    size = os.path.getsize(args.out)
    float_size = os.path.getsize(os.path.join(args.run_dir, "model.safetensors"))
    console.print(
        f"exported {meta['config']['model']} from {args.run_dir} to {args.out} ({fmt}): {size / 1024:.1f} KiB "
        f"({float_size / max(size, 1):.1f}x smaller than model.safetensors), max |{fmt} - model| = {diff:.2e}",
        highlight=False,
    )
    return 0
