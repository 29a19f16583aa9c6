"""onebit's native bit-packed CPU kernels, as ``torch.library`` custom ops (namespace ``onebit``).

Bit convention (``csrc/kernels/pack.h``): bit set = -1 (``x < 0``), bit clear = +1, so
sign(0) = sign(-0.0) = +1 and NaN packs as +1. Channel ``c`` of a group lives in word
``c // 64``, bit ``c % 64`` of that group's words; unused high bits are always 0.

Layouts (all packed tensors are int64, contiguous):

- packed activations ``[N, H + 2 ph, W + 2 pw, G, Wg]``, ``Wg = ceil((C / G) / 64)``, where
  ``G`` is the groups of the conv that consumes them;
- packed conv weights ``[C_out, KH, KW, Wg]``, ``Wg = ceil((C_in / G) / 64)``, output
  channel ``co`` in group ``co // (C_out / G)``;
- packed features ``[N, Wg]`` and linear weights ``[Out, Wg]``, ``Wg = ceil(F / 64)``;
- float32 / int32 conv outputs ``[N, C_out, OH, OW]`` in channels_last memory.

Every function validates its arguments with :mod:`onebit.engine.geometry` (``ValueError``
naming the problem, the same text as the reference path's) before any native code runs; the
native code re-checks the numbers. Kernels release the GIL, run
on ``torch.get_num_threads()`` threads (small layers stay on one), and are safe to call
from several Python threads at once. The instruction set is chosen at import (best
supported, or ``ONEBIT_ISA``) and can be forced with :func:`set_isa`.

In eager mode the public functions call the native kernels directly (the dispatcher
round trip of a Python custom op costs ~15 us, a tenth of a 256-channel layer); under
``torch.compile``, ``torch.export``, ``make_fx``, ``torch.jit.trace`` or with tensor
subclasses they go through ``torch.ops.onebit.*``, whose fake implementations give
shapes for tracing. Validated shapes are cached (a native plan per convolution shape),
so a repeated call only re-checks dtypes, devices and contiguity.
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence

import torch

from onebit import _C
from onebit.engine.geometry import (
    ConvCall,
    ConvSpec,
    check_conv,
    check_conv_epilogue,
    check_int,
    check_linear,
    check_pack,
    check_per_channel,
    check_pool_bits,
    check_residual,
    check_tensor,
    check_threshold_output,
    conv_output_size,
    pair,
    words_for,
)

__all__ = [
    "isa",
    "set_isa",
    "supported_isas",
    "words_for",
    "conv_output_size",
    "pack_activations",
    "pack_features",
    "pack_weights",
    "binary_conv2d",
    "binary_conv2d_int",
    "binary_conv2d_threshold",
    "binary_linear",
    "binary_linear_int",
    "binary_linear_threshold",
    "max_pool_bits",
    "WeightCache",
    "ternary_linear",
    "ternary_linear_int",
    "ternary_linear_kernel",
]

isa = _C.isa

#: words of a packed weight a :class:`WeightCache` reads on every call to notice writes that
#: bypass the tensor's version counter (all of them for a layer this small or smaller)
PROBE_WORDS = _C.WeightCache.PROBE_WORDS


class WeightCache(_C.WeightCache):
    """One layer's weights prepared for the kernels, kept between calls.

    A call reuses the prepared weights when it gets the same tensor (address) in the same
    state. The state is the tensor's version counter, which every write through torch bumps
    (in-place ops on it or on any view of it, ``copy_``, indexing, ``load_state_dict``,
    optimizer steps, writes under ``no_grad``), combined with a fingerprint of
    :data:`PROBE_WORDS` of its words (evenly spaced, the first and the last included), read
    by every native call (a fraction of a microsecond). So:

    - every write through torch is seen;
    - every write through an alias that bypasses the counter (``t.data``, ``t.numpy()``,
      DLPack, a raw pointer) is seen when the tensor has at most ``PROBE_WORDS`` words, or
      when it changes a probed word: any write to the whole tensor (``t.data.bitwise_not_()``,
      ``t.data.copy_(other)``, ``t.numpy()[:] = ...``, ``fill_``/``zero_``) does;
    - a write of a few words through such an alias in a larger tensor may go unseen: call
      :meth:`clear` after it (a ``PackedModel`` rebuilds all its caches on ``.to()`` or copy).
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleared = 0

    def clear(self) -> None:
        """Forget the prepared weights: the next call prepares them again."""
        self._cleared += 1

    def state(self, wp: torch.Tensor) -> int:
        """The caller's part of the state the native cache compares: the version counter and the
        number of :meth:`clear` calls (the native call adds the fingerprint of the probed words;
        raises ``RuntimeError`` for inference tensors, which count no writes)."""
        return hash((wp._version, self._cleared))


set_isa = _C.set_isa
supported_isas = _C.supported_isas
_MODE_INT, _MODE_FLOAT, _MODE_THRESHOLD = 0, 1, 2


