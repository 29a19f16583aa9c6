"""Validated calls kept by shape: a native plan per convolution, the numbers of a packing.

A call whose shapes, dtypes and arguments were seen before skips the argument check of
:mod:`onebit.engine.geometry`: it only re-checks dtypes, devices and contiguity (the key).
Each cache holds at most :data:`CACHE_SIZE` entries and is emptied when full.
"""

from __future__ import annotations

import atexit

import torch

from onebit import _C
from onebit.engine.geometry import (
    check_combine_planes,
    check_conv,
    check_integer_planes,
    check_pack,
    check_threshold_output,
)
from onebit.engine.kernels.operands import channels_last_strides

__all__ = [
    "MODE_INT",
    "MODE_FLOAT",
    "MODE_THRESHOLD",
    "ConvPlan",
    "conv_plan",
    "pack_plan",
    "PACK_PLANS",
    "integer_planes_plan",
    "combine_planes_plan",
    "CACHE_SIZE",
]

#: a convolution's output: the int32 accumulators, float32 with its epilogue, or thresholded packed bits
MODE_INT, MODE_FLOAT, MODE_THRESHOLD = 0, 1, 2
CACHE_SIZE = 1024
_CONV_PLANS: dict = {}
#: (shape, strides, padding, pad_value, groups) of a float32 CPU input -> :func:`pack_plan`'s entry
PACK_PLANS: dict = {}
_PLANES_PLANS: dict = {}
_COMBINE_PLANS: dict = {}
_I64, _I32, _F32 = torch.int64, torch.int32, torch.float32


@atexit.register
def _clear_caches() -> None:  # native plans are freed before the extension goes away
    for cache in (_CONV_PLANS, PACK_PLANS, _PLANES_PLANS, _COMBINE_PLANS):
        cache.clear()


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


def pack_plan(x, padding, pad_value, groups, key=None) -> tuple:
    """``(output shape, numbers of the native call, copy)`` of packing float32 ``x`` (checked: ``ValueError``),
    kept in :data:`PACK_PLANS` under ``key`` (the caller's lookup missed); ``copy``: ``x`` is read from a
    contiguous copy (neither its channels nor its pixels are contiguous)."""
    shape, ph, pw, pad, g = check_pack(x, padding, pad_value, groups)
    n, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    # Neither channels nor pixels contiguous: torch's copy to NCHW beats a strided gather.
    copy = sc != 1 and sw != 1 and c > 1 and w > 1
    if copy:
        sn, sc, sh, sw = c * h * w, h * w, w, 1
    entry = (shape, (n, c, h, w, sn, sc, sh, sw, ph, pw, pad, g), copy)
    if key is not None:
        _store(PACK_PLANS, key, entry)
    return entry


def _cached(cache: dict, key, check, *args):
    """``check(*args)`` (raising ``ValueError``), kept in ``cache`` under ``key`` (None: not kept)."""
    if key is not None:
        try:
            entry = cache.get(key)
        except TypeError:  # unhashable: the check says what is wrong
            key = entry = None
        if entry is not None:
            return entry
    entry = check(*args)
    if key is not None:
        _store(cache, key, entry)
    return entry


def integer_planes_plan(x, padding, groups, bits, symmetric, clip) -> tuple:
    """:func:`~onebit.engine.geometry.check_integer_planes` of this call, kept by shape."""
    key = None
    if type(x) is torch.Tensor and x.dtype is _F32 and x.is_cpu:
        key = (x.shape, tuple(padding) if type(padding) is list else padding, groups, bits, symmetric, clip)
    return _cached(_PLANES_PLANS, key, check_integer_planes, x, padding, groups, bits, symmetric, clip)


def _combine_planes_output(y, coeff, act_planes, groups, weight_planes, exact_divisor) -> tuple:
    shape = check_combine_planes(y, coeff, act_planes, groups, weight_planes, exact_divisor)
    return shape, channels_last_strides(*shape)


def combine_planes_plan(y, coeff, act_planes, groups, weight_planes, exact_divisor) -> tuple:
    """``(shape, strides)`` of the channels_last output of combining bit planes (checked by
    :func:`~onebit.engine.geometry.check_combine_planes`), kept by shape and strides."""
    key = None
    if (
        type(y) is torch.Tensor
        and type(coeff) is torch.Tensor
        and y.dtype is _I32
        and coeff.dtype is _I32
        and y.is_cpu
        and coeff.is_cpu
        and coeff.is_contiguous()
    ):
        key = (y.shape, y.stride(), coeff.shape, act_planes, groups, weight_planes, exact_divisor)
    return _cached(
        _COMBINE_PLANS, key, _combine_planes_output, y, coeff, act_planes, groups, weight_planes, exact_divisor
    )
