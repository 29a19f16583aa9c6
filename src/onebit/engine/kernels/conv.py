"""Native binary convolutions: int32 accumulators, a float32 epilogue, or thresholded packed bits.

``acc[n, co, oh, ow] = sum over taps and the group's input channels of sign(x) * sign(w)``, each
padded tap worth ``pad_value``. Three custom ops (``onebit::binary_conv2d_int``, ``binary_conv2d``,
``binary_conv2d_threshold``) take the convolution's arguments positionally (:data:`CONV_SCHEMA`), then
their own; internally they travel as one tuple ``conv`` = (in_channels, out_channels, kernel_size,
stride, padding, dilation, groups, pad_value), checked once per shape by :func:`plans.conv_plan`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from onebit.engine.geometry import (
    ConvCall,
    ConvSpec,
    check_conv,
    check_conv_epilogue,
    check_per_channel,
    check_threshold_output,
    check_thresholds,
    pair,
)
from onebit.engine.kernels.operands import channel_ptr, empty_nchw_channels_last, epilogue_ptrs, residual_operand
from onebit.engine.kernels.plans import MODE_FLOAT, MODE_INT, MODE_THRESHOLD, conv_plan
from onebit.engine.kernels.registry import custom_op, direct
from onebit.engine.kernels.weight_cache import WeightCache, cache_state

__all__ = ["CONV_SCHEMA", "binary_conv2d_int", "binary_conv2d", "binary_conv2d_threshold", "run_native"]

#: the arguments every binary convolution op starts with (its schema; ``ConvSpec.op_args`` gives them)
CONV_SCHEMA = (
    "Tensor xp, Tensor wp, SymInt in_channels, SymInt out_channels, SymInt[] kernel_size, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, SymInt groups, float pad_value"
)
_I32, _I64, _I8, _F32 = torch.int32, torch.int64, torch.int8, torch.float32
_get_num_threads = torch.get_num_threads
_NO_BATCHNORM = (0, 0, False)


def run_native(
    plan,
    x,
    w_ptr: int,
    out_ptr: int,
    channel_ptrs: tuple,
    cache,
    version: int,
    residual_ptr: int,
    bn,
    out_nchw=False,
    residual_nchw=False,
):
    """Run ``plan`` on packed ``x``, or on float32 ``x`` packed in the same pass. The addresses of the
    weights, the output and the per-channel tensors ``(scale, bias, thresholds, direction)`` are
    taken and checked; ``bn``: ``(bn_scale, bn_shift, bn_fma)``; ``out_nchw`` / ``residual_nchw``: a float32
    output / residual in NCHW memory instead of channels_last."""
    layouts = (out_nchw, residual_nchw)
    args = (w_ptr, out_ptr, *channel_ptrs, _get_num_threads(), cache, version, residual_ptr, *bn, *layouts)
    if x.dtype is _I64:
        plan.native.run(x.data_ptr(), *args)
        return
    _, c, _, w = x.shape
    sn, sc, sh, sw = x.stride()
    if sc != 1 and sw != 1 and c > 1 and w > 1:  # neither channels nor pixels contiguous
        x = x.contiguous()
        sn, sc, sh, sw = x.stride()
    plan.native.run_float(x.data_ptr(), sn, sc, sh, sw, *args)


def _run(
    plan, x, wp, out, channel_ptrs=(0, 0, 0, 0), cache=None, residual_ptr=0, bn=_NO_BATCHNORM, residual_nchw=False
) -> None:
    cache, version = cache_state(cache, wp)
    run_native(
        plan, x, wp.data_ptr(), out.data_ptr(), channel_ptrs, cache, version, residual_ptr, bn, False, residual_nchw
    )


def _conv_int_impl(xp, wp, conv, cache=None):
    plan = conv_plan(MODE_INT, xp, wp, *conv)
    out = torch.empty_strided(plan.shape, plan.stride, dtype=_I32)
    if out.numel():
        _run(plan, xp, wp, out, cache=cache)
    return out


def _conv_float_impl(
    xp, wp, conv, scale=None, bias=None, residual=None, cache=None, bn_scale=None, bn_shift=None, bn_fma=False
):
    plan = conv_plan(MODE_FLOAT, xp, wp, *conv)
    scale_ptr, bias_ptr, bn = epilogue_ptrs(plan.co, scale, bias, bn_scale, bn_shift, bn_fma)
    out = torch.empty_strided(plan.shape, plan.stride, dtype=_F32)
    residual, residual_nchw = residual_operand(residual, out)
    if out.numel():
        residual_ptr = residual.data_ptr() if residual is not None else 0
        _run(plan, xp, wp, out, (scale_ptr, bias_ptr, 0, 0), cache, residual_ptr, bn, residual_nchw)
    return out


def _conv_threshold_impl(xp, wp, conv, thresholds, direction, out_padding, out_pad_value, out_groups, cache=None):
    plan = conv_plan(MODE_THRESHOLD, xp, wp, *conv, out_padding, out_pad_value, out_groups)
    thr_ptr = channel_ptr(thresholds, "thresholds", _I32, plan.co)
    dir_ptr = channel_ptr(direction, "direction", _I8, plan.co)
    if not thr_ptr or not dir_ptr:
        raise ValueError("thresholds and direction are required")
    out = torch.empty(plan.shape, dtype=_I64)
    if out.numel():
        _run(plan, xp, wp, out, (0, 0, thr_ptr, dir_ptr), cache)
    return out


def _conv_int_fake(xp, wp, *conv):
    call = check_conv(xp, wp, *conv)
    return empty_nchw_channels_last(*call.output_shape, _I32, like=xp)


def _conv_float_fake(xp, wp, *args):
    call = check_conv(xp, wp, *args[:8])
    check_conv_epilogue(call, *args[8:])
    return empty_nchw_channels_last(*call.output_shape, _F32, like=xp)


def _conv_threshold_fake(xp, wp, *args):
    call: ConvCall = check_conv(xp, wp, *args[:8])
    thresholds, direction, out_padding, out_pad_value, out_groups = args[8:]
    shape, *_ = check_threshold_output(call, out_padding, out_pad_value, out_groups)
    check_per_channel(thresholds, "thresholds", _I32, call.spec.out_channels)
    check_per_channel(direction, "direction", _I8, call.spec.out_channels)
    return xp.new_empty(shape, dtype=_I64)


custom_op(
    "binary_conv2d_int",
    f"({CONV_SCHEMA}) -> Tensor",
    lambda xp, wp, *conv: _conv_int_impl(xp, wp, conv),
    _conv_int_fake,
)
custom_op(
    "binary_conv2d",
    f"({CONV_SCHEMA}, Tensor? scale, Tensor? bias, Tensor? residual=None, Tensor? bn_scale=None, "
    "Tensor? bn_shift=None, bool bn_fma=False) -> Tensor",
    lambda xp, wp, *args: _conv_float_impl(xp, wp, args[:8], *args[8:11], None, *args[11:]),
    _conv_float_fake,
)
custom_op(
    "binary_conv2d_threshold",
    f"({CONV_SCHEMA}, Tensor thresholds, Tensor direction, SymInt[] out_padding, float out_pad_value, "
    "SymInt out_groups) -> Tensor",
    lambda xp, wp, *args: _conv_threshold_impl(xp, wp, args[:8], *args[8:]),
    _conv_threshold_fake,
)


def _op_args(conv) -> tuple:
    """The convolution's arguments as the custom ops take them (checked: the same errors as the kernels)."""
    return ConvSpec.check(*conv).op_args()


