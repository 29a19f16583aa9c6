"""Quantizers beyond one bit: ternary weights, 8-bit per-token and symmetric k-bit activations.

The three quantizers of BitNet b1.58's ``BitLinear`` and of symmetric k-bit networks, registered
by alias like those of :mod:`onebit.quant` (importing onebit registers them):

- ``"ternary"``: :class:`Ternary`, weights in {-1, 0, +1} times a mean magnitude;
- ``"absmax8"``: :class:`Absmax8`, activations as int8 per token, scaled by their maximum;
- ``"dorefa_sym"``: :class:`DoReFaSymmetric`, k-bit activations symmetric around 0 on a fixed or learned clip.

Each keeps shape and dtype, never modifies its input and is idempotent bit for bit
(``q(q(x)) == q(x)``). Two of them factor their output into integers and a float scale, which
is what onebit's layers compute with and what the packed engine stores:
``Ternary.factor(w) = (levels, gamma)`` with ``q(w) = levels * gamma`` (per output channel),
and ``Absmax8.integer_factor(x) = (x_int, s)`` with ``q(x) = x_int / s`` (per token).
"""

from __future__ import annotations

import torch

from onebit.quant import Quantizer, register

__all__ = ["Ternary", "Absmax8", "DoReFaSymmetric", "symmetric_integers"]

#: the smallest scale divisor, as BitNet b1.58 clamps its mean and maximum magnitudes
EPS = 1e-5


class _RoundSTE(torch.autograd.Function):
    """``clamp(round(v), lo, hi)`` (round half to even) with the identity as gradient."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.round(v).clamp_(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


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
        return _RoundSTE.apply(x * s, -128.0, 127.0), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int, s = self.integer_factor(x)
        return x_int / s


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

    def extra_repr(self) -> str:
        clip = f"{self.clip_value():g}"
        return f"bits={self.precision}, clip={clip}" + (", learnable=True" if self.learnable else "")


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


class _RoundHalfUpSTE(torch.autograd.Function):
    """``floor(v + 1/2)`` with the identity as gradient."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        return torch.floor(v + 0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def symmetric_integers(x: torch.Tensor, clip: float | torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`DoReFaSymmetric.integer_factor` for a clip ``c`` and ``n = steps``: ``(2 j - n, n / c)``
    with ``j = floor((clamp(x, -c, c) / c + 1) / 2 * n + 1/2)``, in ``x``'s dtype (the clip as a
    0-d tensor of that dtype, so that every caller rounds alike)."""
    c = clip.to(x.dtype) if isinstance(clip, torch.Tensor) else torch.tensor(float(clip), dtype=x.dtype)
    u = (torch.clamp(x, -c, c) / c + 1.0) / 2.0
    j = _RoundHalfUpSTE.apply(u * steps)
    return 2.0 * j - steps, torch.tensor(float(steps), dtype=x.dtype) / c
