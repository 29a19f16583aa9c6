"""Native binary convolutions with their constant operands bound: the calls a packed model's conv steps make."""

from __future__ import annotations

import torch

from onebit.engine.geometry import ConvSpec, check_conv_weight, check_thresholds
from onebit.engine.kernels.conv import binary_conv2d, binary_conv2d_threshold, run_native
from onebit.engine.kernels.operands import channel_ptr, epilogue_ptrs, residual_operand
from onebit.engine.kernels.plans import MODE_FLOAT, MODE_THRESHOLD, conv_plan
from onebit.engine.kernels.registry import direct
from onebit.engine.kernels.weight_cache import WeightCache, usable_cache

__all__ = ["ConvLayer", "ThresholdConvLayer"]

_I8, _I32, _I64, _F32 = torch.int8, torch.int32, torch.int64, torch.float32
_Tensor = torch.Tensor
_NO_BATCHNORM = (0, 0, False)


class ConvLayer:
    """A binary convolution with its constant operands bound: ``layer(x, residual=None)`` is
    ``binary_conv2d(x, wp, scale=scale, bias=bias, residual=residual, cache=cache, bn_scale=bn_scale,
    bn_shift=bn_shift, bn_fma=bn_fma, **conv)``, bit for bit.

    The weights, scale, bias and BatchNorm epilogue are checked once, here, by the checks
    :func:`binary_conv2d` makes; a call checks only its input and residual, which saves the per-call
    argument handling of a layer run many times (a packed model's steps). The bound tensors may be
    written (the weights as :class:`WeightCache` describes) but not resized or replaced. Under
    tracing, with tensor subclasses or on anything unusual a call takes :func:`binary_conv2d` itself.
    """

    __slots__ = (
        "wp",
        "scale",
        "bias",
        "bn_scale",
        "bn_shift",
        "bn_fma",
        "cache",
        "conv",
        "_kwargs",
        "_w_ptr",
        "_channel_ptrs",
        "_bn",
        "_plans",
    )

    def __init__(self, wp, *, scale=None, bias=None, bn_scale=None, bn_shift=None, bn_fma=False, cache=None, **conv):
        spec = ConvSpec.check(**conv)
        check_conv_weight(wp, spec)
        scale_ptr, bias_ptr, bn = epilogue_ptrs(spec.out_channels, scale, bias, bn_scale, bn_shift, bn_fma)
        cache = usable_cache(cache, wp)
        self.wp, self.scale, self.bias = wp, scale, bias
        self.bn_scale, self.bn_shift, self.bn_fma = bn_scale, bn_shift, bn_fma
        self.cache = cache
        s = spec
        self.conv = (s.in_channels, s.out_channels, s.kernel, s.stride, s.padding, s.dilation, s.groups, s.pad_value)
        self._kwargs = dict(
            conv, scale=scale, bias=bias, cache=cache, bn_scale=bn_scale, bn_shift=bn_shift, bn_fma=bn_fma
        )
        # the bound tensors' addresses (they stay put): weights; scale, bias, thresholds, direction
        self._w_ptr, self._channel_ptrs = wp.data_ptr(), (scale_ptr, bias_ptr, 0, 0)
        self._bn = bn
        self._plans: dict = {}  # (dtype, shape) of an input -> its checked plan

    def __reduce__(self):
        # a copy or a pickle is built again from its operands: the addresses it keeps are its own tensors'
        kwargs = {k: v for k, v in self._kwargs.items() if k != "cache"}
        return _conv_layer, (self.wp, self.cache is not None, kwargs)

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, memory_format=torch.channels_last
    ) -> torch.Tensor:
        """The output in ``memory_format`` memory: channels_last (as the kernels write it), or NCHW
        (``torch.contiguous_format``: each run of output pixels transposed in place as it is written)."""
        nchw = memory_format is torch.contiguous_format
        if not nchw and memory_format is not torch.channels_last:
            raise ValueError(
                f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format!r}"
            )
        if not (type(x) is _Tensor and (residual is None or type(residual) is _Tensor) and direct()):
            out = binary_conv2d(x, self.wp, residual=residual, **self._kwargs)
            return out.contiguous() if nchw else out
        key = (x.dtype, x.shape)
        plan = self._plans.get(key)
        if plan is None or not x.is_cpu:
            plan = conv_plan(MODE_FLOAT, x, self.wp, *self.conv)  # checks x (ValueError naming the problem)
            if len(self._plans) < 8:
                self._plans[key] = plan
        if x.dtype is _I64 and not x.is_contiguous():
            return binary_conv2d(x, self.wp, residual=residual, **self._kwargs)  # says what is wrong
        out = torch.empty(plan.shape, dtype=_F32) if nchw else torch.empty_strided(plan.shape, plan.stride, dtype=_F32)
        residual, residual_nchw = residual_operand(residual, out)
        if not out.numel():
            return out
        residual_ptr = residual.data_ptr() if residual is not None else 0
        cache = self.cache
        # WeightCache.state, inline: this call is the engine's hottest
        version = hash((self.wp._version, cache._cleared)) if cache is not None else 0
        layouts = (nchw, residual_nchw)
        run_native(
            plan, x, self._w_ptr, out.data_ptr(), self._channel_ptrs, cache, version, residual_ptr, self._bn, *layouts
        )
        return out


