"""Validated calls kept by shape: a native plan per convolution, the numbers of a packing.

A call whose shapes, dtypes and arguments were seen before skips the argument check of
:mod:`onebit.engine.geometry`: it only re-checks dtypes, devices and contiguity (the key).
Each cache holds at most :data:`CACHE_SIZE` entries and is emptied when full.
"""

from __future__ import annotations

import atexit

import torch

from onebit import _C
from onebit.engine.geometry import check_conv, check_pack, check_threshold_output
from onebit.engine.kernels.operands import channels_last_strides

__all__ = ["MODE_INT", "MODE_FLOAT", "MODE_THRESHOLD", "ConvPlan", "conv_plan", "pack_plan", "CACHE_SIZE"]

#: a convolution's output: the int32 accumulators, float32 with its epilogue, or thresholded packed bits
MODE_INT, MODE_FLOAT, MODE_THRESHOLD = 0, 1, 2
CACHE_SIZE = 1024
_CONV_PLANS: dict = {}
_PACK_PLANS: dict = {}
_I64, _F32 = torch.int64, torch.float32


@atexit.register
def _clear_caches() -> None:  # native plans are freed before the extension goes away
    _CONV_PLANS.clear()
    _PACK_PLANS.clear()


def _hashable(value):
    return tuple(value) if type(value) is list else value


def _store(cache: dict, key, value) -> None:
    if len(cache) >= CACHE_SIZE:
        cache.clear()
    cache[key] = value


class ConvPlan:
    """A validated convolution of one shape: the native plan, the output shape and its strides
    (``[N, C_out, OH, OW]`` in channels_last memory, or the packed output's)."""

    __slots__ = ("native", "shape", "co", "stride")

    def __init__(self, native, shape, co):
        self.native, self.shape, self.co = native, shape, co
        self.stride = channels_last_strides(*shape) if len(shape) == 4 else None


def conv_plan(mode: int, xp, wp, *args) -> ConvPlan:
    """The plan of this call, checked (``ValueError``) but for its per-channel tensors.

    ``args``: the convolution's arguments (in_channels, out_channels, kernel_size, stride, padding,
    dilation, groups, pad_value), then for :data:`MODE_THRESHOLD` out_padding, out_pad_value, out_groups."""
    key = None
    if (
        type(xp) is torch.Tensor
        and type(wp) is torch.Tensor
        and ((xp.dtype is _I64 and xp.is_contiguous()) or (xp.dtype is _F32 and xp.dim() == 4))
        and wp.dtype is _I64
        and xp.is_cpu
        and wp.is_cpu
        and wp.is_contiguous()
    ):
        key = (mode, xp.dtype, xp.shape, wp.shape, args)
        try:
            plan = _CONV_PLANS.get(key)
        except TypeError:  # lists (or worse) inside: retry with tuples
            key = (mode, xp.dtype, xp.shape, wp.shape, tuple(_hashable(v) for v in args))
            try:
                plan = _CONV_PLANS.get(key)
            except TypeError:  # something unhashable: the checks below say what is wrong
                key = plan = None
        if plan is not None:
            return plan
    call = check_conv(xp, wp, *args[:8])
    if mode == MODE_THRESHOLD:
        shape, oph, opw, opad, og = check_threshold_output(call, *args[8:])
    else:
        shape, oph, opw, opad, og = call.output_shape, 0, 0, 0, 1
    s = call.spec
    native = _C.conv_plan(
        call.n,
        call.hp,
        call.wp,
        s.groups * s.words,
        s.words,
        s.in_channels,
        s.out_channels,
        *s.kernel,
        *s.stride,
        *s.padding,
        *s.dilation,
        s.groups,
        s.pad_code,
        mode,
        oph,
        opw,
        og,
        opad,
    )
    plan = ConvPlan(native, shape, s.out_channels)
    if key is not None:
        _store(_CONV_PLANS, key, plan)
    return plan


def pack_plan(x, padding, pad_value, groups) -> tuple:
    """``(output shape, numbers of the native call, copy)`` of packing float32 ``x`` (checked: ``ValueError``);
    ``copy``: ``x`` is read from a contiguous copy (neither its channels nor its pixels are contiguous)."""
    key = None
    if type(x) is torch.Tensor and x.dtype is _F32 and x.is_cpu:
        key = (x.shape, x.stride(), _hashable(padding), pad_value, groups)
        try:
            entry = _PACK_PLANS.get(key)
        except TypeError:
            key = entry = None
        if entry is not None:
            return entry
    shape, ph, pw, pad, g = check_pack(x, padding, pad_value, groups)
    n, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    # Neither channels nor pixels contiguous: torch's copy to NCHW beats a strided gather.
    copy = sc != 1 and sw != 1 and c > 1 and w > 1
    if copy:
        sn, sc, sh, sw = c * h * w, h * w, w, 1
    entry = (shape, (n, c, h, w, sn, sc, sh, sw, ph, pw, pad, g), copy)
    if key is not None:
        _store(_PACK_PLANS, key, entry)
    return entry
