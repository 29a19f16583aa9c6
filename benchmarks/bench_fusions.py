"""The packed engine's pool fusions against the same models packed without them, side by side.

Two fusions take a ResNet stem's max pool into the step before it: an int8 conv's pool of its integer
sums (``int8_conv2d+batch_norm+max_pool2d``, ``graph.int8.integer_max_pool``) and a float BatchNorm
applied after the max pool that reads it (``batch_norm+max_pool2d``, ``graph.floats.batchnorm_before_pool``).
Bi-Real-18 (float stem) and its int8 twin are packed twice, with the fusions and with their checks
answering "no", checked bit-identical to the model, then called in interleaved rounds on an NCHW
224-px image (thread CPU time at one thread, wall time at more), each at its best round; printed as
``without / with`` (> 1: the fusion is faster); then the stem's step alone, fused against its two steps.

Usage::

    python benchmarks/bench_fusions.py [--threads 1] [--rounds 15] [--isa avx512 avx2]
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import torch

import onebit
from onebit import _C, engine
from onebit.engine.fuse import steps as fuse_steps
from timing import best_ms  # benchmarks/timing.py


@contextlib.contextmanager
def pool_fusions_off():
    """Packing inside this block makes neither pool fusion (their checks answer no)."""
    saved = fuse_steps.integer_max_pool, fuse_steps.batchnorm_before_pool
    fuse_steps.integer_max_pool = lambda *args: None
    fuse_steps.batchnorm_before_pool = lambda *args: False
    try:
        yield
    finally:
        fuse_steps.integer_max_pool, fuse_steps.batchnorm_before_pool = saved


def stem_steps(rounds: int) -> None:
    """The stem's fused step against its two steps, on a ResNet stem's shapes (3 -> 64, 7x7/2 at 224 px,
    then max pool 3x3/2): the int8 conv with its BatchNorm and pool of the sums, against the conv then
    onebit's float pool; the float pool with the BatchNorm applied to pooled values, against torch's
    BatchNorm then the pool. Each pair checked equal first."""
    from onebit.engine import ops
    from onebit.engine.kernels import int8 as int8_kernels

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (64, 3, 7, 7), generator=g, dtype=torch.int8)
    a = {"stride": [2, 2], "padding": [3, 3], "dilation": [1, 1], "groups": 1, "divisor": 50.0}
    x = torch.randn(1, 3, 224, 224, generator=g)
    panels = int8_kernels.int8_panels(w)
    scale, shift = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    bn = (scale, shift, True)
    pool = ([3, 3, 2, 2, 1, 1, 1, 1, 0], torch.ones(64, dtype=torch.int32))
    y = torch.randn(1, 64, 112, 112, generator=g).contiguous(memory_format=torch.channels_last)
    batch_norm = torch.nn.BatchNorm2d(64).eval()
    batch_norm.running_var.fill_(1.0)
    batch_norm.weight.data, batch_norm.bias.data, batch_norm.eps = scale, shift, 0.0
    pairs = {
        "int8 conv+BN+pool": (
            lambda: int8_kernels.int8_conv2d(x, w, None, None, a, panels, bn, True, pool),
            lambda: ops.max_pool2d(int8_kernels.int8_conv2d(x, w, None, None, a, panels, bn, True), 3, 2, 1),
        ),
        "float BN+pool": (
            lambda: ops.max_pool2d(y, 3, 2, 1, 1, False, bn),
            lambda: ops.max_pool2d(batch_norm(y), 3, 2, 1),
        ),
    }
    print(f"{'stem step':>18} {'isa':>7} {'fused ms':>8} {'two steps ms':>12} {'two / fused':>11}")
    with torch.no_grad():
        for name, (fused, split) in pairs.items():
            if name.startswith("float") and not torch.equal(batch_norm(y), ops.max_pool2d(y, 1, 1, 0, 1, False, bn)):
                continue  # torch rounds its BatchNorm twice here: the fma form is not torch's
            if not torch.equal(fused(), split()):
                raise SystemExit(f"{name}: the fused step differs from the two steps: no timing")
            best = best_ms({"fused": fused, "split": split}, rounds)
            ratio = best["split"] / best["fused"]
            print(f"{name:>18} {_C.isa():>7} {best['fused']:8.3f} {best['split']:12.3f} {ratio:11.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--isa", nargs="+", default=None, help="onebit ISAs (default: the active one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = _C.isa()
    print(f"# pool fusions on / off, Bi-Real-18 at 224 px, batch 1, NCHW input, {args.threads} thread(s)")
    print(f"{'model':>18} {'isa':>7} {'fused stem step':>34} {'with ms':>8} {'without ms':>10} {'without / with':>14}")
    for isa in args.isa or [before]:
        _C.set_isa(isa)
        for name, kwargs in (("birealnet18", {}), ("birealnet18 int8", {"float_layers": "int8"})):
            torch.manual_seed(0)
            model = onebit.models.create("birealnet18", **kwargs).eval()
            x = torch.randn(1, 3, 224, 224)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                fused = engine.pack(model, x)
                with pool_fusions_off():
                    plain = engine.pack(model, x)
                want = model(x)
                if not (torch.equal(fused(x), want) and torch.equal(plain(x), want)):
                    raise SystemExit(f"{name}: a packed model differs from the model: no timing")
                calls = {"with": lambda f=fused, x=x: f(x), "without": lambda f=plain, x=x: f(x)}
                best = best_ms(calls, args.rounds)
            stem = next(step.label for step in fused._steps if "max_pool2d" in step.label)
            ratio = best["without"] / best["with"]
            print(f"{name:>18} {isa:>7} {stem:>34} {best['with']:8.3f} {best['without']:10.3f} {ratio:14.3f}")
    for isa in args.isa or [before]:
        _C.set_isa(isa)
        stem_steps(args.rounds)
    _C.set_isa(before)


if __name__ == "__main__":
    main()
