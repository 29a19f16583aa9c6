"""End to end: a packed binary model vs its float twin, side by side (interleaved runs, medians).

Usage: ``python benchmarks/bench_end_to_end.py [--models birealnet18:resnet18@224 lenet_binary:lenet@8]
[--batch 1] [--threads 1 2] [--reps 15] [--json out.json]`` (the same as ``onebit bench --what e2e``).
The logic lives in :mod:`onebit.engine.bench` so that the installed ``onebit bench`` can run it.
"""

from __future__ import annotations

import sys

from onebit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--what", "e2e", *sys.argv[1:]]))