def binary_conv2d_int(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    pad_value: float = 0.0,
    cache: WeightCache | None = None,
) -> torch.Tensor:
    """Exact integer binary convolution: int32 ``[N, C_out, OH, OW]`` (channels_last memory).

    ``acc[n, co, oh, ow] = sum over taps and the group's input channels of sign(x) * sign(w)``,
    with padded taps worth ``pad_value`` (0, +1 or -1). ``xp`` is already padded by
    ``padding`` (see :func:`~onebit.engine.kernels.pack_activations`), packed for ``groups``; or it is
    the float32 ``[N, C_in, H, W]`` input itself (any strides), packed inside the same native call
    (one pass over the threads; equal to packing first).

    ``cache``: a :class:`WeightCache` the caller keeps for this layer. The weights, once
    prepared in the kernel's own layout, are reused by later calls as long as ``wp`` is
    the same tensor with no write to it since (see :class:`WeightCache` for exactly which
    writes are seen); the caller keeps ``wp`` alive while the cache is in use. Without it
    the weights are prepared on every call.
    """
    conv = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pad_value)
    if direct(xp, wp):
        return _conv_int_impl(xp, wp, conv, cache)
    return torch.ops.onebit.binary_conv2d_int(xp, wp, *_op_args(conv))


def binary_conv2d(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    pad_value: float = 0.0,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    cache: WeightCache | None = None,
    bn_scale: torch.Tensor | None = None,
    bn_shift: torch.Tensor | None = None,
    bn_fma: bool = False,
) -> torch.Tensor:
    """float32 ``[N, C_out, OH, OW]`` (channels_last memory) ``= acc * scale[c] + bias[c] + residual``.

    ``acc`` as in :func:`binary_conv2d_int`; ``scale`` and ``bias`` are optional float32
    ``[C_out]``, ``residual`` an optional float32 tensor of the output's shape (a shortcut,
    read best in channels_last memory), applied in that order as float32 roundings (no FMA),
    bit for bit like ``acc.float() * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1) +
    residual``. ``xp`` and ``cache`` as in :func:`binary_conv2d_int`.

    ``bn_scale`` / ``bn_shift`` (float32 ``[C_out]``, together) apply a BatchNorm in eval mode
    before the residual: ``y * bn_scale[c] + bn_shift[c]`` rounded once (``bn_fma=True``, a fused
    multiply-add, as torch's vectorized CPU BatchNorm) or twice (``bn_fma=False``).
    """
    conv = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pad_value)
    if direct(xp, wp, scale, bias, residual, bn_scale, bn_shift):
        return _conv_float_impl(xp, wp, conv, scale, bias, residual, cache, bn_scale, bn_shift, bn_fma)
    return torch.ops.onebit.binary_conv2d(xp, wp, *_op_args(conv), scale, bias, residual, bn_scale, bn_shift, bn_fma)


