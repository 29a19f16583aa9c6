"""Native int8 x int8 conv and linear layers (``csrc/kernels/int8_conv.h``): the input quantized by
the ``int8`` quantizer's divisor inside the kernel, int32 sums, the float epilogue
``fl(fl(fl(acc / s) * scale) + bias)``. Called eagerly, each returns None when the input holds a NaN
(the caller then runs the float path, which propagates it); traced, each is a custom op
(``onebit::int8_conv2d``, ``onebit::int8_linear``) that runs :mod:`onebit.engine.reference`'s form
for such an input itself."""

from __future__ import annotations

import torch

from onebit import _C
from onebit.engine import geometry, reference
from onebit.engine.kernels.operands import channel_ptr
from onebit.engine.kernels.registry import custom_op, direct

__all__ = ["int8_conv2d", "int8_linear", "int8_conv_kernel", "int8_panels"]

_F32 = torch.float32


def int8_conv_kernel() -> str:
    """The kernel the active ISA runs: ``avx512_vnni``, ``avx2`` or ``reference``."""
    return _C.int8_conv_kernel()


def _check_weight(w: torch.Tensor) -> None:
    if w.dtype != torch.int8 or not w.is_contiguous():
        raise ValueError(f"int8 layer: the weight must be a contiguous int8 tensor, got {w.dtype}")


def int8_panels(w: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' form of int8 weights ``[O, C / G, KH, KW]`` (or ``[O, F]``): panels of 16 output
    channels x 4 taps, and each channel's weight sum (int32). Made once per weight by a packed model."""
    _check_weight(w)
    if w.dim() == 2:
        w = w[:, :, None, None]
    o, cg, kh, kw = w.shape
    nbytes, nsums = _C.int8_panel_sizes(o, cg, kh, kw, groups)
    panels = torch.empty(nbytes, dtype=torch.int8)
    sums = torch.empty(nsums, dtype=torch.int32)
    _C.int8_panels_raw(w.data_ptr(), o, cg, kh, kw, groups, panels.data_ptr(), sums.data_ptr())
    return panels, sums


def _bn_operands(bn, channels: int) -> tuple[int, int, bool]:
    """Addresses of a BatchNorm epilogue ``(bn_scale, bn_shift, fma)`` (or None) and its rounding."""
    if bn is None:
        return 0, 0, False
    bn_scale, bn_shift, fma = bn
    return channel_ptr(bn_scale, "bn_scale", _F32, channels), channel_ptr(bn_shift, "bn_shift", _F32, channels), fma


def _conv_shape(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int) -> tuple[int, ...]:
    """``[N, C_out, OH, OW]`` of the conv, after checking ``x`` against ``w`` (one-line errors)."""
    if x.dim() != 4 or x.dtype != _F32 or x.shape[1] != w.shape[1] * groups:
        raise ValueError(
            f"int8_conv2d: expected float32 [N, {w.shape[1] * groups}, H, W], got {list(x.shape)} {x.dtype}"
        )
    n, _, h, wd = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = w.shape[2:], stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"int8_conv2d: input {list(x.shape)} is smaller than the kernel")
    return n, w.shape[0], oh, ow


def _pooled_shape(shape: tuple[int, ...], window) -> tuple[int, ...]:
    """The conv's ``[N, C_out, OH, OW]`` after a max pool of ``window`` (:meth:`IntegerPool.window`)."""
    if window is None:
        return shape
    kh, kw, sh, sw, ph, pw, dh, dw, ceil = window
    n, co, oh, ow = shape
    ph_out = geometry.pool_output_size(oh, kh, sh, ph, dh, bool(ceil))
    pw_out = geometry.pool_output_size(ow, kw, sw, pw, dw, bool(ceil))
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"int8_conv2d: the max pool's padding {[ph, pw]} exceeds half its kernel {[kh, kw]}")
    if ph_out <= 0 or pw_out <= 0:
        raise ValueError(f"int8_conv2d: the max pool's window {[kh, kw]} is larger than the conv's output {[oh, ow]}")
    return n, co, ph_out, pw_out


