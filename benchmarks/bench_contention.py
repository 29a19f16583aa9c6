"""onebit's conv beside another multi-threaded process on the same cores.

Starts a competing process itself (a python child running torch's fp32 ``conv2d`` in a loop
on ``--rival-threads`` OpenMP threads), and times onebit's binary conv (packed input, float
output, weights prepared once as the engine's layers keep them) and torch's own conv at 1
and 2 threads: first on the quiet machine, then beside the rival. Prints the times and the
ratios 2-thread / 1-thread time (below 1: the second thread helps; above 1: it hurts),
quiet and contended. A conv whose parallel region waits at a barrier for a thread that the
OS has descheduled pays a scheduler time slice (milliseconds) per call.

Usage: ``python benchmarks/bench_contention.py [--shape 256x14] [--batch 1] [--isa avx512]
[--reps 15] [--rival-threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

RIVAL = """
import sys, torch, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
x, w = torch.randn(1, 128, 28, 28), torch.randn(128, 128, 3, 3)
print("ready", flush=True)
while True:
    F.conv2d(x, w, padding=1)
"""


def _sample(fn, seconds: float = 20e-3) -> float:
    """Mean time of back-to-back calls over about `seconds`."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / calls


def measure(candidates: dict, reps: int) -> dict:
    """Interleaved medians (seconds) of {(name, threads): fn}."""
    samples = {key: [] for key in candidates}
    for _ in range(reps):
        for (name, threads), fn in candidates.items():
            torch.set_num_threads(threads)
            fn()
            samples[(name, threads)].append(_sample(fn))
    return {key: statistics.median(v) for key, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="256x14", help="CxS: C->C channels, SxS image")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--isa", default=None, help="onebit's ISA (default: the best)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--rival-threads", type=int, default=2)
    args = parser.parse_args(argv)

    from onebit import _C
    from onebit.engine import kernels as K

    if args.isa:
        _C.set_isa(args.isa)
    c, size = (int(v) for v in args.shape.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(args.batch, c, size, size, generator=gen), torch.randn(c, c, 3, 3, generator=gen)
    xp, wp = K.pack_activations(x, 1, 0.0), K.pack_weights(w)
    scale, bias, cache = torch.rand(c) + 0.5, torch.randn(c), K.WeightCache()
    cl_x, cl_w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)

    def onebit_conv():
        K.binary_conv2d(
            xp, wp, scale=scale, bias=bias, in_channels=c, out_channels=c, kernel_size=3, padding=1, cache=cache
        )

    candidates = {}
    for t in (1, 2):
        candidates[("onebit", t)] = onebit_conv
        candidates[("torch", t)] = lambda: F.conv2d(cl_x, cl_w, padding=1)

    quiet = measure(candidates, args.reps)
    rival = subprocess.Popen([sys.executable, "-c", RIVAL, str(args.rival_threads)], stdout=subprocess.PIPE, text=True)
    try:
        rival.stdout.readline()  # "ready"
        time.sleep(0.5)
        contended = measure(candidates, args.reps)
    finally:
        rival.terminate()
        rival.wait()

    print(
        f"# {args.batch}x{c}x{size}x{size} 3x3 conv, onebit {_C.isa()} (tile {_C.tile(_C.isa())}), torch "
        f"{torch.__version__}, {os.cpu_count()} cpus; rival: torch conv2d loop on {args.rival_threads} threads; "
        f"medians of {args.reps} interleaved reps, ms"
    )
    print(f"{'':>10} {'1 thread':>9} {'2 threads':>9} {'2T / 1T':>8}   {'1 thread':>9} {'2 threads':>9} {'2T / 1T':>8}")
    print(f"{'':>10} {'quiet':>28}   {'beside the rival':>28}")
    for name in ("onebit", "torch"):
        q1, q2, c1, c2 = quiet[(name, 1)], quiet[(name, 2)], contended[(name, 1)], contended[(name, 2)]
        print(
            f"{name:>10} {q1 * 1e3:9.3f} {q2 * 1e3:9.3f} {q2 / q1:7.2f}x   {c1 * 1e3:9.3f} {c2 * 1e3:9.3f} "
            f"{c2 / c1:7.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