def binary_conv2d_threshold(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    pad_value: float = 0.0,
    thresholds: torch.Tensor,
    direction: torch.Tensor,
    out_padding: int | Sequence[int] = 0,
    out_pad_value: float = 0.0,
    out_groups: int = 1,
    cache: WeightCache | None = None,
) -> torch.Tensor:
    """Binary conv thresholded straight into the next layer's packed, padded input.

    Returns int64 ``[N, OH + 2 oph, OW + 2 opw, out_groups, ceil((C_out / out_groups) / 64)]``:
    channel ``c``'s bit is set (-1) iff ``acc < thresholds[c]`` when ``direction[c] == +1``,
    iff ``acc > thresholds[c]`` when ``direction[c] == -1``. ``thresholds`` and ``direction``
    ``[C_out]`` as :func:`onebit.engine.geometry.check_thresholds` takes them (int32 and int8, or
    other integers; a bool direction is "negate above": True = -1). The border is filled as
    :func:`~onebit.engine.kernels.pack_activations` fills it for ``out_pad_value``.
    ``xp`` and ``cache`` as in :func:`binary_conv2d_int`.
    """
    # an int8 direction's values are checked by the kernel as it reads them
    thresholds, direction = check_thresholds(thresholds, direction, values=False)
    conv = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pad_value)
    if direct(xp, wp, thresholds, direction):
        return _conv_threshold_impl(xp, wp, conv, thresholds, direction, out_padding, out_pad_value, out_groups, cache)
    out_padding = list(pair(out_padding, "out_padding"))
    return torch.ops.onebit.binary_conv2d_threshold(
        xp, wp, *_op_args(conv), thresholds, direction, out_padding, float(out_pad_value), out_groups
    )
