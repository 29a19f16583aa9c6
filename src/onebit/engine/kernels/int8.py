"""Native int8 x int8 conv and linear layers (``csrc/kernels/int8_conv.h``): the input quantized by
the ``int8`` quantizer's divisor inside the kernel, int32 sums, the float epilogue
``fl(fl(fl(acc / s) * scale) + bias)``. Each returns None when the input holds a NaN (the caller
then runs the float path, which propagates it)."""

from __future__ import annotations

import torch

from onebit import _C
from onebit.engine.kernels.operands import channel_ptr

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


def int8_conv2d(
    x: torch.Tensor, w: torch.Tensor, scale, bias, a: dict, panels=None, bn=None, out_channels_last: bool = False
) -> torch.Tensor | None:
    """``conv(x_int, w) / s * scale + bias`` of float32 ``x`` ``[N, C, H, W]`` (output in ``x``'s memory
    format: channels_last for a channels_last input, else NCHW); ``a`` the ``int8_conv2d`` attributes,
    ``panels`` :func:`int8_panels` of ``w`` (made here when None); ``bn = (bn_scale, bn_shift, fma)``: a
    BatchNorm applied after, ``y * bn_scale + bn_shift`` rounded once (``fma``) or twice;
    ``out_channels_last``: the output in channels_last whatever the input's layout."""
    if x.dim() != 4 or x.dtype != _F32 or x.shape[1] != a["in_channels"]:
        raise ValueError(f"int8_conv2d: expected float32 [N, {a['in_channels']}, H, W], got {list(x.shape)} {x.dtype}")
    panels, sums = int8_panels(w, a["groups"]) if panels is None else panels
    n, c, h, wd = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel_size"], a["stride"], a["padding"], a["dilation"]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"int8_conv2d: input {list(x.shape)} is smaller than the kernel")
    co = a["out_channels"]
    channels_last = out_channels_last or (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    if channels_last:
        y = torch.empty((n, oh, ow, co), dtype=_F32).permute(0, 3, 1, 2)
        out_strides = [oh * ow * co, 1, co]
    else:
        y = torch.empty((n, co, oh, ow), dtype=_F32)
        out_strides = [co * oh * ow, oh * ow, 1]
    if n == 0:
        return y
    geometry = [n, c, h, wd, *x.stride(), co, kh, kw, sh, sw, ph, pw, dh, dw, a["groups"]]
    ok = _C.int8_conv2d_raw(
        x.data_ptr(),
        geometry,
        float(a["divisor"]),
        panels.data_ptr(),
        sums.data_ptr(),
        channel_ptr(scale, "scale", _F32, co),
        channel_ptr(bias, "bias", _F32, co),
        *_bn_operands(bn, co),
        y.data_ptr(),
        out_strides,
        torch.get_num_threads(),
    )
    return y if ok else None


def int8_linear(x: torch.Tensor, w: torch.Tensor, scale, bias, a: dict, panels=None) -> torch.Tensor | None:
    """``(x_int @ w.T) / s * scale + bias`` over the last dimension of float32 ``x``."""
    f, out = a["in_features"], a["out_features"]
    if x.dtype != _F32 or x.dim() < 1 or x.shape[-1] != f:
        raise ValueError(f"int8_linear: expected float32 [..., {f}], got {list(x.shape)} {x.dtype}")
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
            float(a["divisor"]),
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
