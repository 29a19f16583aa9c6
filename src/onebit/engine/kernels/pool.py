"""Native max pooling: of thresholded accumulators on their packed bits (custom op ``onebit::max_pool_bits``),
and of float32 maps into channels_last memory (:func:`max_pool2d`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from onebit import _C
from onebit.engine import reference
from onebit.engine.geometry import check_max_pool2d, check_pool_bits, pair
from onebit.engine.kernels.operands import channel_ptr
from onebit.engine.kernels.registry import custom_op, direct

__all__ = ["max_pool2d", "max_pool_bits", "MaxPoolBitsLayer"]


def _max_pool_bits_impl(
    xp, or_mask, pad_words, kernel_size, stride, padding, dilation, ceil_mode, out_padding, channels
):
    shape, numbers = check_pool_bits(
        xp, or_mask, pad_words, kernel_size, stride, padding, dilation, ceil_mode, out_padding, channels
    )
    xp, or_mask, pad_words = xp.contiguous(), or_mask.contiguous(), pad_words.contiguous()
    out = torch.empty(shape, dtype=torch.int64)
    if out.numel():
        _C.max_pool_bits_raw(xp.data_ptr(), or_mask.data_ptr(), pad_words.data_ptr(), out.data_ptr(), *numbers)
    return out


def _max_pool_bits_fake(xp, or_mask, pad_words, *args):
    shape, *_ = check_pool_bits(xp, or_mask, pad_words, *args)
    return xp.new_empty(shape, dtype=torch.int64)


custom_op(
    "max_pool_bits",
    "(Tensor xp, Tensor or_mask, Tensor pad_words, SymInt[] kernel_size, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation, bool ceil_mode, SymInt[] out_padding, SymInt channels) -> Tensor",
    _max_pool_bits_impl,
    _max_pool_bits_fake,
)


def max_pool_bits(
    xp: torch.Tensor,
    or_mask: torch.Tensor,
    pad_words: torch.Tensor,
    *,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    ceil_mode: bool,
    out_padding: int | Sequence[int],
    channels: int,
) -> torch.Tensor:
    """Max pooling of thresholded accumulators on their packed bits ``[N, H, W, G, Wg]``: the AND of
    the window's bits for direction +1, the OR for direction -1 (bits set in ``or_mask [G, Wg]``);
    padded window positions take no part; ``out_padding`` border pixels are ``pad_words [G, Wg]``.
    Bit for bit :func:`onebit.engine.reference.max_pool_bits`, in one native loop."""
    args = (xp, or_mask, pad_words, kernel_size, stride, padding, dilation, bool(ceil_mode), out_padding, int(channels))
    if direct(xp, or_mask, pad_words):
        return _max_pool_bits_impl(*args)
    pairs = [
        list(pair(v, name))
        for v, name in ((kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation"))
    ]
    return torch.ops.onebit.max_pool_bits(
        xp, or_mask, pad_words, *pairs, bool(ceil_mode), list(pair(out_padding, "out_padding")), int(channels)
    )


class MaxPoolBitsLayer:
    """:func:`max_pool_bits` with its operands bound: ``layer(xp)`` is ``max_pool_bits(xp, or_mask, pad_words,
    **pool)``, bit for bit. The pooling's numbers are checked once per input shape, not per call (a packed
    model's pool steps); under tracing, with tensor subclasses or on anything unusual a call takes
    :func:`max_pool_bits` itself. ``or_mask`` and ``pad_words`` (contiguous ones: others are copied here) may be
    written, not resized or replaced."""

    __slots__ = ("or_mask", "pad_words", "pool", "_ptrs", "_plans")

    def __init__(self, or_mask: torch.Tensor, pad_words: torch.Tensor, **pool):
        self.or_mask, self.pad_words = or_mask.contiguous(), pad_words.contiguous()
        self.pool = dict(pool, ceil_mode=bool(pool.get("ceil_mode", False)))
        self._ptrs = (self.or_mask.data_ptr(), self.pad_words.data_ptr())
        self._plans: dict = {}  # an input's shape -> (output shape, the kernel's numbers)

    def __call__(self, xp: torch.Tensor) -> torch.Tensor:
        plain = type(xp) is torch.Tensor and xp.dtype is torch.int64 and xp.is_cpu and xp.is_contiguous()
        if not (plain and direct(xp, self.or_mask, self.pad_words)):
            return max_pool_bits(xp, self.or_mask, self.pad_words, **self.pool)
        plan = self._plans.get(xp.shape)
        if plan is None:
            p = self.pool
            plan = check_pool_bits(
                xp, self.or_mask, self.pad_words, p["kernel_size"], p["stride"], p["padding"], p["dilation"],
                p["ceil_mode"], p["out_padding"], p["channels"],
            )  # fmt: skip
            if len(self._plans) < 8:
                self._plans[xp.shape] = plan
        shape, numbers = plan
        out = torch.empty(shape, dtype=torch.int64)
        if out.numel():
            _C.max_pool_bits_raw(xp.data_ptr(), *self._ptrs, out.data_ptr(), *numbers)
        return out


#: below this many input elements torch's pool (of a channels_last copy) is quicker than the native call
NATIVE_POOL_MIN_ELEMENTS = 2048


def max_pool2d(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    bn=None,
) -> torch.Tensor:
    """torch's ``max_pool2d`` of float32 ``x [N, C, H, W]`` (NCHW or channels_last), bit for bit, returned
    in channels_last memory: ``out[n, c, i, j]`` is the first of the window's largest values in (kh, kw)
    order, or its last NaN; padding takes no part. ``bn = (bn_scale, bn_shift, fma)``: the pool of the
    BatchNorm ``x * bn_scale + bn_shift`` (rounded once with ``fma``, else twice) instead, which the
    kernel applies after pooling ``x`` (the max where ``bn_scale > 0``, the min where ``< 0``): exact where
    ``graph.floats.batchnorm_before_pool`` says so.

    Eager plain tensors with channels_last or NCHW rows take the native kernel (an NCHW input is read
    in place, a block of channels at a time); under tracing, for autograd, small tensors or other
    strides, torch pools a channels_last copy (after the BatchNorm)."""
    shape, numbers = check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    if (
        not direct(x)
        or x.numel() < NATIVE_POOL_MIN_ELEMENTS
        or (x.requires_grad and torch.is_grad_enabled())
        or (x.stride(1) != 1 and x.stride(3) != 1)
    ):
        if bn is not None:
            x = reference.batch_norm_epilogue(x, *bn)
        return F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding, dilation, ceil_mode=ceil_mode
        )
    out = torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last)
    channels = x.shape[1]
    bn_args = (
        ()
        if bn is None
        else (
            channel_ptr(bn[0], "bn_scale", torch.float32, channels),
            channel_ptr(bn[1], "bn_shift", torch.float32, channels),
            bool(bn[2]),
        )
    )
    _C.max_pool2d_raw(x.data_ptr(), out.data_ptr(), *numbers, *x.stride(), torch.get_num_threads(), *bn_args)
    return out
