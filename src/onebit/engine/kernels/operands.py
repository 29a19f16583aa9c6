"""The tensors a native call reads and writes: addresses of checked operands, outputs in channels_last memory.

A native kernel takes raw addresses. Each operand is accepted by a quick test of the common case
(a plain, contiguous CPU tensor of the expected dtype and shape) and otherwise by the argument check
of :mod:`onebit.engine.geometry`, which raises its ``ValueError`` naming the problem.
"""

from __future__ import annotations

import torch

from onebit.engine.geometry import check_epilogue, check_per_channel, check_residual
from onebit.engine.kernels.memory_formats import relayout

__all__ = [
    "channel_ptr",
    "epilogue_ptrs",
    "residual_operand",
    "channels_last_strides",
    "empty_nchw_channels_last",
]

_F32 = torch.float32
_CHANNELS_LAST = torch.channels_last


def channel_ptr(t, name: str, dtype: torch.dtype, channels: int) -> int:
    """``data_ptr`` of an optional per-channel tensor ``[channels]`` of ``dtype``, after checking it (0 for None)."""
    if t is None:
        return 0
    if not (
        type(t) is torch.Tensor
        and t.dtype is dtype
        and t.is_cpu
        and t.dim() == 1
        and t.shape[0] == channels
        and t.is_contiguous()
    ):
        check_per_channel(t, name, dtype, channels)
    return t.data_ptr()


def epilogue_ptrs(channels: int, scale, bias, bn_scale, bn_shift, bn_fma) -> tuple[int, int, tuple[int, int, bool]]:
    """``(scale, bias, (bn_scale, bn_shift, bn_fma))`` addresses of a float output's epilogue
    ``(acc * scale + bias) * bn_scale + bn_shift`` (see :func:`onebit.engine.geometry.check_epilogue`)."""
    if (bn_scale is None) != (bn_shift is None) or type(bn_fma) is not bool:
        check_epilogue(channels, scale, bias, bn_scale, bn_shift, bn_fma)
    return (
        channel_ptr(scale, "scale", _F32, channels),
        channel_ptr(bias, "bias", _F32, channels),
        (channel_ptr(bn_scale, "bn_scale", _F32, channels), channel_ptr(bn_shift, "bn_shift", _F32, channels), bn_fma),
    )


def residual_operand(residual, out: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """``(residual, nchw)``: ``residual`` (checked against ``out``) as the kernel reads it, in channels_last
    memory or, with ``nchw``, in NCHW memory (transposed a run of pixels at a time inside the call); other
    strides copied to channels_last."""
    if residual is None:
        return None, False
    if not (
        type(residual) is torch.Tensor and residual.dtype is _F32 and residual.is_cpu and residual.shape == out.shape
    ):
        check_residual(residual, out.shape)
    if residual.is_contiguous(memory_format=_CHANNELS_LAST):
        return residual, False
    if residual.is_contiguous():
        return residual, True
    return relayout(residual, _CHANNELS_LAST), False


def channels_last_strides(n: int, c: int, h: int, w: int) -> tuple[int, int, int, int]:
    """The strides of ``[N, C, H, W]`` in channels_last memory."""
    if c == 1:  # the same memory as NCHW: say so, or torch's next op may pick a channels_last kernel
        return (h * w, h * w, w, 1)
    return (h * w * c, 1, w * c, c)


def empty_nchw_channels_last(n: int, c: int, h: int, w: int, dtype: torch.dtype, like=None) -> torch.Tensor:
    """``[N, C, H, W]`` in channels_last memory, with the same strides for real and fake tensors."""
    stride = channels_last_strides(n, c, h, w)
    if like is not None:
        return like.new_empty_strided((n, c, h, w), stride, dtype=dtype)
    return torch.empty_strided((n, c, h, w), stride, dtype=dtype)
