"""Whether torch's float conv rounds the same on channels_last inputs as on NCHW ones, asked of torch.

A float conv is layout-bound: torch (oneDNN) may sum in another order for each memory format, and a
packed model must round as the model does. But the order is a property of the kernel torch picks for a
shape, its thread count and the CPU, not of the data: on a CPU with AVX-512, the 3-channel 7x7 stem of a
ResNet runs the same kernel in both formats, while its 1x1 convs and every conv with AVX2 do not. So a
packed model with an NCHW input asks, once per input shape and thread count, by running the conv on a
probe in both formats: equal bits (every output; on a probe of wide dynamic range, a different order
changes a large share of them) let it run in channels_last, where torch's conv is faster and the maps
that follow stay channels_last. As the BatchNorm epilogue's rounding (:mod:`.torch_rounding`), it is
decided by the torch that runs the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LayoutProbe", "ShapeProbe", "wide_range_probe", "same_bits"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two float32 tensors hold the same bits in every element (-0.0 is not 0.0)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def wide_range_probe(shape: torch.Size, signed_zeros: bool = False) -> torch.Tensor:
    """A probe input for asking torch how an op rounds: normal values scaled over many orders of magnitude
    (another summation order changes a large share of the results); with ``signed_zeros``, 5 % of them
    +0.0 or -0.0. The same for a shape on every call."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
    if signed_zeros:
        zeros = torch.rand(shape, generator=g) < 0.05
        probe[zeros] = torch.where(torch.rand(shape, generator=g)[zeros] < 0.5, 0.0, -0.0)
    return probe


class ShapeProbe:
    """``probe(x)``: an answer about an op on inputs of ``x``'s shape (a yes or no, or which of several
    ways), asked of torch once per shape and thread count (:meth:`_answer`, the subclass's question) and
    kept in :attr:`answers`."""

    def __init__(self):
        self.answers: dict[tuple, object] = {}

    def __call__(self, x: torch.Tensor):
        key = (tuple(x.shape), torch.get_num_threads())
        answer = self.answers.get(key)
        if answer is None:
            answer = self.answers[key] = self._answer(x.shape)
        return answer

    def _answer(self, shape: torch.Size):
        raise NotImplementedError


class LayoutProbe(ShapeProbe):
    """``probe(x)`` for a step's one 4-d float32 input ``x``: True when ``run`` gives the same bits for
    ``x`` in channels_last memory as in NCHW, known from a probe of the same shape on the same number of
    threads (asked once per shape and thread count)."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.run = run

    def _answer(self, shape: torch.Size) -> bool:
        probe = wide_range_probe(shape)
        try:
            with torch.no_grad():
                nchw = self.run(probe)
                channels_last = self.run(probe.contiguous(memory_format=torch.channels_last))
        except (RuntimeError, ValueError):  # a shape the op refuses: the model's own call says why
            return False
        return same_bits(nchw, channels_last)
