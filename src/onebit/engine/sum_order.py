"""Whether torch sums a shape in an order onebit makes too, asked of torch: its float convs (onebit's ordered
convs) and its RMSNorm (a packed BitLinear's norm).

torch's conv picks a kernel per shape: oneDNN's, a BLAS GEMM, or for some small maps (a 2x2 map with hundreds
of channels) its own reference GEMM, which sums each output in channel order with every product and sum
rounded and runs several times slower than the others; a network's 3-channel stem it sums as one chain of
fused multiply-adds per output in (kh, kw, c) order. onebit's ordered convs
(:mod:`onebit.engine.kernels.ordered_conv`) make the same sums, so they give torch's bits wherever torch
sums so. The order is a property of the kernel torch picks for a shape, its thread count and the CPU, not
of the data, so a packed model asks once per input shape and thread count, by running both on a probe:
equal bits on every output (on a probe of wide dynamic range with zeros of both signs, another order
changes a large share of them) let the step run onebit's. As :mod:`.layout_probe` and
:mod:`.torch_rounding`, it is decided by the torch that runs the model.

``F.rms_norm`` sums each token's squares with ATen's cascade sum, in vectors as wide as the build of its sum
kernel (8 floats on x86-64 whatever the CPU: that kernel has no AVX-512 build), on one thread or, for long
rows and several threads, split between them. :class:`NormOrderProbe` asks which width, if any, gives a
shape torch's bits.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from onebit.engine.layout_probe import ShapeProbe, same_bits, wide_range_probe

__all__ = ["NormOrderProbe", "RoundingProbe", "SumOrderProbe", "TORCH_SUM_LANES"]

#: a timed probe's calls of each conv (fewer once they took TIMED_BUDGET seconds: a large batch's first
#: call should not wait long), and the share of torch's best time onebit's must be below: a gain smaller
#: than the timing noise of a busy machine is no reason to switch
TIMED_CALLS, TIMED_BUDGET, TIMED_MARGIN = 5, 0.05, 0.95


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class SumOrderProbe(ShapeProbe):
    """``probe(x)`` for a float conv step's input ``x``: True when ``ordered`` gives the bits of torch's conv
    ``run`` for inputs of ``x``'s shape, known from a probe of that shape on the same number of threads (asked
    once per shape and thread count).

    ``layouts``: the memory formats the probe checks (``ordered`` must equal torch's conv in each). With
    ``timed``, ``ordered`` must also be at least 5 % faster than torch's conv in the fastest of them (the best
    of up to five calls each, interleaved), so it is taken only where it gains."""

    def __init__(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        ordered: Callable[[torch.Tensor], torch.Tensor],
        layouts: tuple[torch.memory_format, ...] = (torch.contiguous_format,),
        timed: bool = False,
    ):
        super().__init__()
        self.run, self.ordered, self.layouts, self.timed = run, ordered, layouts, timed

    def _answer(self, shape: torch.Size) -> bool:
        if not all(shape):
            return False  # an empty input: torch's conv has nothing to sum, keep it
        probe = wide_range_probe(shape, signed_zeros=True)
        inputs = [probe.contiguous(memory_format=f) for f in self.layouts]
        try:
            with torch.no_grad():
                ours = self.ordered(inputs[0])
                if not all(same_bits(self.run(x), ours) for x in inputs):
                    return False
                if self.timed:
                    mine = theirs = float("inf")
                    start = time.perf_counter()
                    for _ in range(TIMED_CALLS):  # the best call of each, interleaved
                        mine = min(mine, _seconds(lambda: self.ordered(inputs[0])))
                        theirs = min(theirs, *(_seconds(lambda x=x: self.run(x)) for x in inputs))
                        if time.perf_counter() - start > TIMED_BUDGET:  # a large input: fewer calls
                            break
                    return mine < theirs * TIMED_MARGIN
        except (RuntimeError, ValueError):  # a shape the op refuses: the model's own call says why
            return False
        return True


class RoundingProbe(ShapeProbe):
    """``probe(x)``: the name of the first of ``candidates`` (``{name: op}``, onebit's ways of computing an op)
    that gives the bits of torch's ``run`` on inputs of ``x``'s shape in memory format ``layout``, or False when
    none does; asked once per shape and thread count, on a probe of wide dynamic range with zeros of both
    signs. For ops whose rounding torch's kernels choose per shape, layout and thread count (a depthwise 1x1
    conv: a multiply then an add, or one fused multiply-add)."""

    def __init__(self, run: Callable, candidates: dict[str, Callable], layout: torch.memory_format):
        super().__init__()
        self.run, self.candidates, self.layout = run, candidates, layout

    def _answer(self, shape: torch.Size) -> str | bool:
        if not all(shape):
            return False  # nothing to round: keep torch's op
        x = wide_range_probe(shape, signed_zeros=True).contiguous(memory_format=self.layout)
        try:
            with torch.no_grad():
                theirs = self.run(x)
                return next((name for name, op in self.candidates.items() if same_bits(op(x), theirs)), False)
        except (RuntimeError, ValueError):  # a shape the op refuses: the model's own call says why
            return False


#: the vector widths of torch's sum kernel a norm probe tries, in this order: its x86-64 build (for AVX2 and
#: AVX-512 alike) and its 256-bit NEON one read 8 floats at a time
TORCH_SUM_LANES = (8, 16, 4)

#: the sums a norm probe compares at least: one sum (a batch-1 shape's) another order may round the same, a
#: third of the time for a few thousand features and more for a few, so one probe of a small batch is not
#: enough
NORM_PROBE_SUMS = 64


class NormOrderProbe(ShapeProbe):
    """``probe(x)`` for BitLinear tokens ``x`` ``[N, F]``: the vector width (one of ``lanes``) with which
    ``native(x, eps, lanes=lanes)`` gives the bits of ``F.rms_norm(x, (F,), eps=eps)`` for inputs of ``x``'s
    shape, or 0 when none does; asked once per shape and thread count, on as many probes of that shape as
    make :data:`NORM_PROBE_SUMS` sums (every one must match)."""

    def __init__(self, native: Callable[..., torch.Tensor], lanes: tuple[int, ...] = TORCH_SUM_LANES):
        super().__init__()
        self.native, self.lanes = native, lanes

    def _answer(self, shape: torch.Size) -> int:
        if len(shape) != 2 or not all(shape):
            return 0
        eps = 1e-6
        g = torch.Generator().manual_seed(0)  # normal values: over a wide range, the largest squares decide
        probes = -(-NORM_PROBE_SUMS // shape[0])
        scales = torch.exp(torch.randn((probes, 1, 1), generator=g))
        xs = torch.randn((probes, *shape), generator=g) * scales
        with torch.no_grad():
            theirs = [torch.nn.functional.rms_norm(x, (shape[1],), eps=eps) for x in xs]
            for lanes in self.lanes:
                if all(same_bits(self.native(x, eps, lanes=lanes), t) for x, t in zip(xs, theirs, strict=True)):
                    return lanes
        return 0
