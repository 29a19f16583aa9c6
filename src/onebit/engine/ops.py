"""The engine's ops: one entry per op, run by the native kernels or by the pure-torch reference.

A packed model calls only the functions of this module. Each runs the native implementation of
:mod:`onebit.engine.kernels` when it is available and the backend is ``"auto"`` or ``"native"``;
otherwise it checks its arguments with :mod:`onebit.engine.geometry` and runs
:mod:`onebit.engine.reference`. The native implementation checks with the same functions (once per
shape), so that a wrong input is the same ``ValueError`` on either path and never reaches a kernel.
:func:`conv_layer` binds a binary conv's constant operands for the native path (``kernels.ConvLayer``),
:func:`ternary_layer` a ternary linear layer's (``kernels.TernaryLayer``),
:func:`weight_cache` keeps a layer's prepared weights between native calls.

``use_backend("reference")`` (a context manager, per thread/task) forces the
portable reference, e.g. to compare the two; the environment variable
``ONEBIT_ENGINE_BACKEND=auto|native|reference`` sets the default.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from onebit.engine import geometry, reference

__all__ = [
    "use_backend",
    "backend",
    "backend_is_native",
    "native_available",
    "weight_cache",
    "conv_layer",
    "pack_activations",
    "pack_features",
    "pack_weights",
    "binary_conv2d",
    "binary_conv2d_int",
    "binary_conv2d_threshold",
    "threshold_pack",
    "binary_linear",
    "binary_linear_int",
    "binary_linear_threshold",
    "max_pool_bits",
    "pack_ternary_weights",
    "ternary_linear",
    "ternary_linear_int",
    "ternary_layer",
    "rms_norm_in_order",
    "max_pool2d",
    "relayout",
]

_DEFAULT = os.environ.get("ONEBIT_ENGINE_BACKEND", "auto")
if _DEFAULT not in ("auto", "native", "reference"):
    raise ValueError(f"ONEBIT_ENGINE_BACKEND must be auto, native or reference, got {_DEFAULT!r}")
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("onebit_engine_backend", default=_DEFAULT)
_NATIVE = None
_NATIVE_ERROR: str | None = None


def _native():
    global _NATIVE, _NATIVE_ERROR
    if _NATIVE is None and _NATIVE_ERROR is None:
        try:
            from onebit.engine import kernels  # noqa: PLC0415

            _NATIVE = kernels
        except Exception as error:  # the native extension or its wrapper is missing or broken
            _NATIVE_ERROR = f"{type(error).__name__}: {error}"
    return _NATIVE


def native_available() -> bool:
    return _native() is not None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the engine's kernels on ``"auto"`` (native where available), ``"native"`` or ``"reference"``."""
    if name not in ("auto", "native", "reference"):
        raise ValueError(f"unknown engine backend {name!r}; use 'auto', 'native' or 'reference'")
    if name == "native" and not native_available():
        raise RuntimeError(f"the native kernels are not available ({_NATIVE_ERROR})")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def backend() -> str:
    """The backend in use now: ``"native"`` or ``"reference"``."""
    return "reference" if _BACKEND.get() == "reference" or not native_available() else "native"


def _mode() -> str:
    """The backend asked for now; under torch.compile the default one is traced (dynamo cannot read
    context variables)."""
    return _DEFAULT if torch.compiler.is_compiling() else _BACKEND.get()


def backend_is_native() -> bool:
    """True when the engine's calls go to the native kernels now (:func:`backend`, also under torch.compile)."""
    return _mode() != "reference" and _native() is not None


def weight_cache():
    """A cache for one layer's prepared weights (see ``kernels.binary_conv2d_int``),
    or None without the native kernels."""
    native = _native()
    return native.WeightCache() if native is not None else None


def conv_layer(wp, **kwargs):
    """A binary conv with its constant operands bound (``kernels.ConvLayer``), or None without the native kernels."""
    native = _native()
    return native.ConvLayer(wp, **kwargs) if native is not None else None


def threshold_conv_layer(wp, **kwargs):
    """A thresholded binary conv with its constant operands bound (``kernels.ThresholdConvLayer``), or None
    without the native kernels."""
    native = _native()
    return native.ThresholdConvLayer(wp, **kwargs) if native is not None else None


