"""Binary 3x3 convolution (onebit native kernels) against torch's fp32 conv2d, side by side.

Every configuration (shape, batch) runs its candidates at every thread count in one process,
interleaved: each repetition times every candidate once (a sample = the mean of a few
back-to-back calls, ~2 ms, after a 2 ms pause so that the previous candidate's
threads stop spinning, and one untimed warm-up call), and the table shows medians over the
repetitions. Each candidate is taken at its best: the faster of its interleaved median and its
own warm loop (back-to-back calls, best of 3 rounds; how a serving loop sees it, and how the
yardstick in ../shared/yardstick times its kernels). Interleaved, a call right after torch's conv
shares the cores with torch's still-spinning OpenMP threads, and one after a pause wakes its own.

Candidates:

- torch fp32 ``conv2d`` in NCHW and in channels_last (the table's baseline is the faster);
- per instruction set: ``pack`` (float NCHW input -> packed, padded bits), ``conv``
  (packed input -> float output, scale and bias applied; the layer's weights prepared once
  and kept in a ``WeightCache``, as the engine's layers do), ``pack+conv`` (float input -> float
  output, the input packed inside the same native call, as the engine runs it: i.e. a
  binary layer fed by a float layer: the headline ratio), and ``conv->bits`` (the
  thresholded variant that writes the next binary layer's packed input).

``--torch-isa avx2`` also times torch restricted to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2`` in a
child process): a stand-in for machines without AVX-512, to compare the AVX2 path with.

Usage: ``python benchmarks/bench_conv.py [--shapes 256x14 64x56 512x7] [--batch 1 8]
[--threads 1 2] [--isa avx512 avx2] [--reps 15] [--torch-isa avx2] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from onebit.heap import keep_freed_memory
from onebit.io import save_json
from timing import calibrate, sample  # benchmarks/timing.py

DEFAULT_SHAPES = ["256x14", "64x56", "512x7"]


def _parse_shape(text: str) -> tuple[int, int]:
    channels, size = text.lower().split("x")
    return int(channels), int(size)


def measure(candidates: dict, reps: int, threads: dict | None = None) -> dict:
    """Interleaved medians (seconds) of {name: fn}; ``threads[name]``: torch threads for that candidate.

    Every repetition times every candidate once, so a slow spell of the machine (a shared
    host) hits all of them alike, including the same layer at different thread counts.
    """
    threads = threads or {}

    def use(name):
        t = threads.get(name)
        if t is not None and t != torch.get_num_threads():
            torch.set_num_threads(t)
            candidates[name]()  # the first region with a new thread count (re)starts threads: untimed

    inner = {}
    for name, fn in candidates.items():
        use(name)
        inner[name] = calibrate(fn)
    samples = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            use(name)
            time.sleep(2e-3)  # the previous candidate's spinning threads go idle first
            fn()  # untimed: wakes this candidate's threads and warms its caches, as a loop of calls would
            samples[name].append(sample(fn, inner[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def warm_loop(fn, threads: int, calls: int = 200, rounds: int = 3) -> float:
    """Seconds per call of ``fn`` in its own warm loop (back-to-back calls, nothing between):
    the best of a few rounds. torch's conv at its best, as a user's serving loop sees it."""
    torch.set_num_threads(threads)
    for _ in range(10):
        fn()
    return min(sample(fn, calls) for _ in range(rounds))


def torch_candidates(x, w):
    cl_x, cl_w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    return {
        "torch NCHW": lambda: F.conv2d(x, w, padding=1),
        "torch channels_last": lambda: F.conv2d(cl_x, cl_w, padding=1),
    }


def binary_candidates(x, w, isa: str):
    from onebit import _C
    from onebit.engine import kernels as K

    c = x.shape[1]
    wp = K.pack_weights(w)
    scale, bias = torch.rand(c) + 0.5, torch.randn(c)
    thr = torch.zeros(c, dtype=torch.int32)
    direction = torch.ones(c, dtype=torch.int8)
    # The weights prepared once and kept, as the engine's layers keep them (a WeightCache).
    conv = dict(in_channels=c, out_channels=c, kernel_size=3, padding=1, cache=K.WeightCache())
    xp = K.pack_activations(x, 1, 0.0)

    def on(fn):
        def run():
            _C.set_isa(isa)
            return fn()

        return run

    return {
        f"{isa} pack": on(lambda: K.pack_activations(x, 1, 0.0)),
        f"{isa} conv": on(lambda: K.binary_conv2d(xp, wp, scale=scale, bias=bias, **conv)),
        f"{isa} pack+conv": on(
            lambda: K.binary_conv2d(x, wp, scale=scale, bias=bias, **conv)  # packs x inside the call
        ),
        f"{isa} conv->bits": on(
            lambda: K.binary_conv2d_threshold(xp, wp, thresholds=thr, direction=direction, out_padding=1, **conv)
        ),
    }


def torch_only(shapes, batches, threads, reps) -> dict:
    """Torch timings only (run in a child process with a restricted oneDNN ISA)."""
    out = {}
    for c, size in shapes:
        for n in batches:
            x, w = torch.randn(n, c, size, size), torch.randn(c, c, 3, 3)
            for t in threads:
                torch.set_num_threads(t)
                out[f"{c}x{size}/{n}/{t}"] = measure(torch_candidates(x, w), reps)
    return out


def _torch_restricted(isa: str, args) -> dict:
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa.upper())
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-only", "--reps", str(args.reps)]
    cmd += ["--shapes", *args.shapes, "--batch", *map(str, args.batch), "--threads", *map(str, args.threads)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _print_scaling(results, shapes, batches, threads, isas) -> None:
    """Speed-up from the fewest to the most threads, per layer and candidate."""
    if len(threads) < 2:
        return
    lo, hi = min(threads), max(threads)
    print(f"# thread scaling {lo} -> {hi} (time at {lo} / time at {hi})")
    names = ["torch NCHW", "torch channels_last"] + [f"{i} {k}" for i in isas for k in ("conv", "pack+conv")]
    print(f"{'layer':>14} {'N':>2} " + " ".join(f"{n:>19}" for n in names))
    for c, size in shapes:
        for n in batches:
            a, b = results[f"{c}x{size}/{n}/{lo}"], results[f"{c}x{size}/{n}/{hi}"]
            cells = " ".join(f"{a[k] / b[k]:>18.2f}x" for k in names)
            print(f"{f'{c}->{c} @{size}x{size}':>14} {n:>2} {cells}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="CxS: C->C channels, SxS image")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--isa", nargs="+", default=None, help="ISAs to run (default: the best and avx2)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--torch-isa", default=None, help="also time torch restricted to this oneDNN ISA (avx2)")
    parser.add_argument("--json", default=None, help="write the raw medians here")
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = [_parse_shape(s) for s in args.shapes]
    keep_freed_memory()  # as the onebit command does: neither side pays page faults on fresh outputs

    if args.torch_only:
        print(json.dumps(torch_only(shapes, args.batch, args.threads, args.reps)))
        return 0

    from onebit import _C

    supported = _C.supported_isas()
    isas = args.isa or list(dict.fromkeys([supported[0], "avx2"]))
    isas = [i for i in isas if i in supported]
    active = _C.isa()
    restricted = _torch_restricted(args.torch_isa, args) if args.torch_isa else None

    print(
        f"# onebit binary conv benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, ISAs {supported}, medians of {args.reps} interleaved reps, times in ms"
    )
    print("# ratio = torch fp32 conv2d at its faster layout / onebit time (higher is better)")
    header = (
        f"{'layer':>14} {'N':>2} {'thr':>3} {'torch':>8} {'layout':>6} {'isa':>7} "
        f"{'pack+conv':>9} {'ratio':>6} {'conv':>8} {'ratio':>6} {'pack':>8} {'conv->bits':>10}"
    )
    if restricted:
        header += f" {'torch-' + args.torch_isa:>11} {'ratio':>6}"
    print(header)
    results = {}
    try:
        for c, size in shapes:
            for n in args.batch:
                gen = torch.Generator().manual_seed(0)
                x, w = torch.randn(n, c, size, size, generator=gen), torch.randn(c, c, 3, 3, generator=gen)
                candidates, threads = {}, {}
                for t in args.threads:  # all thread counts in one interleaved measurement
                    per_t = torch_candidates(x, w)
                    for isa in isas:
                        per_t.update(binary_candidates(x, w, isa))
                    for name, fn in per_t.items():
                        candidates[(name, t)], threads[(name, t)] = fn, t
                measured = measure(candidates, args.reps, threads)
                for t in args.threads:
                    med = {name: v for (name, tt), v in measured.items() if tt == t}
                    for layout in ("NCHW", "channels_last"):  # the baseline: torch at its best
                        own = warm_loop(torch_candidates(x, w)[f"torch {layout}"], t)
                        med[f"torch {layout}"] = min(med[f"torch {layout}"], own)
                    for isa in isas:  # onebit at its best too: its own warm loop, as the yardstick times
                        for name, fn in binary_candidates(x, w, isa).items():
                            med[name] = min(med[name], warm_loop(fn, t))
                    key = f"{c}x{size}/{n}/{t}"
                    results[key] = med
                    best_layout = min(("NCHW", "channels_last"), key=lambda k: med[f"torch {k}"])
                    base = med[f"torch {best_layout}"]
                    for isa in isas:
                        both, conv = med[f"{isa} pack+conv"], med[f"{isa} conv"]
                        line = (
                            f"{f'{c}->{c} @{size}x{size}':>14} {n:>2} {t:>3} {_ms(base)} "
                            f"{'NCHW' if best_layout == 'NCHW' else 'CL':>6} {isa:>7} {_ms(both):>9} "
                            f"{base / both:5.1f}x {_ms(conv)} {base / conv:5.1f}x {_ms(med[f'{isa} pack'])} "
                            f"{_ms(med[f'{isa} conv->bits']):>10}"
                        )
                        if restricted:
                            r = min(restricted[key].values())
                            line += f" {_ms(r):>11} {r / both:5.1f}x"
                        print(line, flush=True)
        _print_scaling(results, shapes, args.batch, args.threads, isas)
    finally:
        _C.set_isa(active)
    if args.json:
        save_json(args.json, {"onebit": results, "torch_restricted": restricted})
    return 0


if __name__ == "__main__":
    sys.exit(main())
