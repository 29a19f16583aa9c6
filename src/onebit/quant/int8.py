"""8-bit quantizers for the layers binary networks keep out of their binary blocks (stem,
downsampling shortcuts, classifier): levels -127 .. 127 times a scale.

- ``"int8_weight"``: :class:`Int8Weight`, weights per output channel by their maximum magnitude;
  ``factor(w) = (levels, scale)`` with ``q(w) = levels * scale``;
- ``"int8"``: :class:`Int8`, activations per tensor on a learned step (LSQ, as its logarithm),
  calibrated on the first training batch; ``integer_factor(x) = (x_int, s)`` with ``q(x) = x_int / s``.

Both declare the ``signed`` 8-bit code (:meth:`onebit.quant.IntegerCode.signed`). In a layer,
``conv(x_int, levels)`` sums integers of magnitude at most 127 * 127: exact in float32 while
``taps * 127^2 < 2^24`` (taps <= 1040), which the layers check at construction.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from onebit.quant.base import EPS, Quantizer, register
from onebit.quant.codes import IntegerCode

__all__ = ["Int8", "Int8Weight", "INT8_MAX"]

#: the largest level: symmetric int8 leaves out -128, so that negation stays in range
INT8_MAX = 127


class _WeightLevels(torch.autograd.Function):
    """``clamp(round(w / scale), -127, 127)``; gradient ``grad / scale`` (so that ``levels * scale``
    passes the gradient through unchanged)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad / scale, None


