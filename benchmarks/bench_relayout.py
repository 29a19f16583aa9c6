"""float32 NCHW <-> channels_last copies: torch's ``x.contiguous(memory_format=...)`` against
onebit's native ``onebit.engine.ops.relayout``, with a plain ``clone()`` (the same bytes copied in
order) as the floor.

Every shape, direction and thread count times its candidates interleaved (``timing.interleaved_medians``:
medians over repetitions, each a mean of back-to-back calls), hot in cache as a serving loop sees a
model's activations. The table prints milliseconds and the ratio torch / onebit (above 1: onebit is
faster) and clone / onebit (1 would be a copy at memory speed).

Usage: ``python benchmarks/bench_relayout.py [--shapes 1x64x112x112 1x256x14x14] [--threads 1 2]
[--isa avx512 avx2 scalar] [--reps 15] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import platform

import torch

from onebit import _C
from onebit.engine import ops
from onebit.heap import keep_freed_memory
from onebit.io import save_json
from timing import interleaved_medians  # benchmarks/timing.py

#: the stem's activation of a ResNet-18 at 224 px, then one block's of each stage, and a batch of 8
DEFAULT_SHAPES = ["1x64x112x112", "1x64x56x56", "1x128x28x28", "1x256x14x14", "1x512x7x7", "8x256x14x14"]
DIRECTIONS = {"to channels_last": torch.channels_last, "to NCHW": torch.contiguous_format}


def _parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in text.lower().split("x"))
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW, got {text!r}")
    return shape


def measure_shape(shape, fmt, threads: int, isas: list[str], reps: int) -> dict[str, float]:
    """Median ms per call of torch's copy, clone and onebit's relayout on each ISA, for ``shape`` into ``fmt``."""
    source_format = torch.contiguous_format if fmt == torch.channels_last else torch.channels_last
    x = torch.randn(shape).contiguous(memory_format=source_format)
    candidates = {
        "torch": (None, lambda: x.contiguous(memory_format=fmt)),
        "clone": (None, lambda: x.clone()),
    }
    for isa in isas:
        candidates[f"onebit {isa}"] = (isa, lambda: ops.relayout(x, fmt))
    torch.set_num_threads(threads)
    return {name: seconds * 1e3 for name, seconds in interleaved_medians(candidates, reps).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=[_parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--isa", nargs="+", default=[_C.isa()], help="onebit ISAs to time (default: the active one)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    keep_freed_memory()  # a freed activation's memory is reused, not returned to the OS between calls
    active = _C.isa()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, onebit ISAs {args.isa}")
    header = f"{'shape':>16} {'direction':>17} {'thr':>3} {'torch ms':>9} {'clone ms':>9}"
    header += "".join(f" {isa + ' ms':>11} {'torch/ob':>8} {'clone/ob':>8}" for isa in args.isa)
    print(header)
    rows = []
    try:
        for shape in args.shapes:
            for direction, fmt in DIRECTIONS.items():
                for threads in args.threads:
                    ms = measure_shape(shape, fmt, threads, args.isa, args.reps)
                    line = f"{'x'.join(map(str, shape)):>16} {direction:>17} {threads:>3} "
                    line += f"{ms['torch']:9.4f} {ms['clone']:9.4f}"
                    for isa in args.isa:
                        ours = ms[f"onebit {isa}"]
                        line += f" {ours:11.4f} {ms['torch'] / ours:8.2f} {ms['clone'] / ours:8.2f}"
                    print(line, flush=True)
                    rows.append({"shape": list(shape), "direction": direction, "threads": threads, "ms": ms})
    finally:
        _C.set_isa(active)
    if args.json:
        save_json(args.json, {"machine": platform.processor() or platform.machine(), "rows": rows})


if __name__ == "__main__":
    main()
