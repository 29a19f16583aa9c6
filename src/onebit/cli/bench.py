"""``onebit bench``: the packed engine against float PyTorch, measured side by side.

Runs the binary-conv layer benchmark (``benchmarks/bench_conv.py``, when the source tree
is present) and then the end-to-end benchmark (:mod:`onebit.engine.bench`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

from rich.console import Console

from onebit.cli import integer


def register(commands) -> None:
    p = commands.add_parser("bench", help="benchmark the packed engine against float PyTorch")
    p.add_argument("--what", choices=["all", "conv", "e2e"], default="all", help="which benchmark to run")
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="BINARY:FLOAT@IMAGE",
        help="end-to-end pairs (default: birealnet18:resnet18@224)",
    )
    p.add_argument("--batch", type=integer(1, 1 << 16), default=1, help="end-to-end batch size")
    p.add_argument("--threads", nargs="+", type=integer(1, 1024), default=[1, 2])
    p.add_argument("--reps", type=integer(1, 10**6), default=15, help="interleaved repetitions (medians are reported)")
    p.add_argument("--json", default=None, help="write the end-to-end results here")
    p.set_defaults(run=run)


def _conv_benchmark():
    """``benchmarks/bench_conv.py``'s ``main`` when running from a source tree, else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "..", "benchmarks", "bench_conv.py"))
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("onebit_bench_conv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "main", None)


def run(args: argparse.Namespace, console: Console) -> int:
    from onebit.engine.bench import DEFAULT_PAIRS, Pair, end_to_end, print_report

    if any(n < 1 for n in args.threads):
        raise ValueError("--threads must be positive")
    if args.what in ("all", "conv"):
        conv_main = _conv_benchmark()
        if conv_main is None:
            console.print("binary conv benchmark: benchmarks/bench_conv.py not found (run from the source tree)")
        else:
            status = conv_main(["--threads", *map(str, args.threads), "--reps", str(args.reps)])
            if status:
                return int(status)
    results = []
    if args.what in ("all", "e2e"):
        for text in args.models or DEFAULT_PAIRS:
            pair = Pair.parse(text)
            result = end_to_end(pair, batch=args.batch, threads=tuple(args.threads), reps=args.reps)
            print_report(result, console)
            results.append(result)
    if args.json:
        from onebit import io

        io.atomic_write_bytes(args.json, (json.dumps(results, indent=2, default=str) + "\n").encode())
    return 0