@register("int8_weight")
class Int8Weight(Quantizer):
    r"""Symmetric 8-bit weights per output channel (dim 0; a 1-d tensor has one scale).

    Forward:  a_o = max(max|W[o]|, 1e-5),   scale_o = a_o / 127,

        levels = clamp(round(W / scale_o), -127, 127),   q(W) = levels * scale_o,

    ``round`` half to even. Idempotent bit for bit in float32: the channel's maximum becomes
    ``fl(127 scale)``, and ``fl(fl(127 scale) / 127) == scale`` for every ``scale = fl(a / 127)``
    (checked over every float32 mantissa of ``a``); ``round(fl(l scale) / scale) == l``.

    Backward: dq/dW = 1 (straight-through, no clipping: every weight lies within its channel's
    maximum); the scale is a constant.

    :meth:`factor` returns ``(levels, scale)``, ``scale`` of shape ``[C_out]``: a layer computes
    ``conv(x, levels) * scale + bias``. Never writes to ``W``.
    """

    precision = 8

    @staticmethod
    def scale(w: torch.Tensor) -> torch.Tensor:
        """``max(max|W[o]|, 1e-5) / 127`` per output channel, shape ``[C_out]`` (``[1]`` for a 1-d ``w``)."""
        a = w.detach().abs()
        a = a.reshape(w.shape[0], -1) if w.dim() >= 2 else a.reshape(1, -1)
        return a.amax(dim=1).clamp_(min=EPS).div_(INT8_MAX)

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels in -127 .. 127, scale)`` with ``q(w) = levels * scale`` per output channel."""
        scale = self.scale(w)
        return _WeightLevels.apply(w, _per_channel(scale, w)), scale

    def factor_code(self) -> IntegerCode:
        """``signed`` 8-bit: :meth:`factor`'s levels are the integers in [-127, 127]."""
        return IntegerCode.signed(8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        levels, scale = self.factor(w)
        return levels * _per_channel(scale, w)


def _per_channel(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``scale`` shaped to broadcast against ``w``: along dim 0 (one value for a 0-d or 1-d ``w``)."""
    return scale.reshape([-1] + [1] * (w.dim() - 1)) if w.dim() >= 2 else scale.reshape(())


class _GradientScale(torch.autograd.Function):
    """The identity, with its gradient multiplied by ``g``."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return v.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.g, None


class _StepIntegers(torch.autograd.Function):
    """``clamp(round(x s), -m, m)``; gradients ``s 1[|x s| <= m]`` for x and ``x 1[|x s| <= m]`` for s
    (the rounding passed straight through, the clamp not)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, largest: int) -> torch.Tensor:
        ctx.save_for_backward(x, s)
        ctx.largest = largest
        return torch.round(x * s).clamp_(-largest, largest)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, s = ctx.saved_tensors
        inside = ((x * s).abs() <= ctx.largest).to(grad.dtype)
        grad_x = grad * inside * s if ctx.needs_input_grad[0] else None
        grad_s = (grad * inside * x).sum().reshape(s.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_s, None


@register("int8")
class Int8(Quantizer):
    r"""Symmetric 8-bit activations per tensor, on a learned step (LSQ), held as its logarithm.

    Forward, with the step ``d = exp(log_step)`` (at least 1e-5 / 127) and ``s = fl32(1 / d)``:

        x_int = clamp(round(x s), -127, 127),   q(x) = x_int / s,

    ``round`` half to even. Idempotent bit for bit in float32 and float64 for a given ``d``.

    Backward (Esser et al., "Learned Step Size Quantization", 2020), inside meaning |x s| <= 127:

        dq/dx = 1[inside],
        dq/dd = (x_int - x / d) * g  inside,   x_int * g = +-127 g  outside,
        dq/dlog_step = d * dq/dd,

    with LSQ's gradient scale ``g = 1 / sqrt(numel(x) * 127)``. The parameter is ``log d``, so an
    optimizer's update moves the step by a fraction of itself: Adam's steps of about ``lr`` would
    otherwise move a step of 0.02 by a quarter of itself per update at ``lr = 0.005``.

    Calibration: the first forward in training mode sets ``d = max(min(3 std(x), max|x|), 1e-5) / 127``
    from that batch (in a process group: the mean of the ranks' clips, so every rank holds one ``d``)
    and records it in the ``calibrated`` buffer (saved in ``state_dict``, with
    ``log_step``), so a loaded model is not calibrated again. Before that (or in eval mode) ``d`` keeps its
    initial value (``step``, default 1 / 127: the range [-1, 1]). Forward writes nothing else. A
    ``state_dict`` holding ``step`` itself (written before the logarithm) loads as its logarithm.

    :meth:`integer_factor` returns ``(x_int, s)``: a layer computes ``conv(x_int, levels) / s``,
    an exact integer sum divided once.
    """

    precision = 8

    def __init__(self, step: float = 1.0 / INT8_MAX):
        super().__init__()
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not step > 0:
            raise ValueError(f"Int8: step must be a positive number, got {step!r}")
        self.log_step = nn.Parameter(torch.tensor(math.log(float(step))))
        self.register_buffer("calibrated", torch.tensor(False))
        self._is_calibrated = False  # the buffer as a Python bool: no tensor read in forward

    @property
    def step(self) -> torch.Tensor:
        """The step ``d = exp(log_step)`` (0-d, with the gradient of ``log_step``)."""
        return self.log_step.exp()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        old = state_dict.pop(prefix + "step", None)
        if old is not None and prefix + "log_step" not in state_dict:
            state_dict[prefix + "log_step"] = torch.log(old.to(torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_calibrated = bool(self.calibrated)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """``d = max(min(3 std(x), max|x|), 1e-5) / 127`` from ``x`` (the clip averaged over the ranks of
        a process group, each calibrating on its own batch at the same step); marks the quantizer calibrated."""
        v = x.detach().to(torch.float32)
        clip = torch.minimum(3.0 * v.std(correction=0), v.abs().amax()).clamp_(min=EPS)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(clip)
            clip /= dist.get_world_size()
        self.log_step.copy_(torch.log(clip / INT8_MAX))
        self.calibrated.fill_(True)
        self._is_calibrated = True

    def divisor(self) -> torch.Tensor:
        """``s = fl32(1 / max(d, 1e-5 / 127))``: the 0-d float32 tensor a float32 layer divides by
        (without gradient)."""
        return torch.reciprocal(self.log_step.detach().exp().clamp(min=EPS / INT8_MAX))

    def integer_factor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_int, s)``: the integers in [-127, 127] (``x``'s dtype, with the gradient of ``s q(x)``)
        and the divisor ``s`` (:meth:`divisor` in ``x``'s dtype, with the gradient of ``d`` scaled by
        ``g``), so ``q(x) = x_int / s``. Calibrates first (see above)."""
        if self.training and not self._is_calibrated:
            self.calibrate(x)
        g = 1.0 / math.sqrt(max(x.numel(), 1) * INT8_MAX)
        step = _GradientScale.apply(self.log_step.exp(), g)
        s = torch.reciprocal(step.clamp(min=EPS / INT8_MAX)).to(x.dtype)
        return _StepIntegers.apply(x, s, INT8_MAX), s

    def integer_code(self) -> IntegerCode:
        """``signed`` 8-bit: :meth:`integer_factor`'s integers ``clamp(round(x s), -127, 127)``, one ``s``."""
        return IntegerCode.signed(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int, s = self.integer_factor(x)
        return x_int / s

    def extra_repr(self) -> str:
        return f"step={float(self.step.detach()):.6g}, calibrated={bool(self.calibrated)}"