def _custom_op(name: str, schema: str, impl, fake):
    """Register ``impl`` as the custom op ``onebit::name`` of ``schema`` (its arguments and result, as
    ``torch.library`` writes them) with ``fake``, the implementation that gives shapes under tracing."""
    op = torch.library.custom_op(f"onebit::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


#: the arguments every binary convolution op starts with (its schema; ``ConvSpec.op_args`` gives them)
_CONV_SCHEMA = (
    "Tensor xp, Tensor wp, SymInt in_channels, SymInt out_channels, SymInt[] kernel_size, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, SymInt groups, float pad_value"
)

_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 1024
_I64, _I32, _I8, _F32 = torch.int64, torch.int32, torch.int8, torch.float32
_CHANNELS_LAST = torch.channels_last


@atexit.register
def _clear_caches() -> None:  # native plans are freed before the extension goes away
    _PLAN_CACHE.clear()
    _PACK_CACHE.clear()


def _hashable(value):
    return tuple(value) if type(value) is list else value


class _Plan:
    """A validated convolution of one shape: the native plan and the output shape."""

    __slots__ = ("native", "shape", "co", "stride")

    def __init__(self, native, shape, co):
        self.native, self.shape, self.co = native, shape, co
        # the strides of a [N, C, OH, OW] output in channels_last memory (see _empty_nchw_channels_last)
        self.stride = _channels_last_strides(*shape) if len(shape) == 4 else None


def _conv_plan(mode, xp, wp, *args):
    """The cached plan for this call; validates everything but per-channel tensors (ValueError).

    ``args``: the convolution's arguments (in_channels, out_channels, kernel_size, stride, padding,
    dilation, groups, pad_value), then for ``_MODE_THRESHOLD`` out_padding, out_pad_value, out_groups."""
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
            plan = _PLAN_CACHE.get(key)
        except TypeError:  # lists (or worse) inside: retry with tuples
            key = (mode, xp.dtype, xp.shape, wp.shape, tuple(_hashable(v) for v in args))
            try:
                plan = _PLAN_CACHE.get(key)
            except TypeError:  # something unhashable: the checks below say what is wrong
                key = plan = None
        if plan is not None:
            return plan
    call = check_conv(xp, wp, *args[:8])
    if mode == _MODE_THRESHOLD:
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
    plan = _Plan(native, shape, s.out_channels)
    if key is not None:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = plan
    return plan


def _cached(cache, wp):
    """(cache, state of wp) for a call, or (None, 0) when wp's writes cannot be tracked."""
    if cache is None:
        return None, 0
    if not isinstance(cache, WeightCache):
        raise ValueError(f"cache must be a onebit.engine.kernels.WeightCache, got {type(cache).__name__}")
    try:
        return cache, cache.state(wp)
    except RuntimeError:  # inference tensors count no writes: never cache them
        return None, 0


def _run(
    plan, x, wp, out, scale_ptr=0, bias_ptr=0, thr_ptr=0, dir_ptr=0, cache=None, residual_ptr=0, bn=(0, 0, False)
) -> None:
    """Run a plan on packed ``x``, or on float32 ``x`` packed in the same pass."""
    cache, version = _cached(cache, wp)
    _run_native(
        plan,
        x,
        wp.data_ptr(),
        out.data_ptr(),
        (scale_ptr, bias_ptr, thr_ptr, dir_ptr),
        cache,
        version,
        residual_ptr,
        bn,
    )


def _run_native(
    plan, x, w_ptr: int, out_ptr: int, channel_ptrs: tuple, cache, version: int, residual_ptr: int, bn: tuple
) -> None:
    """The native call of :func:`_run`: addresses of the weights, the output and the per-channel
    tensors ``(scale, bias, thresholds, direction)`` already taken and checked."""
    threads = _get_num_threads()
    if x.dtype is _I64:
        plan.native.run(x.data_ptr(), w_ptr, out_ptr, *channel_ptrs, threads, cache, version, residual_ptr, *bn)
        return
    _, c, _, w = x.shape
    sn, sc, sh, sw = x.stride()
    if sc != 1 and sw != 1 and c > 1 and w > 1:  # neither channels nor pixels contiguous
        x = x.contiguous()
        sn, sc, sh, sw = x.stride()
    plan.native.run_float(
        x.data_ptr(), sn, sc, sh, sw, w_ptr, out_ptr, *channel_ptrs, threads, cache, version, residual_ptr, *bn
    )


def _channel_ptr(t, name: str, dtype: torch.dtype, channels: int) -> int:
    """data_ptr of an optional per-channel tensor, after checking it (0 for None)."""
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


_get_num_threads = torch.get_num_threads
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_jit_tracing = torch._C._get_tracing_state
_Tensor = torch.Tensor


def _direct(*tensors) -> bool:
    """True when the native kernels can run right here: plain tensors, nothing tracing."""
    if _is_compiling() or _dispatch_modes() or _function_modes() or _jit_tracing():
        return False
    for t in tensors:  # tensor subclasses (fake, functional, parameters...) take the dispatcher
        if t is not None and type(t) is not _Tensor and isinstance(t, _Tensor):
            return False
    return True  # non-tensors get their ValueError from the argument checks


# ---------------------------------------------------------------------------
# packing


_PACK_CACHE: dict = {}


def _pack_activations_impl(x, padding, pad_value, groups):
    key = entry = None
    if type(x) is torch.Tensor and x.dtype is _F32 and x.is_cpu:
        key = (x.shape, x.stride(), _hashable(padding), pad_value, groups)
        try:
            entry = _PACK_CACHE.get(key)
        except TypeError:
            key = None
    if entry is None:
        shape, ph, pw, pad, g = check_pack(x, padding, pad_value, groups)
        n, c, h, w = x.shape
        sn, sc, sh, sw = x.stride()
        # Neither channels nor pixels contiguous: torch's copy to NCHW beats a strided gather.
        copy = sc != 1 and sw != 1 and c > 1 and w > 1
        if copy:
            sn, sc, sh, sw = c * h * w, h * w, w, 1
        entry = (shape, (n, c, h, w, sn, sc, sh, sw, ph, pw, pad, g), copy)
        if key is not None:
            if len(_PACK_CACHE) >= _PLAN_CACHE_SIZE:
                _PACK_CACHE.clear()
            _PACK_CACHE[key] = entry
    shape, args, copy = entry
    if copy:
        x = x.contiguous()
    out = torch.empty(shape, dtype=torch.int64)
    if out.numel():
        _C.pack_activations_raw(x.data_ptr(), *args, out.data_ptr(), torch.get_num_threads())
    return out


def _pack_activations_fake(x, padding, pad_value, groups):
    shape, *_ = check_pack(x, padding, pad_value, groups)
    return x.new_empty(shape, dtype=torch.int64)


_custom_op(
    "pack_activations",
    "(Tensor x, SymInt[] padding, float pad_value, SymInt groups) -> Tensor",
    _pack_activations_impl,
    _pack_activations_fake,
)


def pack_activations(
    x: torch.Tensor, padding: int | Sequence[int] = (0, 0), pad_value: float = 0.0, groups: int = 1
) -> torch.Tensor:
    """float32 ``[N, C, H, W]`` (any strides) -> packed int64 ``[N, H + 2 ph, W + 2 pw, G, Wg]``.

    Padded positions are +1 (all bits clear) for ``pad_value`` 0.0 or 1.0 and -1 (the real
    channels' bits set, never the unused ones) for -1.0. ``pad_value`` 0 is made exact by
    the convolution's correction, given the same ``pad_value``.
    """
    if _direct(x):
        return _pack_activations_impl(x, padding, pad_value, groups)
    return torch.ops.onebit.pack_activations(x, list(pair(padding, "padding")), float(pad_value), groups)


def pack_features(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, F]`` -> packed int64 ``[N, ceil(F / 64)]`` (the input of :func:`binary_linear`)."""
    check_tensor(x, "x", torch.float32, 2, contiguous=False)
    n, f = x.shape
    return pack_activations(x[:, :, None, None]).view(n, words_for(f))  # (n, -1) is ambiguous for n = 0


def pack_weights(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Signs of weights, packed: float32 ``[C_out, C_in / G, KH, KW]`` -> int64 ``[C_out, KH, KW, Wg]``.

    A 2-D linear weight ``[Out, F]`` packs to ``[Out, ceil(F / 64)]``. ``groups`` only
    checks that ``C_out`` splits into the groups (each output channel's weights already
    cover just its group's inputs).
    """
    if isinstance(w, torch.Tensor):
        w = w.detach()
    check_tensor(w, "w", torch.float32, contiguous=False)
    g = check_int(groups, "groups", 1)
    if w.dim() == 2:
        out, f = w.shape
        if g != 1:
            raise ValueError("a 2-D (linear) weight has no groups")
        return pack_activations(w[:, :, None, None]).view(out, -1)
    if w.dim() != 4:
        raise ValueError(f"w must be [C_out, C_in / groups, KH, KW] or [Out, F], got shape {list(w.shape)}")
    if w.shape[0] % g:
        raise ValueError(f"groups={g} must divide the {w.shape[0]} output channels of w")
    co, _, kh, kw = w.shape
    return pack_activations(w).view(co, kh, kw, -1)


# ---------------------------------------------------------------------------
# convolutions
#
# Internally a convolution's arguments travel as one tuple ``conv`` = (in_channels, out_channels,
# kernel_size, stride, padding, dilation, groups, pad_value), checked by geometry.check_conv.


def _channels_last_strides(n, c, h, w) -> tuple[int, int, int, int]:
    if c == 1:  # the same memory as NCHW: say so, or torch's next op may pick a channels_last kernel
        return (h * w, h * w, w, 1)
    return (h * w * c, 1, w * c, c)


def _empty_nchw_channels_last(n, c, h, w, dtype, like=None):
    """[N, C, H, W] in channels_last memory, with the same strides for real and fake tensors."""
    stride = _channels_last_strides(n, c, h, w)
    if like is not None:
        return like.new_empty_strided((n, c, h, w), stride, dtype=dtype)
    return torch.empty_strided((n, c, h, w), stride, dtype=dtype)


def _conv_int_impl(xp, wp, conv, cache=None):
    plan = _conv_plan(_MODE_INT, xp, wp, *conv)
    out = torch.empty_strided(plan.shape, plan.stride, dtype=_I32)
    if out.numel():
        _run(plan, xp, wp, out, cache=cache)
    return out


def _conv_float_impl(
    xp, wp, conv, scale=None, bias=None, residual=None, cache=None, bn_scale=None, bn_shift=None, bn_fma=False
):
    plan = _conv_plan(_MODE_FLOAT, xp, wp, *conv)
    scale_ptr = _channel_ptr(scale, "scale", _F32, plan.co)
    bias_ptr = _channel_ptr(bias, "bias", _F32, plan.co)
    bn = _batchnorm_ptrs(bn_scale, bn_shift, bn_fma, plan.co)
    out = torch.empty_strided(plan.shape, plan.stride, dtype=_F32)
    residual = _residual_nhwc(residual, out)
    if out.numel():
        residual_ptr = residual.data_ptr() if residual is not None else 0
        _run(plan, xp, wp, out, scale_ptr, bias_ptr, cache=cache, residual_ptr=residual_ptr, bn=bn)
    return out


def _residual_nhwc(residual, out):
    """``residual`` (checked against ``out``) in the memory the kernel reads: ``[N, OH, OW, C_out]`` in
    order, that is ``residual`` itself when it is channels_last, else a permuted copy."""
    if residual is None:
        return None
    if not (
        type(residual) is torch.Tensor and residual.dtype is _F32 and residual.is_cpu and residual.shape == out.shape
    ):
        check_residual(residual, out.shape)
    if residual.is_contiguous(memory_format=_CHANNELS_LAST):
        return residual  # already that memory (a view would cost more than this check)
    return residual.permute(0, 2, 3, 1).contiguous()


class ConvLayer:
    """A binary convolution with its constant operands bound: ``layer(x, residual=None)`` is
    ``binary_conv2d(x, wp, scale=scale, bias=bias, residual=residual, cache=cache, bn_scale=bn_scale,
    bn_shift=bn_shift, bn_fma=bn_fma, **conv)``, bit for bit.

    The weights, scale, bias and BatchNorm epilogue are checked once, here; a call checks only
    its input and residual, which saves the per-call argument handling of a layer run many times
    (a packed model's steps). The bound tensors may be written (the weights as :class:`WeightCache`
    describes) but not resized or replaced. Under tracing, with tensor subclasses or on anything
    unusual a call takes :func:`binary_conv2d` itself.
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
        check_tensor(wp, "wp", _I64)
        if wp.device.type != "cpu":
            raise ValueError(f"wp must be on the CPU, got {wp.device}")
        co = spec.out_channels
        scale_ptr = _channel_ptr(scale, "scale", _F32, co)
        bias_ptr = _channel_ptr(bias, "bias", _F32, co)
        bn = _batchnorm_ptrs(bn_scale, bn_shift, bn_fma, co)
        if cache is not None and not isinstance(cache, WeightCache):
            raise ValueError(f"cache must be a onebit.engine.kernels.WeightCache, got {type(cache).__name__}")
        if cache is not None:
            try:
                wp._version
            except RuntimeError:  # an inference tensor counts no writes: never cache its preparation
                cache = None
        self.wp, self.scale, self.bias, self.bn_scale, self.bn_shift, self.bn_fma = (
            wp,
            scale,
            bias,
            bn_scale,
            bn_shift,
            bn_fma,
        )
        self.cache = cache
        self.conv = (
            spec.in_channels,
            co,
            spec.kernel,
            spec.stride,
            spec.padding,
            spec.dilation,
            spec.groups,
            spec.pad_value,
        )
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

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not (type(x) is _Tensor and (residual is None or type(residual) is _Tensor) and _direct()):
            return binary_conv2d(x, self.wp, residual=residual, **self._kwargs)
        key = (x.dtype, x.shape)
        plan = self._plans.get(key)
        if plan is None or not x.is_cpu:
            plan = _conv_plan(_MODE_FLOAT, x, self.wp, *self.conv)  # checks x (ValueError naming the problem)
            if len(self._plans) < 8:
                self._plans[key] = plan
        if x.dtype is _I64 and not x.is_contiguous():
            return binary_conv2d(x, self.wp, residual=residual, **self._kwargs)  # says what is wrong
        out = torch.empty_strided(plan.shape, plan.stride, dtype=_F32)
        residual = _residual_nhwc(residual, out)
        if not out.numel():
            return out
        residual_ptr = residual.data_ptr() if residual is not None else 0
        cache = self.cache
        version = hash((self.wp._version, cache._cleared)) if cache is not None else 0
        _run_native(plan, x, self._w_ptr, out.data_ptr(), self._channel_ptrs, cache, version, residual_ptr, self._bn)
        return out


def _conv_layer(wp, cached: bool, kwargs: dict) -> ConvLayer:
    """A :class:`ConvLayer` built again (copies and pickles), with a cache of its own when it had one."""
    return ConvLayer(wp, cache=WeightCache() if cached else None, **kwargs)


def _batchnorm_ptrs(bn_scale, bn_shift, bn_fma, channels: int) -> tuple[int, int, bool]:
    """(scale, shift, fused) of a BatchNorm epilogue for the native call, after checking them."""
    if (bn_scale is None) != (bn_shift is None):
        raise ValueError("bn_scale and bn_shift go together: give both or neither")
    if not isinstance(bn_fma, bool):
        raise ValueError(f"bn_fma must be a bool, got {type(bn_fma).__name__}")
    scale = _channel_ptr(bn_scale, "bn_scale", _F32, channels)
    return scale, _channel_ptr(bn_shift, "bn_shift", _F32, channels), bn_fma


def _conv_threshold_impl(xp, wp, conv, thresholds, direction, out_padding, out_pad_value, out_groups, cache=None):
    plan = _conv_plan(_MODE_THRESHOLD, xp, wp, *conv, out_padding, out_pad_value, out_groups)
    thr_ptr = _channel_ptr(thresholds, "thresholds", _I32, plan.co)
    dir_ptr = _channel_ptr(direction, "direction", _I8, plan.co)
    if not thr_ptr or not dir_ptr:
        raise ValueError("thresholds and direction are required")
    out = torch.empty(plan.shape, dtype=torch.int64)
    if out.numel():
        _run(plan, xp, wp, out, thr_ptr=thr_ptr, dir_ptr=dir_ptr, cache=cache)
    return out


# The custom ops take the convolution's arguments positionally (_CONV_SCHEMA), then their own.


def _conv_int_fake(xp, wp, *conv):
    call = check_conv(xp, wp, *conv)
    return _empty_nchw_channels_last(*call.output_shape, torch.int32, like=xp)


def _conv_float_fake(xp, wp, *args):
    call = check_conv(xp, wp, *args[:8])
    check_conv_epilogue(call, *args[8:])
    return _empty_nchw_channels_last(*call.output_shape, torch.float32, like=xp)


def _conv_threshold_fake(xp, wp, *args):
    call: ConvCall = check_conv(xp, wp, *args[:8])
    thresholds, direction, out_padding, out_pad_value, out_groups = args[8:]
    shape, *_ = check_threshold_output(call, out_padding, out_pad_value, out_groups)
    check_per_channel(thresholds, "thresholds", torch.int32, call.spec.out_channels)
    check_per_channel(direction, "direction", torch.int8, call.spec.out_channels)
    return xp.new_empty(shape, dtype=torch.int64)


_custom_op(
    "binary_conv2d_int",
    f"({_CONV_SCHEMA}) -> Tensor",
    lambda xp, wp, *conv: _conv_int_impl(xp, wp, conv),
    _conv_int_fake,
)
_custom_op(
    "binary_conv2d",
    f"({_CONV_SCHEMA}, Tensor? scale, Tensor? bias, Tensor? residual=None, Tensor? bn_scale=None, "
    "Tensor? bn_shift=None, bool bn_fma=False) -> Tensor",
    lambda xp, wp, *args: _conv_float_impl(xp, wp, args[:8], *args[8:11], None, *args[11:]),
    _conv_float_fake,
)
_custom_op(
    "binary_conv2d_threshold",
    f"({_CONV_SCHEMA}, Tensor thresholds, Tensor direction, SymInt[] out_padding, float out_pad_value, "
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
    ``padding`` (see :func:`pack_activations`), packed for ``groups``; or it is the float32
    ``[N, C_in, H, W]`` input itself (any strides), packed inside the same native call
    (one pass over the threads; equal to packing first).

    ``cache``: a :class:`WeightCache` the caller keeps for this layer. The weights, once
    prepared in the kernel's own layout, are reused by later calls as long as ``wp`` is
    the same tensor with no write to it since (see :class:`WeightCache` for exactly which
    writes are seen); the caller keeps ``wp`` alive while the cache is in use. Without it
    the weights are prepared on every call.
    """
    conv = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pad_value)
    if _direct(xp, wp):
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
    if _direct(xp, wp, scale, bias, residual, bn_scale, bn_shift):
        return _conv_float_impl(xp, wp, conv, scale, bias, residual, cache, bn_scale, bn_shift, bn_fma)
    return torch.ops.onebit.binary_conv2d(xp, wp, *_op_args(conv), scale, bias, residual, bn_scale, bn_shift, bn_fma)