def _conv_layer(wp, cached: bool, kwargs: dict) -> ConvLayer:
    """A :class:`ConvLayer` built again (copies and pickles), with a cache of its own when it had one."""
    return ConvLayer(wp, cache=WeightCache() if cached else None, **kwargs)


class ThresholdConvLayer:
    """A thresholded binary convolution with its constant operands bound: ``layer(x)`` is
    ``binary_conv2d_threshold(x, wp, thresholds=thresholds, direction=direction, out_padding=out_padding,
    out_pad_value=out_pad_value, out_groups=out_groups, cache=cache, **conv)``, bit for bit: the packed,
    padded int64 input of the next binary layer.

    As :class:`ConvLayer`: the weights and the thresholds are checked once, here (a direction's values by
    the kernel as it reads them, on every call); a call checks its input, once per input shape. Thresholds
    other than int32 and directions other than int8 are bound as converted copies. Under tracing, with
    tensor subclasses or on anything unusual a call takes :func:`binary_conv2d_threshold`.
    """

    __slots__ = ("wp", "thresholds", "direction", "cache", "conv", "_kwargs", "_out", "_w_ptr", "_ptrs", "_plans")

    def __init__(
        self, wp, *, thresholds, direction, out_padding=0, out_pad_value=0.0, out_groups=1, cache=None, **conv
    ):
        spec = ConvSpec.check(**conv)
        check_conv_weight(wp, spec)
        thresholds, direction = check_thresholds(thresholds, direction, values=False)
        thr_ptr = channel_ptr(thresholds, "thresholds", _I32, spec.out_channels)
        dir_ptr = channel_ptr(direction, "direction", _I8, spec.out_channels)
        cache = usable_cache(cache, wp)
        self.wp, self.thresholds, self.direction, self.cache = wp, thresholds, direction, cache
        s = spec
        self.conv = (s.in_channels, s.out_channels, s.kernel, s.stride, s.padding, s.dilation, s.groups, s.pad_value)
        self._out = (out_padding, out_pad_value, out_groups)
        self._kwargs = dict(
            conv,
            thresholds=thresholds,
            direction=direction,
            out_padding=out_padding,
            out_pad_value=out_pad_value,
            out_groups=out_groups,
            cache=cache,
        )
        self._w_ptr, self._ptrs = wp.data_ptr(), (0, 0, thr_ptr, dir_ptr)
        self._plans: dict = {}  # (dtype, shape) of an input -> its checked plan

    def __reduce__(self):
        kwargs = {k: v for k, v in self._kwargs.items() if k != "cache"}
        return _threshold_conv_layer, (self.wp, self.cache is not None, kwargs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (type(x) is _Tensor and direct()):
            return binary_conv2d_threshold(x, self.wp, **self._kwargs)
        key = (x.dtype, x.shape)
        plan = self._plans.get(key)
        if plan is None or not x.is_cpu:
            plan = conv_plan(MODE_THRESHOLD, x, self.wp, *self.conv, *self._out)  # checks x and the output's numbers
            if len(self._plans) < 8:
                self._plans[key] = plan
        if x.dtype is _I64 and not x.is_contiguous():
            return binary_conv2d_threshold(x, self.wp, **self._kwargs)  # says what is wrong
        out = torch.empty(plan.shape, dtype=_I64)
        if out.numel():
            cache = self.cache
            version = hash((self.wp._version, cache._cleared)) if cache is not None else 0
            run_native(plan, x, self._w_ptr, out.data_ptr(), self._ptrs, cache, version, 0, _NO_BATCHNORM)
        return out


def _threshold_conv_layer(wp, cached: bool, kwargs: dict) -> ThresholdConvLayer:
    """A :class:`ThresholdConvLayer` built again (copies and pickles), with a cache of its own when it had one."""
    return ThresholdConvLayer(wp, cache=WeightCache() if cached else None, **kwargs)