def max_pool_bits_layer(or_mask, pad_words, **pool):
    """A max pool on packed bits with its operands bound (``kernels.MaxPoolBitsLayer``), or None without the
    native kernels."""
    native = _native()
    return native.MaxPoolBitsLayer(or_mask, pad_words, **pool) if native is not None else None


def ordered_conv1x1(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A 1x1 float conv summed in channel order, as torch's reference GEMM sums it
    (``kernels.OrderedConv1x1``), or None without the native kernels."""
    native = _native()
    return native.OrderedConv1x1(weight, bias) if native is not None else None


def channelwise_conv1x1(weight: torch.Tensor, bias: torch.Tensor | None = None, fma: bool = False):
    """A depthwise 1x1 float conv as a product and its bias, rounded twice or (``fma``) once, as torch's kernels
    round it (``kernels.ChannelwiseConv1x1``), or None without the native kernels."""
    native = _native()
    return native.ChannelwiseConv1x1(weight, bias, fma) if native is not None else None


def tap_ordered_conv(weight: torch.Tensor, stride, padding):
    """A float conv summed as one fused multiply-add chain per output in (kh, kw, c) order, as torch sums a
    network's stem (``kernels.TapOrderedConv``), or None without the native kernels."""
    native = _native()
    return native.TapOrderedConv(weight, stride, padding) if native is not None else None


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied into transparent huge pages when it is 2 MiB or more (``kernels.in_huge_pages``), else
    (or without the native kernels) ``t`` itself."""
    native = _native()
    return native.in_huge_pages(t) if native is not None else t


def _impl(name: str):
    """The native function ``name`` when it is to be used, else None (the caller checks and runs the reference)."""
    mode = _mode()
    if mode != "reference":
        native = _native()
        fn = getattr(native, name, None) if native is not None else None
        if fn is not None:
            return fn
        if mode == "native":
            raise RuntimeError(f"the native kernels have no {name}")
    return None


# ---------------------------------------------------------------------------
# the ops: native, or checked (geometry) and run by the reference


def pack_activations(x: torch.Tensor, padding=(0, 0), pad_value: float = 0.0, groups: int = 1) -> torch.Tensor:
    """float32 ``[N, C, H, W]`` -> packed int64 ``[N, H + 2 ph, W + 2 pw, G, Wg]`` (``pad_value`` -1.0: padded
    taps -1, else +1)."""
    native = _impl("pack_activations")
    if native is not None:
        return native(x, padding, pad_value, groups)
    _, ph, pw, _, g = geometry.check_pack(x, padding, pad_value, groups)
    return reference.pack_activations(x, (ph, pw), float(pad_value), g)


def pack_features(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, F]`` -> packed int64 ``[N, ceil(F / 64)]``."""
    native = _impl("pack_features")
    if native is not None:
        return native(x)
    geometry.check_pack_features(x)
    return reference.pack_features(x)


def pack_weights(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Signs of weights (as float32), packed: ``[C_out, KH, KW, Wg]``, or ``[Out, Wg]`` for a 2-D weight."""
    w = w.detach().to(torch.float32)
    native = _impl("pack_weights")
    if native is not None:
        return native(w, groups).contiguous()
    geometry.check_pack_weights(w, groups)
    return reference.pack_weights(w, groups).contiguous()


def _reference_input(x: torch.Tensor, wp: torch.Tensor, conv: dict) -> tuple[torch.Tensor, geometry.ConvCall]:
    """The checked call of a convolution on the reference path, and its packed input: ``x`` itself, or
    float32 ``x`` packed for the conv."""
    call = geometry.check_conv(x, wp, **conv)
    if x.dtype == torch.float32:
        s = call.spec
        x = reference.pack_activations(x, s.padding, s.pad_value, s.groups)
    return x, call


def binary_conv2d_int(xp: torch.Tensor, wp: torch.Tensor, *, cache=None, **conv) -> torch.Tensor:
    """int32 ``[N, C_out, OH, OW]`` ``acc = sum sign(x) sign(w)`` over each window (padded taps worth
    ``pad_value``); ``xp``: packed activations, or the float32 input (packed in the same call)."""
    native = _impl("binary_conv2d_int")
    if native is not None:
        return native(xp, wp, cache=cache, **conv)
    xp, _ = _reference_input(xp, wp, conv)
    return reference.binary_conv2d_int(xp, wp, **conv)


def binary_conv2d(
    xp, wp, *, scale=None, bias=None, residual=None, cache=None, bn_scale=None, bn_shift=None, bn_fma=False, **conv
) -> torch.Tensor:
    """float32 ``acc * scale + bias`` (then ``* bn_scale + bn_shift``, one rounding with ``bn_fma``)
    ``(+ residual)``; ``xp`` packed, or the float32 input."""
    native = _impl("binary_conv2d")
    if native is not None:
        return native(
            xp,
            wp,
            scale=scale,
            bias=bias,
            residual=residual,
            cache=cache,
            bn_scale=bn_scale,
            bn_shift=bn_shift,
            bn_fma=bn_fma,
            **conv,
        )
    xp, call = _reference_input(xp, wp, conv)
    geometry.check_conv_epilogue(call, scale, bias, residual, bn_scale, bn_shift, bn_fma)
    out = reference.binary_conv2d(xp, wp, scale=scale, bias=bias, **conv)
    if bn_scale is not None:
        s, t = bn_scale.view(1, -1, 1, 1), bn_shift.view(1, -1, 1, 1)
        out = reference.fused_multiply_add(out, s, t) if bn_fma else out * s + t
    return out if residual is None else out + residual


def binary_conv2d_threshold(
    xp, wp, *, thresholds, direction, out_padding=(0, 0), out_pad_value=0.0, out_groups=1, cache=None, **conv
) -> torch.Tensor:
    """Packed signs of the thresholded accumulators (bit set iff ``acc < thr`` for direction +1, ``acc > thr``
    for -1), padded for the next layer: ``[N, OH + 2 oph, OW + 2 opw, out_groups, Wg]``."""
    native = _impl("binary_conv2d_threshold")
    if native is not None:
        return native(
            xp,
            wp,
            thresholds=thresholds,
            direction=direction,
            out_padding=out_padding,
            out_pad_value=out_pad_value,
            out_groups=out_groups,
            cache=cache,
            **conv,
        )
    xp, call = _reference_input(xp, wp, conv)
    _, oph, opw, _, og = geometry.check_threshold_output(call, out_padding, out_pad_value, out_groups)
    thresholds, direction = geometry.check_thresholds(thresholds, direction, call.spec.out_channels)
    return reference.binary_conv2d_threshold(
        xp,
        wp,
        thresholds=thresholds,
        direction=direction,
        out_padding=(oph, opw),
        out_pad_value=float(out_pad_value),
        out_groups=og,
        **conv,
    )


def threshold_pack(acc, thresholds, direction, *, out_padding=(0, 0), out_pad_value=0.0, out_groups=1):
    """Pack the thresholded signs of integer-valued accumulators ``[N, C, H, W]``.

    Bit set (-1) iff ``acc < thr`` (direction +1) or ``acc > thr`` (direction -1): the
    comparison runs in torch, the packing on the native kernel when available.
    """
    thresholds, direction = geometry.check_threshold_pack(acc, thresholds, direction)
    signs = reference.threshold_signs(acc, thresholds, direction)
    return pack_activations(signs, out_padding, out_pad_value, out_groups)


def binary_linear_int(xp, wp, *, in_features: int) -> torch.Tensor:
    """int32 ``[N, Out]`` ``acc = in_features - 2 popcount(x xor w)`` of packed ``[N, Wg]`` and ``[Out, Wg]``."""
    native = _impl("binary_linear_int")
    if native is not None:
        return native(xp, wp, in_features=in_features)
    geometry.check_linear(xp, wp, in_features)
    return reference.binary_linear_int(xp, wp, in_features=in_features)


def binary_linear(xp, wp, *, in_features: int, scale=None, bias=None) -> torch.Tensor:
    """float32 ``[N, Out]`` ``= acc * scale + bias``."""
    native = _impl("binary_linear")
    if native is not None:
        return native(xp, wp, in_features=in_features, scale=scale, bias=bias)
    _, out, _ = geometry.check_linear(xp, wp, in_features)
    geometry.check_epilogue(out, scale, bias)
    return reference.binary_linear(xp, wp, in_features=in_features, scale=scale, bias=bias)


def binary_linear_threshold(xp, wp, *, in_features: int, thresholds, direction) -> torch.Tensor:
    """Packed ``[N, ceil(Out/64)]`` signs of the thresholded linear accumulators."""
    native = _impl("binary_linear_threshold")
    if native is not None:
        return native(xp, wp, in_features=in_features, thresholds=thresholds, direction=direction)
    _, out, _ = geometry.check_linear(xp, wp, in_features)
    thresholds, direction = geometry.check_thresholds(thresholds, direction, out)
    return reference.binary_linear_threshold(
        xp, wp, in_features=in_features, thresholds=thresholds, direction=direction
    )


def max_pool_bits(xp, or_mask, pad_words, **pool) -> torch.Tensor:
    """Max pooling of thresholded accumulators on their packed bits (see :func:`reference.max_pool_bits`)."""
    native = _impl("max_pool_bits")
    if native is not None:
        return native(xp, or_mask, pad_words, **pool)
    geometry.check_pool_bits(xp, or_mask, pad_words, **pool)
    return reference.max_pool_bits(xp, or_mask, pad_words, **pool)


def pack_ternary_weights(levels: torch.Tensor) -> torch.Tensor:
    """Ternary levels ``[Out, F]`` -> the 2-bit uint8 ``[Out, ceil(F / 4)]`` weight (kernels and files)."""
    return reference.pack_ternary_weights(levels)


def ternary_layer(wp, *, in_features: int, scale=None, bias=None, norm_eps=None, norm_order=None):
    """A ternary linear layer with its constant operands bound and, with ``norm_eps``, its RMSNorm, run
    natively where ``norm_order`` says how torch sums it (``kernels.TernaryLayer``); None without the native
    kernels."""
    native = _native()
    if native is None:
        return None
    return native.TernaryLayer(
        wp, in_features=in_features, scale=scale, bias=bias, norm_eps=norm_eps, norm_order=norm_order
    )


def rms_norm_in_order(x: torch.Tensor, eps: float, *, lanes: int) -> torch.Tensor:
    """``F.rms_norm(x, (K,), eps=eps)`` of float32 ``[N, K]`` summed in torch's cascade order with ``lanes``-wide
    vectors (``kernels.rms_norm``): native only, it is what a probe compares with torch's."""
    native = _native()
    if native is None:
        raise RuntimeError(f"rms_norm_in_order needs the native kernels ({_NATIVE_ERROR})")
    return native.rms_norm(x, eps, lanes=lanes)


def ternary_linear_int(x, wp, *, in_features: int) -> torch.Tensor:
    """int32 ``[N, Out]`` ``= x @ levels.T`` of int8 ``x`` ``[N, F]`` and 2-bit ternary weights."""
    native = _impl("ternary_linear_int")
    if native is not None:
        return native(x, wp, in_features=in_features)
    geometry.check_ternary(x, wp, in_features, torch.int8)
    return reference.ternary_linear_int(x, wp, in_features=in_features)


def ternary_linear(x, wp, *, in_features: int, scale=None, bias=None) -> torch.Tensor:
    """BitLinear's ``(x_int @ levels.T) / s * scale + bias`` of float32 tokens ``[N, F]``
    (see kernels.ternary_linear)."""
    native = _impl("ternary_linear")
    if native is not None:
        return native(x, wp, in_features=in_features, scale=scale, bias=bias)
    geometry.check_ternary(x, wp, in_features, torch.float32, scale, bias)
    return reference.ternary_linear(x, wp, in_features=in_features, scale=scale, bias=bias)


def relayout(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """float32 ``x [N, C, H, W]`` in ``memory_format`` memory (channels_last or contiguous_format): ``x``
    itself when it already is, else a copy equal to ``x.contiguous(memory_format=...)`` in values and strides."""
    native = _impl("relayout")
    if native is not None:
        return native(x, memory_format)
    geometry.check_relayout(x, memory_format)
    return x.contiguous(memory_format=memory_format)


def max_pool2d(
    x: torch.Tensor, kernel_size, stride, padding=0, dilation=1, ceil_mode: bool = False, bn=None
) -> torch.Tensor:
    """torch's ``max_pool2d`` of float32 ``x [N, C, H, W]`` (NCHW or channels_last), bit for bit, in
    channels_last memory; with ``bn = (bn_scale, bn_shift, fma)``, of that BatchNorm of ``x`` (see
    kernels.max_pool2d)."""
    native = _impl("max_pool2d")
    if native is not None:
        return native(x, kernel_size, stride, padding, dilation, ceil_mode, bn)
    geometry.check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    if bn is not None:
        x = reference.batch_norm_epilogue(x, *bn)
    return reference.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
