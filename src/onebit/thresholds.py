"""Integer thresholds: a per-channel affine map (conv bias, scale, BatchNorm) followed by sign.

A binary layer computes an exact integer accumulator per output value,
``acc = sum_i sign(x_i) * sign(w_i)``, with ``acc`` in ``[-K, K]`` where
``K = (C_in / groups) * kh * kw`` (``in_features`` for a linear layer). When the
next layer only looks at ``sign(f_c(acc))``, where ``f_c`` is a chain of float
operations of channel ``c`` (bias add, magnitude-aware scale, BatchNorm in eval
mode), the float result can be replaced by one integer comparison::

    direction_c = +1:   sign(f_c(acc)) = -1  <=>  acc < threshold_c
    direction_c = -1:   sign(f_c(acc)) = -1  <=>  acc > threshold_c

(``sign(y) = -1`` iff ``y < 0``; sign(0) = +1 and NaN -> +1, as in :func:`onebit.math.sign`.)

Derivation, made to agree bit for bit with the float model: evaluate ``f_c``
itself -- the same torch functions in the same dtype the model runs -- on
*every* integer ``acc`` in ``[-K, K]`` (all integers, not only those of the
parity a full window has, since zero padding changes the parity at borders),
take the decision ``f_c(acc) < 0`` and find where it switches. IEEE rounding is
monotone, so a monotone real map stays monotone after rounding: the decisions
form one run of "negative" at one end of the range (BatchNorm scale > 0:
negative for small ``acc``, direction +1; scale < 0: negative for large ``acc``,
direction -1). A constant channel (scale 0, or a decision that never changes
on the range) gets an *always* or *never* threshold, expressed in the same form:
``(direction=+1, threshold=K+1)`` is always negative, ``(+1, -K-1)`` never.
A channel whose decisions are not monotone raises :class:`ValueError`.

This module is shared by the packed engine (:mod:`onebit.engine`) and by model
canonization (``onebit.canonize.fold_thresholds``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onebit.layerkinds import BATCHNORMS

__all__ = [
    "Thresholds",
    "thresholds_from_decisions",
    "integer_thresholds",
    "batchnorm_sign_thresholds",
    "accumulator_bound",
]


@dataclass(frozen=True)
class Thresholds:
    """Per-channel integer thresholds.

    ``threshold``: int32 ``[C]``; ``direction``: int32 ``[C]`` with values +1 or -1.
    ``negative(acc)`` is True where ``sign(f(acc)) = -1`` (the packed bit is set).
    """

    threshold: torch.Tensor
    direction: torch.Tensor

    def __post_init__(self) -> None:
        if self.threshold.dtype != torch.int32 or self.direction.dtype != torch.int32:
            raise TypeError("Thresholds: threshold and direction must be int32 tensors")
        if self.threshold.shape != self.direction.shape or self.threshold.dim() != 1:
            raise ValueError(
                f"Thresholds: threshold and direction must be 1-D of one length, got "
                f"{list(self.threshold.shape)} and {list(self.direction.shape)}"
            )
        if not bool(((self.direction == 1) | (self.direction == -1)).all()):
            raise ValueError("Thresholds: direction must be +1 or -1")

    @property
    def channels(self) -> int:
        return int(self.threshold.numel())

    def negative(self, acc: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """Boolean ``acc``-shaped tensor: True where the sign is -1, channels along ``channel_dim``."""
        shape = [1] * acc.dim()
        shape[channel_dim] = self.channels
        thr = self.threshold.view(shape).to(torch.int64)
        up = (self.direction == 1).view(shape)
        a = acc.to(torch.int64)
        return torch.where(up, a < thr, a > thr)

    def sign(self, acc: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """``sign(f(acc))`` as float32 +-1."""
        neg = self.negative(acc, channel_dim)
        return torch.where(neg, -1.0, 1.0).to(torch.float32)


def accumulator_bound(in_channels: int, groups: int = 1, kernel_size: Sequence[int] = ()) -> int:
    """``K = (in_channels / groups) * prod(kernel_size)``: the accumulator lies in ``[-K, K]``."""
    k = in_channels // groups
    for s in kernel_size:
        k *= int(s)
    return int(k)


def thresholds_from_decisions(negative: torch.Tensor, low: int) -> Thresholds:
    """Thresholds from a decision table.

    ``negative``: bool ``[C, L]``, ``negative[c, j]`` is the decision (sign = -1) of channel
    ``c`` at ``acc = low + j``; the table must cover the whole range ``[low, low + L - 1]``
    (symmetric, ``low = -K``). Raises :class:`ValueError` naming the first channel whose
    decisions are not monotone in ``acc``.
    """
    if negative.dim() != 2 or negative.dtype != torch.bool:
        raise ValueError("thresholds_from_decisions: expected a bool [C, L] table")
    channels, length = negative.shape
    high = low + length - 1
    neg = negative.to(torch.int64)
    count = neg.sum(dim=1)
    # decisions change between j and j+1: must change at most once per channel
    changes = (neg[:, 1:] != neg[:, :-1]).sum(dim=1) if length > 1 else torch.zeros(channels, dtype=torch.int64)
    bad = torch.nonzero(changes > 1).flatten()
    if bad.numel():
        c = int(bad[0])
        switches = (torch.nonzero(neg[c, 1:] != neg[c, :-1]).flatten() + low + 1).tolist()[:8]
        raise ValueError(
            f"sign decision of channel {c} is not monotone in the integer accumulator "
            f"(switches at acc = {switches}); cannot fold it into an integer threshold"
        )
    first_negative = neg[:, 0].bool()
    always = count == length
    never = count == 0
    # direction +1: negative for acc < thr; thr = low + count (the first non-negative value)
    # direction -1: negative for acc > thr; thr = high - count (the last non-negative value)
    thr_up = low + count
    thr_down = high - count
    direction = torch.where(first_negative | always | never, 1, -1)
    threshold = torch.where(direction == 1, thr_up, thr_down)
    threshold = torch.where(always, high + 1, threshold)
    threshold = torch.where(never, low - 1, threshold)
    return Thresholds(threshold.to(torch.int32), direction.to(torch.int32))


def integer_thresholds(
    pre_sign: Callable[[torch.Tensor], torch.Tensor],
    channels: int,
    bound: int,
    *,
    layout: str = "nchw",
    dtype: torch.dtype = torch.float32,
) -> Thresholds:
    """Derive thresholds by running ``pre_sign`` on every integer accumulator value.

    ``pre_sign`` receives the accumulator values as a float tensor (``dtype``) laid out
    as the model lays out the layer's output, so that the same torch kernels run:

    - ``layout="nchw"``: shape ``[1, C, 1, 2K+1]`` (a conv output; channel dim 1);
    - ``layout="nc"``: shape ``[2K+1, C]`` (a linear output);

    and must return the float values the model feeds to ``sign`` in the same shape.
    ``bound`` is ``K``: every channel is evaluated on ``acc = -K, ..., K``.
    """
    if bound < 0:
        raise ValueError(f"integer_thresholds: bound must be >= 0, got {bound}")
    values = torch.arange(-bound, bound + 1, dtype=torch.int64).to(dtype)
    length = values.numel()
    with torch.no_grad():
        if layout == "nchw":
            acc = values.view(1, 1, 1, length).expand(1, channels, 1, length).contiguous()
            y = pre_sign(acc)
            if tuple(y.shape) != (1, channels, 1, length):
                raise ValueError(f"integer_thresholds: pre_sign changed the shape {list(acc.shape)} -> {list(y.shape)}")
            negative = (y < 0).reshape(channels, length)
        elif layout == "nc":
            acc = values.view(length, 1).expand(length, channels).contiguous()
            y = pre_sign(acc)
            if tuple(y.shape) != (length, channels):
                raise ValueError(f"integer_thresholds: pre_sign changed the shape {list(acc.shape)} -> {list(y.shape)}")
            negative = (y < 0).t()
        else:
            raise ValueError(f"integer_thresholds: layout must be 'nchw' or 'nc', got {layout!r}")
    return thresholds_from_decisions(negative.contiguous(), -bound)


def batchnorm_sign_thresholds(
    bn: nn.Module,
    bound: int,
    *,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> Thresholds:
    """Thresholds of ``sign(bn(acc * scale + bias))`` for an eval-mode BatchNorm1d/2d.

    ``scale`` (e.g. a magnitude-aware alpha per output channel) and ``bias`` (a conv or
    linear bias) are optional per-channel float32 vectors, applied in that order, as the
    packed engine applies them. ``bn`` may also be ``None`` (sign of the affine map only).
    """
    channels = None
    if bn is not None:
        if not isinstance(bn, BATCHNORMS):
            raise TypeError(f"batchnorm_sign_thresholds: expected a BatchNorm module, got {type(bn).__name__}")
        channels = bn.num_features
    for v in (scale, bias):
        if v is not None:
            channels = v.numel() if channels is None else channels
            if v.numel() != channels:
                raise ValueError(f"batchnorm_sign_thresholds: expected {channels} per-channel values, got {v.numel()}")
    if channels is None:
        raise ValueError("batchnorm_sign_thresholds: give at least one of bn, scale, bias")
    layout = "nc" if isinstance(bn, nn.BatchNorm1d) else "nchw"
    shape = (1, channels) if layout == "nc" else (1, channels, 1, 1)

    def pre_sign(acc: torch.Tensor) -> torch.Tensor:
        y = acc
        if scale is not None:
            y = y * scale.detach().to(acc.dtype).view(shape)
        if bias is not None:
            y = y + bias.detach().to(acc.dtype).view(shape)
        if bn is not None:
            y = eval_batch_norm(bn, y)
        return y

    return integer_thresholds(pre_sign, channels, bound, layout=layout)


def eval_batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` in eval mode (running statistics), whatever mode ``bn`` is in."""
    return F.batch_norm(
        x,
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        False,
        0.0,
        bn.eps,
    )
