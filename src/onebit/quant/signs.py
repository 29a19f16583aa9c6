"""1-bit quantizers: the sign with its pseudo-gradients, and Bi-Real Net's scaled sign.

Each forward is ``sign(x)`` (never 0, sign(0) = +1), declared with ``is_sign`` / ``sign_levels``
so that the packed engine stores and computes them as bits.
"""

from __future__ import annotations

import torch

from onebit.math import sign
from onebit.quant.base import Quantizer, register

__all__ = ["Sign", "ApproxSign", "SwishSign", "MagnitudeAwareSign"]


# ---------------------------------------------------------------------------
# autograd functions: forward sign(x) (never 0), backward grad * d(x)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float | None) -> torch.Tensor:
        ctx.clip = clip
        if clip is not None:
            ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.clip is None:
            return grad, None
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        # max(0, 2 - 2|x|) * grad, in place on one new buffer
        return x.abs().mul_(-2.0).add_(2.0).clamp_(min=0.0).mul_(grad)


class _SwishSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:
        ctx.beta = beta
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        b = ctx.beta
        bx = b * x
        # d/dx [2 sigmoid(bx) (1 + bx (1 - sigmoid(bx))) - 1] = b (2 - bx tanh(bx/2)) / (1 + cosh(bx))
        return grad * (b * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx))), None


# ---------------------------------------------------------------------------
# quantizers


@register("ste_sign")
class Sign(Quantizer):
    r"""Binarization with the clipped straight-through estimator.

    Forward:  q(x) = +1 if x >= 0 else -1   (sign(0) = +1)

    Backward: dq/dx = 1[|x| <= clip]; with ``clip=None`` the plain identity, dq/dx = 1.

    Courbariaux et al., "Binarized Neural Networks", 2016.
    """

    precision = 1
    is_sign = True
    sign_levels = True

    def __init__(self, clip: float | None = 1.0):
        super().__init__()
        if clip is not None and not clip > 0:
            raise ValueError(f"Sign: clip must be positive or None, got {clip}")
        self.clip = None if clip is None else float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x, self.clip)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


@register("approx_sign")
class ApproxSign(Quantizer):
    r"""Binarization with Bi-Real Net's piecewise-polynomial gradient.

    Forward:  q(x) = +1 if x >= 0 else -1

    Backward: dq/dx = max(0, 2 - 2|x|)   (the derivative of the polynomial
    approximation 2x + x|x| ... clipped to [-1, 1]).

    Liu et al., "Bi-Real Net", ECCV 2018.
    """

    precision = 1
    is_sign = True
    sign_levels = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ApproxSign.apply(x)


@register("swish_sign")
class SwishSign(Quantizer):
    r"""Binarization with BNN+'s swish-sign gradient.

    Forward:  q(x) = +1 if x >= 0 else -1

    Backward: dq/dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)),
    the derivative of SS_beta(x) = 2 sigmoid(beta x) (1 + beta x (1 - sigmoid(beta x))) - 1.

    Darabi et al., "BNN+: Improved Binary Network Training", 2018.
    """

    precision = 1
    is_sign = True
    sign_levels = True

    def __init__(self, beta: float = 5.0):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"SwishSign: beta must be positive, got {beta}")
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwishSign.apply(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


@register("magnitude_aware_sign")
class MagnitudeAwareSign(Quantizer):
    r"""Bi-Real Net's weight binarization: signs scaled by the mean magnitude per output channel.

    Forward:  q(w)[o] = alpha_o * sign(w[o]),  alpha_o = mean(|w[o]|) over all dims but the
    first (the output channel); a 1-D tensor gets a single alpha.

    Backward: dq/dw = alpha_o * 1[|w| <= clip] (alpha is treated as a constant).

    Bitwise idempotent: where all magnitudes of a row are equal (as in ``q(w)``), alpha is
    that magnitude exactly rather than a rounded sum divided by the count.
    Liu et al., "Bi-Real Net", ECCV 2018.
    """

    precision = 1
    sign_levels = True

    def __init__(self, clip: float | None = 1.0):
        super().__init__()
        if clip is not None and not clip > 0:
            raise ValueError(f"MagnitudeAwareSign: clip must be positive or None, got {clip}")
        self.clip = None if clip is None else float(clip)

    @staticmethod
    def scale(w: torch.Tensor) -> torch.Tensor:
        """alpha, shaped to broadcast against ``w``."""
        a = w.detach().abs()
        if w.dim() <= 1:
            top = a.amax()
            return torch.where(top == a.amin(), top, a.mean())
        dims = tuple(range(1, w.dim()))
        top = a.amax(dim=dims, keepdim=True)
        return torch.where(top == a.amin(dim=dims, keepdim=True), top, a.mean(dim=dims, keepdim=True))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale(w) * _SignSTE.apply(w, self.clip)

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign(w), alpha)`` with ``alpha`` of shape ``[C_out]`` (``[1]`` for a 1-D ``w``)."""
        return _SignSTE.apply(w, self.clip), self.scale(w).reshape(-1)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"
