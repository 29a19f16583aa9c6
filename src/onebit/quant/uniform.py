"""Uniform k-bit quantizers: DoReFa-Net's activations on [0, 1], its symmetric weights, and
symmetric k-bit activations on a fixed or learned clip.

Each factors its output into integers and a scale, declared by an integer code
(:class:`onebit.quant.IntegerCode`): ``dorefa``'s ``integer_factor`` gives ``unsigned`` integers,
``dorefa_sym``'s ``symmetric`` ones on its clip, and ``dorefa_weight``'s ``factor`` gives
``symmetric`` levels. The helpers :func:`unsigned_integers` and :func:`symmetric_integers` compute
those integers for the packed engine, by the same operations.
"""

from __future__ import annotations

import warnings

import torch

from onebit.quant.base import EPS, Quantizer, register
from onebit.quant.codes import IntegerCode
from onebit.quant.ste import round_ste

__all__ = ["DoReFa", "DoReFaWeight", "DoReFaSymmetric", "unsigned_integers", "symmetric_integers"]


# ---------------------------------------------------------------------------
# integers and autograd functions


def unsigned_integers(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``round(clamp(x, 0, 1) * n)``: :meth:`DoReFa.integer_factor`'s integers, without gradient."""
    return torch.round(torch.clamp(x, 0.0, 1.0) * levels)


class _UniformIntegers(torch.autograd.Function):
    """``round(clamp(x, 0, 1) * n)``; gradient ``n * 1[0 <= x <= 1]`` (that of ``n * q(x)``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.levels = levels
        return torch.round(torch.clamp(x, 0.0, 1.0) * levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * ((x >= 0.0) & (x <= 1.0)).to(grad.dtype) * ctx.levels, None


class _Uniform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.round(torch.clamp(x, 0.0, 1.0) * levels) / levels

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * ((x >= 0.0) & (x <= 1.0)).to(grad.dtype), None


class _SymmetricUniform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float, steps: int) -> torch.Tensor:
        ctx.clip = clip
        ctx.save_for_backward(x)
        u = (torch.clamp(x, -clip, clip) / clip + 1.0) / 2.0
        j = torch.floor(u * steps + 0.5)
        return (j * (2.0 / steps) - 1.0) * clip

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None, None


class _LearnedClipUniform(torch.autograd.Function):
    """:class:`DoReFaSymmetric`'s forward with the clip a tensor; gradients for x and the clip."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: torch.Tensor, steps: int) -> torch.Tensor:
        c = clip.to(x.dtype)
        u = (torch.clamp(x, -c, c) / c + 1.0) / 2.0
        q = (torch.floor(u * steps + 0.5) * (2.0 / steps) - 1.0) * c
        ctx.save_for_backward(x, q, c)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, q, c = ctx.saved_tensors
        inside = x.abs() <= c
        grad_x = grad * inside.to(grad.dtype)
        dq_dc = torch.where(inside, (q - x) / c, torch.sign(x))
        grad_clip = (grad * dq_dc).sum().to(c.dtype)
        return grad_x, grad_clip, None


def symmetric_integers(x: torch.Tensor, clip: float | torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`DoReFaSymmetric.integer_factor` for a clip ``c`` and ``n = steps``: ``(2 j - n, n / c)``
    with ``j = floor((clamp(x, -c, c) / c + 1) / 2 * n + 1/2)``, in ``x``'s dtype (the clip as a
    0-d tensor of that dtype, so that every caller rounds alike)."""
    c = clip.to(x.dtype) if isinstance(clip, torch.Tensor) else torch.tensor(float(clip), dtype=x.dtype)
    u = (torch.clamp(x, -c, c) / c + 1.0) / 2.0
    j = round_ste(u * steps, half_up=True)
    return 2.0 * j - steps, torch.tensor(float(steps), dtype=x.dtype) / c


# ---------------------------------------------------------------------------
# quantizers


@register("dorefa")
class DoReFa(Quantizer):
    r"""k-bit uniform quantization on [0, 1] (DoReFa-Net activations).

    Forward:  q(x) = round(clamp(x, 0, 1) * (2^k - 1)) / (2^k - 1), exactly 2^k levels.

    Backward: dq/dx = 1[0 <= x <= 1].

    An activation quantizer: used for weights it maps every negative weight to 0 (warned
    about once per instance); for k-bit weights use :class:`DoReFaWeight` (``"dorefa_weight"``).

    Zhou et al., "DoReFa-Net", 2016.
    """

    def __init__(self, bits: int = 2):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"DoReFa: bits must be an integer in [1, 16], got {bits!r}")
        self.precision = bits

    @property
    def levels(self) -> int:
        return 2**self.precision - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Uniform.apply(x, self.levels)

    def integer_factor(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(x_int, n)``: ``x_int = round(clamp(x, 0, 1) * n)`` in {0, ..., n} (``x``'s dtype) and
        ``n = 2^k - 1``, so ``q(x) = x_int / n``. Layers compute ``conv(x_int, levels) / n``."""
        return _UniformIntegers.apply(x, self.levels), float(self.levels)

    def integer_code(self) -> IntegerCode:
        """``unsigned`` k-bit: :meth:`integer_factor` gives ``round(clamp(x, 0, 1) n)``, divisor ``n``."""
        return IntegerCode.unsigned(self.precision)

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Used as a weight quantizer (layers factor their weights): warns once that the
        levels are in [0, 1], then ``(q(w), None)``."""
        if not getattr(self, "_warned_weights", False):
            self._warned_weights = True
            warnings.warn(
                f"{type(self).__name__} quantizes into [0, 1] (an activation quantizer): used for weights it maps "
                "every negative weight to 0. For symmetric k-bit weights use DoReFaWeight ('dorefa_weight').",
                UserWarning,
                stacklevel=3,
            )
        return self(w), None

    def extra_repr(self) -> str:
        return f"bits={self.precision}"


@register("dorefa_weight")
class DoReFaWeight(Quantizer):
    r"""DoReFa-Net's k-bit weights: symmetric levels in [-1, 1].

    Forward:  q(w) = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1,
    quantize_k(r) = round((2^k - 1) r) / (2^k - 1): the 2^k levels 2 i / (2^k - 1) - 1,
    symmetric around 0 ({-1, -1/3, +1/3, +1} at 2 bits, as BMXNet's 2-bit weights); the max
    is over the whole tensor.

    Backward: straight through the rounding, through tanh and the normalization:
    dq/dw = d/dw [tanh(w) / max|tanh(w)|].

    ``factor(w)`` is ``(2 i - n, 1 / n)``: odd integer levels and their scale, so a layer's sum is an
    exact integer (``conv(x, levels) * (1 / n)``).
    Bitwise idempotent up to 3 bits; from 4 bits on, tanh compresses the levels of ``q(w)``
    by more than half a step (|tanh(l) / tanh(1) - l| reaches 0.107 > 1 / (2^k - 1)), so
    ``q(q(w))`` moves inner levels one step towards 0.

    Zhou et al., "DoReFa-Net", 2016.
    """

    def __init__(self, bits: int = 2):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"DoReFaWeight: bits must be an integer in [1, 16], got {bits!r}")
        self.precision = bits

    @property
    def levels(self) -> int:
        return 2**self.precision - 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # 2 round(n r) / n - 1, as (2 i - n) / n: levels exactly symmetric around 0 (-l == l')
        return self.integer_levels(w) / self.levels

    def integer_levels(self, w: torch.Tensor) -> torch.Tensor:
        """``2 round(n r) - n``: the odd integers in [-n, n] whose ``1 / n`` multiples are ``q(w)``."""
        t = torch.tanh(w)
        r = t / (2.0 * t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)) + 0.5
        n = self.levels
        return 2.0 * round_ste(r * n) - n

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2 i - n, 1 / n)``: odd integer levels and a per-output-channel scale ``1 / n`` (float32),
        so a layer sums integers exactly and then scales (``q(w)`` equals ``levels / n``)."""
        channels = w.shape[0] if w.dim() >= 2 else 1
        return self.integer_levels(w), torch.full((channels,), 1.0 / self.levels, dtype=w.dtype, device=w.device)

    def factor_code(self) -> IntegerCode:
        """``symmetric`` k-bit: :meth:`factor`'s levels are the odd integers in [-n, n]."""
        return IntegerCode.symmetric(self.precision)

    def extra_repr(self) -> str:
        return f"bits={self.precision}"


@register("dorefa_sym")
class DoReFaSymmetric(Quantizer):
    r"""k-bit activations symmetric around 0, on a fixed clip ``c``.

    Forward:  n = 2^k - 1,  u = (clamp(x, -c, c) / c + 1) / 2  in [0, 1],

        q(x) = c * (2 * floor(u * n + 1/2) / n - 1),

    2^k levels, the odd multiples of c / n: {-c, ..., -c/n, +c/n, ..., +c}. Ties round up, so
    for k = 1 this is ``c * sign(x)`` with sign(0) = +1 (onebit's convention).

    Backward: dq/dx = 1[|x| <= c] (straight-through inside the clip). With ``learnable=True``
    the clip is a parameter (PACT's learned range, in LSQ's form for a symmetric quantizer):

        dq/dc = q(x) / c - x / c   for |x| <= c   (the rounding passed straight through),
        dq/dc = sign(x)            for |x| > c    (q = +-c there).

    A learnable clip is kept positive in forward (``max(c, 1e-5)``) without writing to it.

    The symmetric form of DoReFa-Net's k-bit quantizer (Zhou et al., "DoReFa-Net", 2016; Choi et
    al., "PACT", 2018; Esser et al., "Learned Step Size Quantization", 2020).
    """

    def __init__(self, bits: int = 2, clip: float = 1.0, learnable: bool = False):
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise ValueError(f"DoReFaSymmetric: bits must be an integer in [1, 16], got {bits!r}")
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0:
            raise ValueError(f"DoReFaSymmetric: clip must be a positive number, got {clip!r}")
        self.precision = bits
        self.learnable = bool(learnable)
        if self.learnable:
            self.clip = torch.nn.Parameter(torch.tensor(float(clip)))
        else:
            self.clip = float(clip)

    @property
    def steps(self) -> int:
        return 2**self.precision - 1

    def clip_value(self) -> float:
        """The clip in use now (a learnable one as a float, at least 1e-5)."""
        return max(float(self.clip.detach()), EPS) if self.learnable else self.clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.learnable:
            return _LearnedClipUniform.apply(x, self.clip.clamp(min=EPS), self.steps)
        return _SymmetricUniform.apply(x, self.clip, self.steps)

    def integer_factor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_int, s)``: ``x_int = 2 floor(u n + 1/2) - n``, the odd integers in [-n, n] (``x``'s
        dtype), and ``s = n / c`` (a 0-d tensor), so ``q(x) = x_int / s`` up to one rounding. Layers
        compute ``conv(x_int, levels) / s``. Gradients as in forward (the rounding passed through),
        for a learnable clip too."""
        clip = self.clip.clamp(min=EPS) if self.learnable else self.clip
        return symmetric_integers(x, clip, self.steps)

    def integer_code(self) -> IntegerCode:
        """``symmetric`` k-bit on the clip in use (:meth:`clip_value`): :meth:`integer_factor`'s odd
        integers in [-n, n], divisor ``n / c``."""
        return IntegerCode.symmetric(self.precision, self.clip_value())

    def extra_repr(self) -> str:
        clip = f"{self.clip_value():g}"
        return f"bits={self.precision}, clip={clip}" + (", learnable=True" if self.learnable else "")