def _thresholds_int32(thresholds: torch.Tensor) -> torch.Tensor:
    if not isinstance(thresholds, torch.Tensor):
        raise ValueError(f"thresholds must be a torch.Tensor, got {type(thresholds).__name__}")
    if thresholds.dtype == torch.int32:
        return thresholds
    if thresholds.dtype.is_floating_point or thresholds.dtype.is_complex or thresholds.dtype == torch.bool:
        raise ValueError(f"thresholds must be integers (int32), got {thresholds.dtype}")
    # |acc| <= 2^24, so clamping to int32 never changes a decision.
    return thresholds.clamp(-(2**31), 2**31 - 1).to(torch.int32)


def _direction_int8(direction: torch.Tensor) -> torch.Tensor:
    if not isinstance(direction, torch.Tensor):
        raise ValueError(f"direction must be a torch.Tensor, got {type(direction).__name__}")
    if direction.dtype == torch.int8:
        return direction
    if direction.dtype == torch.bool:  # "negate above": True -> bit set iff acc > thr
        return torch.where(direction, -1, 1).to(torch.int8)
    if direction.dtype.is_floating_point or direction.dtype.is_complex:
        raise ValueError(f"direction must be int8 (+1 / -1) or bool (negate_above), got {direction.dtype}")
    if direction.numel() and not bool(((direction == 1) | (direction == -1)).all()):
        raise ValueError("direction must hold only +1 and -1")
    return direction.to(torch.int8)


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
    iff ``acc > thresholds[c]`` when ``direction[c] == -1``. ``thresholds`` is int32
    ``[C_out]``; ``direction`` is int8 ``[C_out]`` (+1 / -1) or bool (True = -1, "negate
    above"). The border is filled as :func:`pack_activations` fills it for ``out_pad_value``.
    ``xp`` and ``cache`` as in :func:`binary_conv2d_int`.
    """
    direction = _direction_int8(direction)
    thresholds = _thresholds_int32(thresholds)
    conv = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pad_value)
    if _direct(xp, wp, thresholds, direction):
        return _conv_threshold_impl(xp, wp, conv, thresholds, direction, out_padding, out_pad_value, out_groups, cache)
    out_padding = list(pair(out_padding, "out_padding"))
    return torch.ops.onebit.binary_conv2d_threshold(
        xp, wp, *_op_args(conv), thresholds, direction, out_padding, float(out_pad_value), out_groups
    )


# ---------------------------------------------------------------------------
# fully connected layers: 1x1 convolutions of 1x1 images


def _linear_views(xp, wp, in_features):
    n, out, wg = check_linear(xp, wp, in_features)
    conv = dict(in_channels=in_features, out_channels=out, kernel_size=1)
    return xp.view(n, 1, 1, 1, wg), wp.view(out, 1, 1, wg), conv, n, out


def binary_linear_int(xp: torch.Tensor, wp: torch.Tensor, *, in_features: int) -> torch.Tensor:
    """int32 ``[N, Out]``: ``acc = in_features - 2 popcount(x xor w)`` (packed ``[N, Wg]`` x ``[Out, Wg]``)."""
    x4, w4, conv, n, out = _linear_views(xp, wp, in_features)
    return binary_conv2d_int(x4, w4, **conv).reshape(n, out)


def binary_linear(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_features: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[N, Out]`` ``= acc * scale + bias`` (see :func:`binary_linear_int`, :func:`binary_conv2d`)."""
    x4, w4, conv, n, out = _linear_views(xp, wp, in_features)
    return binary_conv2d(x4, w4, scale=scale, bias=bias, **conv).reshape(n, out)


def binary_linear_threshold(
    xp: torch.Tensor, wp: torch.Tensor, *, in_features: int, thresholds: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """Packed int64 ``[N, ceil(Out / 64)]`` of the thresholded accumulators (see :func:`binary_conv2d_threshold`)."""
    x4, w4, conv, n, out = _linear_views(xp, wp, in_features)
    return binary_conv2d_threshold(x4, w4, thresholds=thresholds, direction=direction, **conv).reshape(
        n, words_for(out)
    )


# ---------------------------------------------------------------------------
# pooling on packed bits


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


_custom_op(
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
    if _direct(xp, or_mask, pad_words):
        return _max_pool_bits_impl(*args)
    pairs = [
        list(pair(v, name))
        for v, name in ((kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation"))
    ]
    return torch.ops.onebit.max_pool_bits(
        xp, or_mask, pad_words, *pairs, bool(ceil_mode), list(pair(out_padding, "out_padding")), int(channels)
    )


# ---------------------------------------------------------------------------
# ternary weights x int8 activations (BitLinear): see csrc/kernels/ternary_linear.h

#: largest in_features of ternary_linear: the integer sums stay exact in float32 (128 * F < 2^24)
TERNARY_MAX_FEATURES = 1 << 17


def _ternary_weight(wp, in_features) -> tuple[int, int]:
    f = check_int(in_features, "in_features", 1)
    check_tensor(wp, "packed ternary weight wp", torch.uint8, 2)
    row = (f + 3) // 4
    if wp.shape[1] != row or wp.shape[0] < 1:
        raise ValueError(
            f"packed ternary weight wp has shape {list(wp.shape)}: expected [Out >= 1, {row}] "
            f"(four 2-bit codes a byte) for {f} input features"
        )
    return f, wp.shape[0]


def _check_ternary(x, wp, in_features, dtype) -> tuple[int, int, int]:
    f, out = _ternary_weight(wp, in_features)
    check_tensor(x, "input x", dtype, 2, contiguous=False)
    if x.shape[1] != f:
        raise ValueError(f"input x has shape {list(x.shape)}: expected [N, in_features={f}]")
    return x.shape[0], f, out


def _ternary_linear_impl(x, wp, in_features, scale, bias):
    n, f, out = _check_ternary(x, wp, in_features, torch.float32)
    if f > TERNARY_MAX_FEATURES:
        raise ValueError(f"ternary_linear: in_features={f} exceeds {TERNARY_MAX_FEATURES} (exact float32 sums)")
    scale_ptr = _channel_ptr(scale, "scale", torch.float32, out)
    bias_ptr = _channel_ptr(bias, "bias", torch.float32, out)
    if n > 0 and (x.stride(1) != 1 or x.stride(0) < f):
        x = x.contiguous()
    y = torch.empty((n, out), dtype=torch.float32)
    if n > 0:
        _C.ternary_linear_raw(
            x.data_ptr(),
            n,
            f,
            x.stride(0),
            wp.data_ptr(),
            out,
            scale_ptr,
            bias_ptr,
            y.data_ptr(),
            torch.get_num_threads(),
        )
    return y


def _ternary_linear_int_impl(x, wp, in_features):
    n, f, out = _check_ternary(x, wp, in_features, torch.int8)
    x = x.contiguous()
    y = torch.empty((n, out), dtype=torch.int32)
    if n > 0:
        _C.ternary_linear_int_raw(x.data_ptr(), n, f, wp.data_ptr(), out, y.data_ptr(), torch.get_num_threads())
    return y


def _ternary_linear_fake(x, wp, in_features, scale, bias):
    n, _, out = _check_ternary(x, wp, in_features, torch.float32)
    if scale is not None:
        check_per_channel(scale, "scale", torch.float32, out)
    if bias is not None:
        check_per_channel(bias, "bias", torch.float32, out)
    return x.new_empty((n, out))


def _ternary_linear_int_fake(x, wp, in_features):
    n, _, out = _check_ternary(x, wp, in_features, torch.int8)
    return x.new_empty((n, out), dtype=torch.int32)


_custom_op(
    "ternary_linear",
    "(Tensor x, Tensor wp, SymInt in_features, Tensor? scale, Tensor? bias) -> Tensor",
    _ternary_linear_impl,
    _ternary_linear_fake,
)
_custom_op(
    "ternary_linear_int",
    "(Tensor x, Tensor wp, SymInt in_features) -> Tensor",
    _ternary_linear_int_impl,
    _ternary_linear_int_fake,
)


def ternary_linear(
    x: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_features: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[N, Out]`` ``= (x_int @ levels.T) / s * scale + bias``: BitLinear's arithmetic.

    ``x`` is float32 ``[N, F]`` (rows may be strided), quantized per token inside the kernel as
    :class:`onebit.quant_lowbit.Absmax8` does (``s = 127 / max(max|x|, 1e-5)``,
    ``x_int = clamp(round(x s), -128, 127)``); ``wp`` is the uint8 ``[Out, ceil(F / 4)]`` 2-bit
    weight of :func:`onebit.engine.reference.pack_ternary_weights`; ``scale`` and ``bias`` are
    optional float32 ``[Out]``. The integer sum is exact, the three roundings after it are those of
    the layer, in its order (bit-identical). A token holding a NaN or infinity gives NaNs.
    """
    if _direct(x, wp, scale, bias):
        return _ternary_linear_impl(x, wp, in_features, scale, bias)
    return torch.ops.onebit.ternary_linear(x, wp, in_features, scale, bias)


def ternary_linear_int(x: torch.Tensor, wp: torch.Tensor, *, in_features: int) -> torch.Tensor:
    """int32 ``[N, Out]`` ``= x @ levels.T`` of int8 ``x`` ``[N, F]`` and 2-bit ternary weights (see :func:`ternary_linear`)."""
    if _direct(x, wp):
        return _ternary_linear_int_impl(x, wp, in_features)
    return torch.ops.onebit.ternary_linear_int(x, wp, in_features)


def ternary_linear_kernel() -> str:
    """The kernel :func:`ternary_linear` runs on the active ISA: ``avx512_vnni``, ``avx2`` or ``reference``."""
    return _C.ternary_linear_kernel()


# ---------------------------------------------------------------------------
# bit planes of k-bit activations (onebit.engine.bitplanes)


def pack_integer_planes(
    x: torch.Tensor, padding: Sequence[int], groups: int, *, symmetric: bool, bits: int, clip: float = 1.0
) -> torch.Tensor:
    """float32 ``[N, C, H, W]`` -> int64 ``[N, H + 2 ph, W + 2 pw, bits * G, Wg]``: the +-1 bit planes
    of the input quantizer's level indices (``dorefa``: ``round(clamp(x, 0, 1) n)``; ``dorefa_sym``:
    ``floor((clamp(x, -c, c) / c + 1) / 2 n + 1/2)``), group ``i * G + g`` holding plane ``i`` of
    group ``g``; padded with each code's zero (see ``csrc/kernels/bitplanes.h``)."""
    if _direct(x):
        return _pack_integer_planes_impl(x, list(padding), groups, symmetric, bits, clip)
    return torch.ops.onebit.pack_integer_planes(x, list(padding), groups, symmetric, bits, float(clip))


def pack_integer_planes_nan(
    x: torch.Tensor, padding: Sequence[int], groups: int, *, symmetric: bool, bits: int, clip: float = 1.0
) -> tuple[torch.Tensor, bool | None]:
    """:func:`pack_integer_planes` and whether ``x`` holds a NaN (seen by the kernel in its one pass
    over ``x``, at no extra cost), or None under tracing (unknown: assume it may)."""
    if _direct(x):
        return _pack_integer_planes_nan(x, list(padding), groups, symmetric, bits, clip)
    return torch.ops.onebit.pack_integer_planes(x, list(padding), groups, symmetric, bits, float(clip)), None


def _integer_planes_shape(x, padding, groups, bits) -> tuple:
    if not (isinstance(x, torch.Tensor) and x.dtype == _F32 and x.dim() == 4):
        raise ValueError(f"pack_integer_planes: x must be a float32 tensor [N, C, H, W], got {type(x).__name__}")
    n, c, h, w = x.shape
    ph, pw = padding
    if c % groups:
        raise ValueError(f"pack_integer_planes: groups={groups} must divide the {c} channels")
    return (n, h + 2 * ph, w + 2 * pw, bits * groups, (c // groups + 63) // 64)


def _pack_integer_planes_impl(x, padding, groups, symmetric, bits, clip):
    return _pack_integer_planes_nan(x, padding, groups, symmetric, bits, clip)[0]


def _pack_integer_planes_nan(x, padding, groups, symmetric, bits, clip) -> tuple[torch.Tensor, bool]:
    shape = _integer_planes_shape(x, padding, groups, bits)
    if not x.is_cpu:
        raise ValueError("pack_integer_planes: x must be on the CPU")
    n, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    if sc != 1 and sw != 1 and c > 1 and w > 1:
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
            padding[0],
            padding[1],
            groups,
            symmetric,
            bits,
            float(clip),
            out.data_ptr(),
            torch.get_num_threads(),
        )
    return out, bool(nan)


_custom_op(
    "pack_integer_planes",
    "(Tensor x, SymInt[] padding, SymInt groups, bool symmetric, int bits, float clip) -> Tensor",
    _pack_integer_planes_impl,
    lambda x, padding, groups, symmetric, bits, clip: x.new_empty(
        _integer_planes_shape(x, padding, groups, bits), dtype=torch.int64
    ),
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
    if _direct(y, coeff, offset, scale, bias):
        return _combine_planes_impl(y, coeff, offset, *args)
    return torch.ops.onebit.combine_planes(y, coeff, offset, *args)


def _combined_shape(y, act_planes, groups, weight_planes) -> tuple:
    n, stacked, oh, ow = y.shape
    if y.dtype != torch.int32 or stacked % (act_planes * groups * weight_planes):
        raise ValueError("combine_planes: y must be the int32 output of the stacked bit-plane conv")
    return n, groups * (stacked // (act_planes * groups * weight_planes)), oh, ow


def _combine_planes_impl(y, coeff, offset, act_planes, groups, weight_planes, exact_divisor, divisor, scale, bias):
    n, co, oh, ow = _combined_shape(y, act_planes, groups, weight_planes)
    if not y.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("combine_planes: y must be in channels_last memory, as the stacked conv writes it")
    out = _empty_nchw_channels_last(n, co, oh, ow, torch.float32)
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
            0 if offset is None else offset.data_ptr(),
            exact_divisor,
            divisor,
            0 if scale is None else scale.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
    return out


_custom_op(
    "combine_planes",
    "(Tensor y, Tensor coeff, Tensor? offset, int act_planes, int groups, int weight_planes, int exact_divisor, "
    "float divisor, Tensor? scale, Tensor? bias) -> Tensor",
    _combine_planes_impl,
    lambda y, coeff, offset, act_planes, groups, weight_planes, *rest: _empty_nchw_channels_last(
        *_combined_shape(y, act_planes, groups, weight_planes), torch.float32, like=y
    ),
)
