"""The rounding straight-through estimator shared by the k-bit and ternary quantizers."""

from __future__ import annotations

import torch

__all__ = ["round_ste"]


class _RoundSTE(torch.autograd.Function):
    """Rounding, then an optional clamp; the identity as gradient."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, half_up: bool, lo: float | None, hi: float | None) -> torch.Tensor:
        rounded = torch.floor(v + 0.5) if half_up else torch.round(v)
        return rounded if lo is None else rounded.clamp_(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None, None


def round_ste(
    v: torch.Tensor, *, half_up: bool = False, lo: float | None = None, hi: float | None = None
) -> torch.Tensor:
    r"""Round with the straight-through estimator.

    Forward:  r(v) = round(v) (ties to even), or floor(v + 1/2) (ties up) with ``half_up``;
    then clamp(r(v), lo, hi) when ``lo`` and ``hi`` are given.

    Backward: dr/dv = 1 everywhere, the clamped elements included.
    """
    if (lo is None) != (hi is None):
        raise ValueError("round_ste: give both lo and hi, or neither")
    return _RoundSTE.apply(v, half_up, lo, hi)
