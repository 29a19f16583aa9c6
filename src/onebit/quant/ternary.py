"""BitNet b1.58's quantizers: ternary weights by their mean magnitude, 8-bit activations per token.

- ``"ternary"``: :class:`Ternary`, weights in {-1, 0, +1} times a mean magnitude;
  ``factor(w) = (levels, gamma)`` with ``q(w) = levels * gamma`` (per output channel);
- ``"absmax8"``: :class:`Absmax8`, activations as int8 per token, scaled by their maximum;
  ``integer_factor(x) = (x_int, s)`` with ``q(x) = x_int / s`` (per token).

Each keeps shape and dtype, never modifies its input and is idempotent bit for bit
(``q(q(x)) == q(x)``).
"""

from __future__ import annotations

import torch

from onebit.quant.base import EPS, Quantizer, register
from onebit.quant.codes import IntegerCode
from onebit.quant.ste import round_ste

__all__ = ["Ternary", "Absmax8"]


class _TernaryLevels(torch.autograd.Function):
    """Levels ``clamp(round(w / gamma), -1, 1)``; gradient ``grad / gamma`` (so that ``levels * gamma``
    passes the gradient through unchanged)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gamma)
        return torch.round(w / gamma).clamp_(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gamma,) = ctx.saved_tensors
        return grad / gamma, None


@register("ternary")
class Ternary(Quantizer):
    r"""Ternary weights by their mean magnitude (BitNet b1.58's absmean quantizer).

    Forward:  q(W) = gamma * clamp(round(W / gamma), -1, 1),  levels in {-1, 0, +1},

        gamma = mean(|W|)                         (per tensor, or per output channel W[o]),
        gamma = c   when W already is c * T with T ternary and c > 0 (all nonzero |W| equal),
        gamma >= 1e-5 (an all-zero W quantizes to 0).

    The second case makes q a projection, idempotent bit for bit: the mean magnitude of
    ``c * T`` is ``c`` times the fraction of nonzeros, so without it ``q(q(W))`` would shrink.
    Latent float weights never hit it (their magnitudes differ), so training is BitNet's.

    Backward: dq/dW = 1 (the plain straight-through estimator, no clipping: BitNet b1.58's
    ``W + (q(W) - W).detach()``); ``gamma`` is a constant.

    :meth:`factor` returns ``(levels, gamma)`` with ``gamma`` of shape ``[C_out]``, so a layer
    computes ``(x @ levels.T) * gamma + bias``. ``precision`` is 2 (log2 3 = 1.58 bits a weight,
    stored as 2). Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", 2024.
    """

    precision = 2

    def __init__(self, per_channel: bool = False):
        super().__init__()
        self.per_channel = bool(per_channel)

    def gamma(self, w: torch.Tensor) -> torch.Tensor:
        """gamma, shaped to broadcast against ``w`` (a constant: no gradient)."""
        a = w.detach().abs()
        if self.per_channel and w.dim() >= 2:
            a = a.reshape(w.shape[0], -1)
        else:
            a = a.reshape(1, -1)
        mean = a.mean(dim=1, keepdim=True).clamp_(min=EPS)
        largest = a.amax(dim=1, keepdim=True)
        smallest = torch.where(a > 0, a, torch.full_like(a, float("inf"))).amin(dim=1, keepdim=True)
        gamma = torch.where(largest == smallest, largest, mean)
        return gamma.reshape([-1] + [1] * (w.dim() - 1)) if w.dim() >= 1 else gamma.reshape(())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        levels, gamma = self._levels(w)
        return levels * gamma

    def _levels(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma = self.gamma(w)
        return _TernaryLevels.apply(w, gamma), gamma

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels in {-1, 0, +1}, gamma)``, ``gamma`` of shape ``[C_out]`` (``[1]`` for a 1-D ``w``)."""
        levels, gamma = self._levels(w)
        channels = w.shape[0] if w.dim() >= 2 else 1
        return levels, gamma.reshape(-1).expand(channels).contiguous()

    def factor_code(self) -> IntegerCode:
        """``ternary``: :meth:`factor`'s levels are in {-1, 0, +1}."""
        return IntegerCode.ternary()

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}"


@register("absmax8")
class Absmax8(Quantizer):
    r"""8-bit activations per token, scaled by their maximum magnitude (BitNet b1.58's absmax).

    Forward, over the last dimension (a token's features):

        s = 127 / max(max|x|, 1e-5),   x_int = clamp(round(x * s), -128, 127),   q(x) = x_int / s

    with ``round`` half to even and ``127 / m`` one division. Idempotent bit for bit in float32
    and float64 (``127 / (127 / s) == s`` in float32, checked over every float32 mantissa); in
    bfloat16 the levels ``x_int / s`` themselves round, so a second pass may move them.

    Backward: dq/dx = 1 (straight-through; no clipping: every x lies within the range its own
    maximum sets). ``s`` is a constant.

    :meth:`integer_factor` returns ``(x_int, s)``: onebit's linear layers compute
    ``(x_int @ levels.T) / s``, an exact integer sum divided once, which the packed engine's
    int8 kernels reproduce bit for bit.
    """

    precision = 8

    @staticmethod
    def scale(x: torch.Tensor) -> torch.Tensor:
        """``s = 127 / max(max|x|, 1e-5)`` per token, shape ``[..., 1]`` (a constant: no gradient)."""
        m = x.detach().abs().amax(dim=-1, keepdim=True).clamp_(min=EPS)
        return torch.full_like(m, 127.0).div_(m)

    def integer_factor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_int, s)``: integers in [-128, 127] (as ``x``'s float dtype) and the per-token scale."""
        s = self.scale(x)
        return round_ste(x * s, lo=-128.0, hi=127.0), s

    def integer_code(self) -> IntegerCode:
        """``absmax`` 8-bit: :meth:`integer_factor`'s integers in [-128, 127] and per-token divisor."""
        return IntegerCode.absmax(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int, s = self.integer_factor(x)
        return x_int / s
