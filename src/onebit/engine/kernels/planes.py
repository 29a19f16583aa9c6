"""Native bit planes of k-bit activations (:mod:`onebit.engine.bitplanes`): the planes packed, their pairs combined.

Custom ops ``onebit::pack_integer_planes`` (a k-bit quantizer's level indices as +-1 bit planes, see
``csrc/kernels/bitplanes.h``) and ``onebit::combine_planes`` (the stacked bit-plane conv's plane
pairs summed with their coefficients, then ``/ divisor * scale + bias``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from onebit import _C
from onebit.engine.geometry import check_combine_planes, check_integer_planes
from onebit.engine.kernels.operands import channel_ptr, empty_nchw_channels_last
from onebit.engine.kernels.plans import combine_planes_plan, integer_planes_plan
from onebit.engine.kernels.registry import custom_op, direct

__all__ = ["pack_integer_planes", "pack_integer_planes_nan", "combine_planes"]

_I32, _F32 = torch.int32, torch.float32


def _pack_integer_planes_nan(x, padding, groups, symmetric, bits, clip) -> tuple[torch.Tensor, bool]:
    shape, ph, pw = integer_planes_plan(x, padding, groups, bits, symmetric, clip)
    n, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    if sc != 1 and sw != 1 and c > 1 and w > 1:  # neither channels nor pixels contiguous
        x = x.contiguous()
        sn, sc, sh, sw = x.stride()
    out = torch.empty(shape, dtype=torch.int64)
    nan = False
    if out.numel():
        nan = _C.pack_integer_planes_raw(
            x.data_ptr(),
            n,
            c,
            h,
            w,
            sn,
            sc,
            sh,
            sw,
            ph,
            pw,
            groups,
            symmetric,
            bits,
            float(clip),
            out.data_ptr(),
            torch.get_num_threads(),
        )
    return out, bool(nan)


def _pack_integer_planes_impl(x, padding, groups, symmetric, bits, clip):
    return _pack_integer_planes_nan(x, padding, groups, symmetric, bits, clip)[0]


def _pack_integer_planes_fake(x, padding, groups, symmetric, bits, clip):
    shape, *_ = check_integer_planes(x, padding, groups, bits, symmetric, clip)
    return x.new_empty(shape, dtype=torch.int64)


custom_op(
    "pack_integer_planes",
    "(Tensor x, SymInt[] padding, SymInt groups, bool symmetric, int bits, float clip) -> Tensor",
    _pack_integer_planes_impl,
    _pack_integer_planes_fake,
)


def pack_integer_planes(
    x: torch.Tensor, padding: Sequence[int], groups: int, *, symmetric: bool, bits: int, clip: float = 1.0
) -> torch.Tensor:
    """float32 ``[N, C, H, W]`` -> int64 ``[N, H + 2 ph, W + 2 pw, bits * G, Wg]``: the +-1 bit planes
    of the input quantizer's level indices (``dorefa``: ``round(clamp(x, 0, 1) n)``; ``dorefa_sym``:
    ``floor((clamp(x, -c, c) / c + 1) / 2 n + 1/2)``), group ``i * G + g`` holding plane ``i`` of
    group ``g``; padded with each code's zero (see ``csrc/kernels/bitplanes.h``)."""
    if direct(x):
        return _pack_integer_planes_impl(x, list(padding), groups, symmetric, bits, clip)
    return torch.ops.onebit.pack_integer_planes(x, list(padding), groups, symmetric, bits, float(clip))


def pack_integer_planes_nan(
    x: torch.Tensor, padding: Sequence[int], groups: int, *, symmetric: bool, bits: int, clip: float = 1.0
) -> tuple[torch.Tensor, bool | None]:
    """:func:`pack_integer_planes` and whether ``x`` holds a NaN (seen by the kernel in its one pass
    over ``x``, at no extra cost), or None under tracing (unknown: assume it may)."""
    if direct(x):
        return _pack_integer_planes_nan(x, list(padding), groups, symmetric, bits, clip)
    return torch.ops.onebit.pack_integer_planes(x, list(padding), groups, symmetric, bits, float(clip)), None


def _combine_planes_impl(y, coeff, offset, act_planes, groups, weight_planes, exact_divisor, divisor, scale, bias):
    shape, stride = combine_planes_plan(y, coeff, act_planes, groups, weight_planes, exact_divisor)
    n, co, oh, ow = shape
    offset_ptr = channel_ptr(offset, "offset", _I32, co)
    scale_ptr = channel_ptr(scale, "scale", _F32, co)
    bias_ptr = channel_ptr(bias, "bias", _F32, co)
    out = torch.empty_strided(shape, stride, dtype=_F32)
    pixels = n * oh * ow
    if pixels:
        _C.combine_planes_raw(
            y.data_ptr(),
            pixels,
            act_planes,
            groups,
            weight_planes,
            co // groups,
            coeff.data_ptr(),
            offset_ptr,
            exact_divisor,
            divisor,
            scale_ptr,
            bias_ptr,
            out.data_ptr(),
            torch.get_num_threads(),
        )
    return out


def _combine_planes_fake(y, coeff, offset, act_planes, groups, weight_planes, exact_divisor, divisor, scale, bias):
    shape = check_combine_planes(y, coeff, act_planes, groups, weight_planes, exact_divisor)
    return empty_nchw_channels_last(*shape, _F32, like=y)


custom_op(
    "combine_planes",
    "(Tensor y, Tensor coeff, Tensor? offset, int act_planes, int groups, int weight_planes, int exact_divisor, "
    "float divisor, Tensor? scale, Tensor? bias) -> Tensor",
    _combine_planes_impl,
    _combine_planes_fake,
)


def combine_planes(
    y: torch.Tensor,
    coeff: torch.Tensor,
    offset: torch.Tensor | None,
    *,
    act_planes: int,
    groups: int,
    weight_planes: int,
    exact_divisor: int,
    divisor: float,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The stacked bit-plane conv's int32 output (channels_last ``[N, P_a G P_w Cog, OH, OW]``) ->
    float32 ``[N, G Cog, OH, OW]`` (channels_last): ``(sum_ij coeff[i, j] y_ij + offset) / exact_divisor``
    (exact), then ``/ divisor``, ``* scale``, ``+ bias`` as three float32 roundings."""
    args = (act_planes, groups, weight_planes, int(exact_divisor), float(divisor), scale, bias)
    if direct(y, coeff, offset, scale, bias):
        return _combine_planes_impl(y, coeff, offset, *args)
    return torch.ops.onebit.combine_planes(y, coeff, offset, *args)