def _writes_channels_last(x: torch.Tensor, out_channels_last: bool) -> bool:
    return out_channels_last or (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def _output_format(x: torch.Tensor, out_channels_last: bool) -> torch.memory_format:
    return torch.channels_last if _writes_channels_last(x, out_channels_last) else torch.contiguous_format


def _empty_output(shape, channels_last: bool) -> torch.Tensor:
    n, co, oh, ow = shape
    if channels_last:
        return torch.empty((n, oh, ow, co), dtype=_F32).permute(0, 3, 1, 2)
    return torch.empty((n, co, oh, ow), dtype=_F32)


def _native_conv2d(x, w, stride, padding, dilation, groups, divisor, scale, bias, bn, out_channels_last, panels, pool):
    """The native kernel's result, or None where ``x`` holds a NaN."""
    window, sign = (None, None) if pool is None else pool
    conv_shape = _conv_shape(x, w, stride, padding, dilation, groups)
    n, co, oh, ow = shape = _pooled_shape(conv_shape, window)
    panels, sums = int8_panels(w, groups) if panels is None else panels
    channels_last = _writes_channels_last(x, out_channels_last)
    y = _empty_output(shape, channels_last)
    if n == 0:
        return y
    out_strides = [oh * ow * co, 1, co] if channels_last else [co * oh * ow, oh * ow, 1]
    geometry = [*x.shape, *x.stride(), co, *w.shape[2:], *stride, *padding, *dilation, groups]
    ok = _C.int8_conv2d_raw(
        x.data_ptr(),
        geometry,
        float(divisor),
        panels.data_ptr(),
        sums.data_ptr(),
        channel_ptr(scale, "scale", _F32, co),
        channel_ptr(bias, "bias", _F32, co),
        *_bn_operands(bn, co),
        y.data_ptr(),
        out_strides,
        torch.get_num_threads(),
        [] if window is None else [int(v) for v in window],
        0 if window is None else channel_ptr(sign, "pool_sign", torch.int32, co),
    )
    return y if ok else None


def _int8_conv2d_impl(
    x,
    w,
    stride,
    padding,
    dilation,
    groups,
    divisor,
    scale,
    bias,
    bn_scale,
    bn_shift,
    bn_fma,
    cl,
    pool=None,
    pool_sign=None,
):
    """The custom op: the native kernel, or (an input holding a NaN) the reference, in the same layout."""
    bn = None if bn_scale is None else (bn_scale, bn_shift, bn_fma)
    conv = (stride, padding, dilation, groups)
    y = _native_conv2d(x, w, *conv, divisor, scale, bias, bn, cl, None, None if pool is None else (pool, pool_sign))
    if y is None:
        y = reference.int8_conv2d(x, w, divisor, scale, bias, *conv, bn)
        if pool is not None:
            kh, kw, sh, sw, ph, pw, dh, dw, ceil = pool
            y = reference.max_pool2d(y, (kh, kw), (sh, sw), (ph, pw), (dh, dw), bool(ceil))
        y = y.contiguous(memory_format=_output_format(x, cl))
    return y


def _int8_conv2d_fake(
    x,
    w,
    stride,
    padding,
    dilation,
    groups,
    divisor,
    scale,
    bias,
    bn_scale,
    bn_shift,
    bn_fma,
    cl,
    pool=None,
    pool_sign=None,
):
    shape = _pooled_shape(_conv_shape(x, w, stride, padding, dilation, groups), pool)
    return x.new_empty(shape).contiguous(memory_format=_output_format(x, cl))


def _check_linear(x: torch.Tensor, w: torch.Tensor) -> tuple[int, int]:
    """``(out_features, in_features)`` after checking ``x`` against ``w`` (a one-line error)."""
    out, f = w.shape
    if x.dtype != _F32 or x.dim() < 1 or x.shape[-1] != f:
        raise ValueError(f"int8_linear: expected float32 [..., {f}], got {list(x.shape)} {x.dtype}")
    return out, f


def _native_linear(x, w, divisor, scale, bias, panels):
    out, f = _check_linear(x, w)
    panels, sums = int8_panels(w) if panels is None else panels
    lead = x.shape[:-1]
    rows = x.reshape(-1, f)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    y = torch.empty((m, out), dtype=_F32)
    if m > 0:
        geometry = [m, f, 1, 1, rows.stride(0), 1, 1, 1, out, 1, 1, 1, 1, 0, 0, 1, 1, 1]
        ok = _C.int8_conv2d_raw(
            rows.data_ptr(),
            geometry,
            float(divisor),
            panels.data_ptr(),
            sums.data_ptr(),
            channel_ptr(scale, "scale", _F32, out),
            channel_ptr(bias, "bias", _F32, out),
            0,
            0,
            False,
            y.data_ptr(),
            [out, 1, out],
            torch.get_num_threads(),
        )
        if not ok:
            return None
    return y.reshape(*lead, out)


def _int8_linear_impl(x, w, divisor, scale, bias):
    y = _native_linear(x, w, divisor, scale, bias, None)
    return reference.int8_linear(x, w, divisor, scale, bias) if y is None else y


def _int8_linear_fake(x, w, divisor, scale, bias):
    out, _ = _check_linear(x, w)
    return x.new_empty((*x.shape[:-1], out))


custom_op(
    "int8_conv2d",
    "(Tensor x, Tensor w, SymInt[] stride, SymInt[] padding, SymInt[] dilation, SymInt groups, float divisor, "
    "Tensor? scale, Tensor? bias, Tensor? bn_scale, Tensor? bn_shift, bool bn_fma, bool out_channels_last, "
    "SymInt[]? pool=None, Tensor? pool_sign=None) -> Tensor",
    _int8_conv2d_impl,
    _int8_conv2d_fake,
)
custom_op(
    "int8_linear",
    "(Tensor x, Tensor w, float divisor, Tensor? scale, Tensor? bias) -> Tensor",
    _int8_linear_impl,
    _int8_linear_fake,
)


def int8_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    scale,
    bias,
    a: dict,
    panels=None,
    bn=None,
    out_channels_last: bool = False,
    pool=None,
) -> torch.Tensor | None:
    """``conv(x_int, w) / s * scale + bias`` of float32 ``x`` ``[N, C, H, W]`` (output in ``x``'s memory
    format: channels_last for a channels_last input, else NCHW); ``a`` the ``int8_conv2d`` attributes,
    ``panels`` :func:`int8_panels` of ``w`` (made here when None); ``bn = (bn_scale, bn_shift, fma)``: a
    BatchNorm applied after, ``y * bn_scale + bn_shift`` rounded once (``fma``) or twice;
    ``out_channels_last``: the output in channels_last whatever the input's layout; ``pool = (window,
    sign)``: a max pool of the integer sums before the float epilogue (``window`` and ``sign`` as
    :class:`onebit.engine.steps.IntegerPool` gives them: exact only where its check passed).

    Eager, None where ``x`` holds a NaN (the caller runs its float path). Traced (``torch.export``,
    ``torch.compile``), the op ``onebit::int8_conv2d``, which runs the reference there itself."""
    _check_weight(w)
    conv = (a["stride"], a["padding"], a["dilation"], a["groups"])
    bn_scale, bn_shift, bn_fma = (None, None, False) if bn is None else bn
    window, sign = (None, None) if pool is None else pool
    if not direct(x, w, scale, bias, bn_scale, bn_shift, sign):
        args = (float(a["divisor"]), scale, bias, bn_scale, bn_shift, bn_fma, out_channels_last, window, sign)
        return torch.ops.onebit.int8_conv2d(x, w, *conv, *args)
    return _native_conv2d(x, w, *conv, a["divisor"], scale, bias, bn, out_channels_last, panels, pool)


def int8_linear(x: torch.Tensor, w: torch.Tensor, scale, bias, a: dict, panels=None) -> torch.Tensor | None:
    """``(x_int @ w.T) / s * scale + bias`` over the last dimension of float32 ``x`` (None where ``x``
    holds a NaN, eager; traced, the op ``onebit::int8_linear``)."""
    _check_weight(w)
    if not direct(x, w, scale, bias):
        return torch.ops.onebit.int8_linear(x, w, float(a["divisor"]), scale, bias)
    return _native_linear(x, w, a["divisor"], scale, bias, panels)
