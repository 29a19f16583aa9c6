"""Whether torch's float 1x1 conv sums a shape in channel order, asked of torch.

torch's NCHW conv picks a kernel per shape: oneDNN's, a BLAS GEMM, or for some small maps (a 2x2 map with
hundreds of channels) its own reference GEMM, which sums each output in channel order with every product
and sum rounded, and runs several times slower than the others. Where it sums so, onebit's ordered 1x1
conv (:class:`~onebit.engine.kernels.ordered_conv.OrderedConv1x1`) gives the same bits faster. The order is
a property of the kernel torch picks for a shape, its thread count and the CPU, not of the data, so a
packed model asks once per input shape and thread count, by running both on a probe: equal bits on every
output (on a probe of wide dynamic range with zeros of both signs, another order changes a large share of
them) let the step run onebit's. As :mod:`.layout_probe` and :mod:`.torch_rounding`, it is decided by the
torch that runs the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SumOrderProbe"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


class SumOrderProbe:
    """``probe(x)`` for a float conv step's NCHW input ``x``: True when ``ordered`` gives the bits of torch's
    conv ``run`` for inputs of ``x``'s shape, known from a probe of that shape on the same number of threads
    (asked once per shape and thread count)."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], ordered: Callable[[torch.Tensor], torch.Tensor]):
        self.run, self.ordered = run, ordered
        self.answers: dict[tuple, bool] = {}

    def __call__(self, x: torch.Tensor) -> bool:
        key = (x.shape, torch.get_num_threads())
        answer = self.answers.get(key)
        if answer is None:
            answer = self.answers[key] = self._same_bits(x.shape)
        return answer

    def _same_bits(self, shape: torch.Size) -> bool:
        if not all(shape):
            return False  # an empty input: torch's conv has nothing to sum, keep it
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
        zeros = torch.rand(shape, generator=g) < 0.05
        probe[zeros] = torch.where(torch.rand(shape, generator=g)[zeros] < 0.5, 0.0, -0.0)
        try:
            with torch.no_grad():
                theirs, ours = self.run(probe), self.ordered(probe)
        except (RuntimeError, ValueError):  # a shape the op refuses: the model's own call says why
            return False
        return theirs.shape == ours.shape and torch.equal(_bits(theirs), _bits(ours))
