"""onebit's ordered float convs against torch's conv, side by side, each checked bit-identical first.

A packed model runs a float conv as one of onebit's ordered convs where torch sums the input's shape in
the same order (``engine.sum_order``): a 1x1 conv on a small NCHW map that torch's reference GEMM sums in
channel order (``kernels.OrderedConv1x1``; a BinaryDenseNet-28 transition, 544 -> 192 channels on a 2x2
map), and a network's stem that torch sums as fused multiply-add chains in (kh, kw, c) order
(``kernels.TapOrderedConv``; 3 -> 64 channels, 7x7/2 at 224 px), where it is the faster. First the convs
alone, per ISA: torch's conv (NCHW and channels_last input) against onebit's; then whole packed models
with their ordered convs and with torch's convs in their place, on NCHW inputs: Bi-Real-18 (224 px) and
BinaryDenseNet-28/37/45 (28 px). Interleaved rounds, thread CPU time at one thread (wall time at more),
each at its best round; ratios ``torch / onebit`` (> 1: onebit's is faster).

Usage::

    python benchmarks/bench_ordered_conv.py [--threads 1] [--rounds 10] [--isa avx512 avx2]

Run it with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ... --isa avx2`` for torch's AVX2 kernels.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from onebit import _C, engine, models
from onebit.engine.graph.floats import _conv2d
from onebit.engine.kernels import OrderedConv1x1, TapOrderedConv
from timing import best_ms  # benchmarks/timing.py


def convs_alone(isas: list[str], rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 544, 2, 2, generator=g)
    w1 = torch.randn(192, 544, 1, 1, generator=g) * 0.05
    xs = torch.randn(1, 3, 224, 224, generator=g)
    ws = torch.randn(64, 3, 7, 7, generator=g) * 0.1
    cases = {
        "1x1 544->192 @2x2 (BinaryDenseNet transition)": (
            x1,
            lambda x: F.conv2d(x, w1),
            OrderedConv1x1(w1),
        ),
        "stem 3->64 7x7/2 @224": (xs, lambda x: F.conv2d(x, ws, None, 2, 3), TapOrderedConv(ws, (2, 2), (3, 3))),
    }
    print(f"# the convs alone, {torch.get_num_threads()} thread(s), best of {rounds} rounds (ms)")
    print(f"{'conv':>46} {'isa':>7} {'torch nchw':>11} {'torch cl':>9} {'onebit':>8} {'torch best / onebit':>20}")
    for name, (x, theirs, ours) in cases.items():
        xc = x.contiguous(memory_format=torch.channels_last)
        same_cl = torch.equal(theirs(x), theirs(xc))
        for isa in isas:
            _C.set_isa(isa)
            assert torch.equal(ours(x), theirs(x)), f"{name}: onebit's sums differ from torch's ({isa})"
            calls = {
                "nchw": partial(theirs, x),
                "cl": partial(theirs, xc),
                "onebit": partial(ours, x),
            }
            t = best_ms(calls, rounds, inner=5, settle=1)
            # torch's channels_last conv stands in for the NCHW one only where it gives the same bits
            theirs_best = min(t["nchw"], t["cl"]) if same_cl else t["nchw"]
            print(
                f"{name:>46} {isa:>7} {t['nchw']:>11.3f} {t['cl']:>9.3f} {t['onebit']:>8.3f} "
                f"{theirs_best / t['onebit']:>19.2f}x"
            )


def without_ordered_convs(packed) -> None:
    """``packed``'s float convs as torch's own, in place."""
    for step in packed._steps:
        if step.op == "conv2d":
            step.run = partial(_conv2d, step.tensors, step.attrs)


def models_whole(isas: list[str], rounds: int) -> None:
    cases = [("birealnet18", 224, 3, 1000)] + [(f"binary_densenet{d}", 28, 3, 10) for d in (28, 37, 45)]
    print(f"\n# packed models on NCHW inputs, {torch.get_num_threads()} thread(s), best of {rounds} rounds (ms)")
    print(f"{'model':>20} {'isa':>7} {'torch convs':>12} {'ordered convs':>14} {'ratio':>7}")
    for name, size, channels, classes in cases:
        torch.manual_seed(0)
        model = models.create(name, num_classes=classes, in_channels=channels).eval()
        x = torch.randn(1, channels, size, size)
        for isa in isas:
            _C.set_isa(isa)
            ordered, plain = engine.pack(model, x), engine.pack(model, x)
            without_ordered_convs(plain)
            with torch.no_grad():
                want = model(x)
                assert torch.equal(ordered(x), want) and torch.equal(plain(x), want), f"{name}: bits differ"
                t = best_ms({"plain": partial(plain, x), "ordered": partial(ordered, x)}, rounds, inner=5, settle=1)
            print(f"{name:>20} {isa:>7} {t['plain']:>12.3f} {t['ordered']:>14.3f} {t['plain'] / t['ordered']:>6.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--isa", nargs="+", default=None, help="onebit's ISAs (default: every one this CPU runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    isas = args.isa or [i for i in _C.supported_isas() if i in ("avx512", "avx2", "neon", "neon_dotprod")]
    before = _C.isa()
    try:
        with torch.no_grad():
            convs_alone(isas, args.rounds)
            models_whole(isas, args.rounds)
    finally:
        _C.set_isa(before)


if __name__ == "__main__":
    main()
