"""Portable pure-torch implementation of the engine's kernels: the oracle and the fallback.

Every function here has the signature and result of its native twin in
:mod:`onebit.engine.kernels` and computes it the slow, obvious way (xor and a
SWAR popcount on int64 words), independently of the float convolution the
simulated model uses. The packed engine runs on these when the native kernels
are not available or when asked to (``onebit.engine.ops.use_backend("reference")``).
The arguments are checked before, by :mod:`onebit.engine.ops` (with :mod:`onebit.engine.geometry`).

Bit convention (see ``csrc/kernels/pack.h``): bit set = -1 (``x < 0``), bit clear = +1,
so sign(0) = +1 and NaN packs as +1. Channel ``c`` of group ``g`` lives in word
``c // 64`` at bit ``c % 64`` of that group's words; unused high bits are 0.

Shapes:

- packed activations ``[N, H + 2 ph, W + 2 pw, G, Wg]`` int64, ``Wg = ceil((C / G) / 64)``;
- packed conv weights ``[C_out, KH, KW, Wg]`` int64, ``Wg = ceil((C_in / G) / 64)``;
- packed features ``[N, Wg]`` and linear weights ``[Out, Wg]`` int64, ``Wg = ceil(F / 64)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from onebit.bits import pack_bits as _pack_bits
from onebit.bits import words_for
from onebit.engine.geometry import PoolSpec, conv_output_size, pair, pool_output_size
from onebit.engine.geometry import used_bits as _used_bit_words

__all__ = [
    "words_for",
    "pack_activations",
    "pack_weights",
    "pack_features",
    "binary_conv2d_int",
    "binary_conv2d",
    "binary_conv2d_threshold",
    "threshold_negative",
    "threshold_signs",
    "threshold_pack",
    "binary_linear_int",
    "binary_linear",
    "binary_linear_threshold",
    "conv_output_size",
    "pool_output_size",
    "max_pool2d",
    "max_pool_bits",
    "pack_ternary_weights",
    "unpack_ternary_weights",
    "ternary_linear_int",
    "ternary_linear",
    "int8_integers",
    "int8_quantize",
    "batch_norm_epilogue",
    "int8_conv2d",
    "int8_linear",
]

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int64 word (SWAR; arithmetic shifts are masked off)."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return (x * _H01) >> 56 & 0xFF


def _pair(v: int | Sequence[int], name: str = "value") -> tuple[int, int]:
    return pair(v if not isinstance(v, (tuple, list)) else tuple(int(x) for x in v), name)


def pack_activations(
    x: torch.Tensor, padding: Sequence[int] = (0, 0), pad_value: float = 0.0, groups: int = 1
) -> torch.Tensor:
    """float32 ``[N, C, H, W]`` (any strides) -> int64 ``[N, H+2ph, W+2pw, G, Wg]``.

    Padded positions are +1 (bit clear) for ``pad_value`` 0 or +1, -1 (bit set) for -1;
    zero padding is made exact by the conv's correction term, not here.
    """
    n, c, h, w = x.shape
    ph, pw = _pair(padding)
    bits = x < 0
    if ph or pw:
        bits = F.pad(bits, (pw, pw, ph, ph), value=bool(pad_value < 0))
    bits = bits.permute(0, 2, 3, 1).reshape(n, h + 2 * ph, w + 2 * pw, groups, c // groups)
    return _pack_bits(bits)


def pack_features(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, F]`` -> int64 ``[N, ceil(F/64)]``."""
    return _pack_bits(x < 0)


def pack_weights(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """float32 ``[C_out, C_in/G, KH, KW]`` -> int64 ``[C_out, KH, KW, Wg]`` (bit set = w < 0).

    A 2-D ``[Out, F]`` weight (linear layer) packs to ``[Out, ceil(F/64)]``.
    """
    if w.dim() == 2:
        return _pack_bits(w < 0)
    return _pack_bits((w < 0).permute(0, 2, 3, 1))


def binary_conv2d_int(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Exact integer binary convolution: int32 ``[N, C_out, OH, OW]``.

    ``acc = sum sign(x) * sign(w)`` over the window, with padded taps worth ``pad_value``
    (for 0, the +1 the padded bits hold is subtracted back exactly).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    n, hp, wpad, g, wg = xp.shape
    h, w = hp - 2 * ph, wpad - 2 * pw
    oh, ow = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    cog = out_channels // groups
    cig = in_channels // groups
    k = cig * kh * kw
    wgrp = wp.view(groups, cog, kh, kw, wg)
    pop = torch.zeros(n, oh, ow, groups, cog, dtype=torch.int64)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            xs = xp[:, r0 : r0 + (oh - 1) * sh + 1 : sh, c0 : c0 + (ow - 1) * sw + 1 : sw]  # [N, OH, OW, G, Wg]
            diff = xs.unsqueeze(4) ^ wgrp[:, :, i, j]  # [N, OH, OW, G, Cog, Wg]
            pop += popcount(diff).sum(dim=-1)
    acc = k - 2 * pop
    acc = acc.reshape(n, oh, ow, out_channels).permute(0, 3, 1, 2)
    if pad_value == 0.0 and (ph or pw):
        # padded taps held +1: subtract sum_ci sign(w[co, ci, i, j]) for every padded tap
        s = cig - 2 * popcount(wp).sum(dim=-1)  # [C_out, KH, KW]
        border = torch.ones(1, 1, hp, wpad, dtype=torch.float64)
        border[:, :, ph : ph + h, pw : pw + w] = 0
        corr = F.conv2d(border, s.to(torch.float64).unsqueeze(1), stride=(sh, sw), dilation=(dh, dw))
        acc = acc - corr.round().to(torch.int64)
    return acc.to(torch.int32).contiguous()


def binary_conv2d(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    **conv,
) -> torch.Tensor:
    """float32 ``[N, C_out, OH, OW]`` = ``acc * scale + bias`` (each optional, per channel)."""
    y = binary_conv2d_int(xp, wp, **conv).to(torch.float32)
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


def threshold_negative(acc: torch.Tensor, thresholds: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """bool, ``acc``'s shape (channels in dimension 1): True (the sign -1) iff ``acc < thr`` (direction
    +1) or ``acc > thr`` (direction -1). Compared in ``acc``'s float dtype (``|thr| <= K + 1 < 2^24``:
    exact; a NaN is never negative) or in int64 for integer accumulators."""
    shape = [1] * acc.dim()
    shape[1] = -1
    thr = thresholds.view(shape)
    if acc.is_floating_point():
        thr = thr.to(acc.dtype)
    else:
        acc, thr = acc.to(torch.int64), thr.to(torch.int64)
    return torch.where((direction > 0).view(shape), acc < thr, acc > thr)


def threshold_signs(acc: torch.Tensor, thresholds: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """float32 +-1 of :func:`threshold_negative` (-1 where it is True)."""
    return torch.where(threshold_negative(acc, thresholds, direction), -1.0, 1.0)


def threshold_pack(
    acc: torch.Tensor,
    thresholds: torch.Tensor,
    direction: torch.Tensor,
    *,
    out_padding: Sequence[int] = (0, 0),
    out_pad_value: float = 0.0,
    out_groups: int = 1,
) -> torch.Tensor:
    """Integer-valued ``[N, C, H, W]`` accumulators -> packed signs of the thresholded values.

    Bit set (-1) iff ``acc < thr`` (direction +1) or ``acc > thr`` (direction -1).
    """
    return pack_activations(threshold_signs(acc, thresholds, direction), out_padding, out_pad_value, out_groups)


def fused_multiply_add(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` in float32 rounded once, as a fused multiply-add (``std::fma``) does.

    The float32 product is exact in float64, and the float64 sum ``r`` is exact up to its error
    ``e`` (``r + e = x * scale + shift``, Knuth's two-sum). Rounding ``r`` to float32 is then the
    correct rounding except when ``r`` lies exactly halfway between two float32 values and
    ``e != 0``: the exact value is on the side of ``e``'s sign.
    """
    xd, sd, td = x.double(), scale.double(), shift.double()
    p = xd * sd
    r = p + td
    virtual = r - p
    e = (p - (r - virtual)) + (td - virtual)
    out = r.float()
    below = torch.where(out.double() > r, torch.nextafter(out, out.new_tensor(float("-inf"))), out)
    above = torch.nextafter(below, below.new_tensor(float("inf")))
    halfway = (r - below.double()) == (above.double() - r)
    fix = halfway & (e != 0) & torch.isfinite(r)
    return torch.where(fix, torch.where(e > 0, above, below), out)


def binary_conv2d_threshold(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    thresholds: torch.Tensor,
    direction: torch.Tensor,
    out_padding: Sequence[int] = (0, 0),
    out_pad_value: float = 0.0,
    out_groups: int = 1,
    **conv,
) -> torch.Tensor:
    """Binary conv whose output is thresholded and packed straight away (see :func:`threshold_pack`)."""
    acc = binary_conv2d_int(xp, wp, **conv)
    return threshold_pack(
        acc, thresholds, direction, out_padding=out_padding, out_pad_value=out_pad_value, out_groups=out_groups
    )


def binary_linear_int(xp: torch.Tensor, wp: torch.Tensor, *, in_features: int) -> torch.Tensor:
    """int32 ``[N, Out]``: ``acc = in_features - 2 popcount(x xor w)``."""
    pop = popcount(xp.unsqueeze(1) ^ wp.unsqueeze(0)).sum(dim=-1)
    return (in_features - 2 * pop).to(torch.int32)


def binary_linear(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_features: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[N, Out]`` = ``acc * scale + bias``."""
    y = binary_linear_int(xp, wp, in_features=in_features).to(torch.float32)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def binary_linear_threshold(
    xp: torch.Tensor, wp: torch.Tensor, *, in_features: int, thresholds: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """Packed int64 ``[N, ceil(Out/64)]``: bit set iff ``acc < thr`` (direction +1) or ``acc > thr`` (-1)."""
    acc = binary_linear_int(xp, wp, in_features=in_features)
    return _pack_bits(threshold_negative(acc, thresholds, direction))


_POOL_INDEX: dict[tuple, torch.Tensor] = {}


def _cacheable(t: torch.Tensor) -> bool:
    """A tensor made here may be kept for later calls: a plain tensor, made outside any tracing
    (under ``torch.export``/``torch.compile`` a new tensor is a fake one, without real values)."""
    return (
        type(t) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._is_torch_function_mode_enabled()
    )


def _pool_index(
    h: int, w: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int, oh: int, ow: int
) -> torch.Tensor:
    """int64 ``[OH * OW, KH * KW]``: flat input positions of every window tap; ``H * W`` where the
    tap falls into the padding (max pooling ignores those)."""
    key = (h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)
    idx = _POOL_INDEX.get(key)
    if idx is None:
        r = (torch.arange(oh) * sh - ph).view(oh, 1) + torch.arange(kh).view(1, kh) * dh  # [OH, KH]
        c = (torch.arange(ow) * sw - pw).view(ow, 1) + torch.arange(kw).view(1, kw) * dw  # [OW, KW]
        rv, cv = (r >= 0) & (r < h), (c >= 0) & (c < w)
        flat = r.view(oh, 1, kh, 1) * w + c.view(1, ow, 1, kw)
        valid = rv.view(oh, 1, kh, 1) & cv.view(1, ow, 1, kw)
        idx = torch.where(valid, flat, h * w).reshape(oh * ow, kh * kw).contiguous()
        if len(_POOL_INDEX) < 256 and _cacheable(idx):
            _POOL_INDEX[key] = idx
    return idx


_USED_BITS: dict[tuple[int, int], torch.Tensor] = {}


def used_bits(channels: int, words: int) -> torch.Tensor:
    """int64 ``[words]`` with the bits of ``channels`` channels set (the rest of the last word clear)."""
    cached = _USED_BITS.get((channels, words))
    if cached is not None:
        return cached
    mask = torch.tensor(_used_bit_words(channels, words), dtype=torch.int64)
    if len(_USED_BITS) < 1024 and _cacheable(mask):
        _USED_BITS[(channels, words)] = mask
    return mask


def max_pool_bits(
    xp: torch.Tensor,
    or_mask: torch.Tensor,
    pad_words: torch.Tensor,
    *,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    out_padding: Sequence[int],
    channels: int,
) -> torch.Tensor:
    """Max pooling of thresholded accumulators, on their packed bits.

    ``xp``: packed ``[N, H, W, G, Wg]`` (no padding), the bits of ``acc < thr`` (channels of
    direction +1) or ``acc > thr`` (direction -1; their bits are set in ``or_mask [G, Wg]``).
    Since ``max(acc) < thr`` iff every ``acc < thr`` and ``max(acc) > thr`` iff some ``acc > thr``,
    the pooled bit is the AND of the window's bits for direction +1 and the OR for -1 (padded
    window positions, which max pooling ignores, take no part). ANDs are computed as ORs of the
    flipped bits. The result is written into a ``[N, OH + 2 oph, OW + 2 opw, G, Wg]`` tensor whose
    border words are ``pad_words [G, Wg]``.
    """
    n, h, w, g, wg = xp.shape
    pool = PoolSpec(_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), bool(ceil_mode))
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pool.kernel, pool.stride, pool.padding, pool.dilation
    oh, ow = pool.output_size(h, w)
    flip = (used_bits(channels // g, wg).view(1, wg) & ~or_mask).reshape(1, 1, g * wg)  # the AND channels
    if (kh, kw) == (sh, sw) and ph == pw == 0 and dh == dw == 1 and h % kh == 0 and w % kw == 0:
        # non-overlapping windows tiling the image: a view, no gather
        x = (xp.reshape(n, h, w, g * wg) ^ flip.view(1, 1, 1, -1)).view(n, oh, kh, ow, kw, g * wg)
        pooled = x[:, :, 0, :, 0]
        for i in range(kh):
            for j in range(kw):
                if i or j:
                    pooled = pooled | x[:, :, i, :, j]
        pooled = (pooled ^ flip.view(1, 1, 1, -1)).view(n, oh, ow, g, wg)
        return _pad_packed(pooled, pad_words, out_padding)
    x = xp.reshape(n, h * w, g * wg) ^ flip
    x = torch.cat([x, torch.zeros(n, 1, g * wg, dtype=torch.int64)], dim=1)  # position H*W: padding, OR-neutral
    taps = x[:, _pool_index(h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)]  # [N, OH*OW, KH*KW, G*Wg]
    pooled = taps[:, :, 0]
    for t in range(1, kh * kw):
        pooled = pooled | taps[:, :, t]
    pooled = (pooled ^ flip).view(n, oh, ow, g, wg)
    return _pad_packed(pooled, pad_words, out_padding)


def _pad_packed(x: torch.Tensor, pad_words: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """Packed ``[N, H, W, G, Wg]`` -> ``[N, H + 2 ph, W + 2 pw, G, Wg]`` with ``pad_words [G, Wg]`` around it."""
    ph, pw = _pair(padding)
    if not (ph or pw):
        return x.contiguous()
    n, h, w, g, wg = x.shape
    out = pad_words.view(1, 1, 1, g, wg).expand(n, h + 2 * ph, w + 2 * pw, g, wg).clone()
    out[:, ph : ph + h, pw : pw + w] = x
    return out


# ---------------------------------------------------------------------------
# ternary weights x int8 activations (BitLinear): 2-bit codes, see csrc/kernels/ternary_linear.h


def ternary_row_bytes(in_features: int) -> int:
    """Bytes of one packed ternary weight row: four 2-bit codes a byte."""
    return (int(in_features) + 3) // 4


def pack_ternary_weights(levels: torch.Tensor) -> torch.Tensor:
    """float levels in {-1, 0, +1} ``[Out, F]`` -> uint8 ``[Out, ceil(F / 4)]``: weight ``k`` is the 2-bit
    code ``w + 1`` at bits ``2 (k % 4)`` of byte ``k // 4``; the unused codes of the last byte are 0."""
    if levels.dim() != 2:
        raise ValueError(f"ternary levels must be [Out, F], got shape {list(levels.shape)}")
    if not bool(((levels == -1) | (levels == 0) | (levels == 1)).all()):
        raise ValueError("ternary levels must all be -1, 0 or +1")
    out, f = levels.shape
    codes = (levels.to(torch.int64) + 1).to(torch.uint8)
    pad = ternary_row_bytes(f) * 4 - f
    codes = torch.cat([codes, torch.zeros(out, pad, dtype=torch.uint8)], dim=1).reshape(out, -1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8).contiguous()


def unpack_ternary_weights(wp: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 ``[Out, ceil(F / 4)]`` -> float32 levels ``[Out, F]`` in {-1, 0, +1}."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    codes = (wp.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(wp.shape[0], -1)[:, :in_features].to(torch.float32) - 1.0


def ternary_linear_int(x: torch.Tensor, wp: torch.Tensor, *, in_features: int) -> torch.Tensor:
    """int32 ``[N, Out]`` ``= x @ levels.T`` for int8 ``x`` ``[N, F]``, summed in int64."""
    levels = unpack_ternary_weights(wp, in_features).to(torch.int64)
    return (x.to(torch.int64) @ levels.T).to(torch.int32)


def absmax8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_int int8 [N, F], s float32 [N, 1])``: ``s = 127 / max(max|x|, 1e-5)``, ``x_int = clamp(round(x s))``
    (NaN where a token is not finite, as int8 cannot say so: such rows give NaN outputs)."""
    m = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
    s = torch.full_like(m, 127.0) / m
    return torch.round(x * s).clamp(-128.0, 127.0), s


def ternary_linear(
    x: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_features: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[N, Out]`` ``= (x_int @ levels.T) / s * scale + bias`` of float32 tokens ``x`` ``[N, F]``."""
    q, s = absmax8(x)
    finite = torch.isfinite(q).all(dim=1, keepdim=True)
    acc = ternary_linear_int(torch.where(finite, q, 0.0).to(torch.int8), wp, in_features=in_features)
    y = acc.to(torch.float32) / s
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return torch.where(finite, y, float("nan"))


def max_pool2d(x: torch.Tensor, kernel_size, stride, padding=0, dilation=1, ceil_mode: bool = False) -> torch.Tensor:
    """torch's ``max_pool2d`` of ``x [N, C, H, W]``, in channels_last memory."""
    x = x.contiguous(memory_format=torch.channels_last)
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


#: the largest magnitude of an int8 level or input integer
INT8_MAX = 127


def int8_integers(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``clamp(round(x * s), -127, 127)`` in ``x``'s dtype (``x * s`` rounded first, then half to even)."""
    s = torch.tensor(divisor, dtype=torch.float32).to(x.dtype)
    return torch.round(x * s).clamp_(-INT8_MAX, INT8_MAX)


def _divide(y: torch.Tensor, divisor: float) -> torch.Tensor:
    """``y / s`` with ``s`` the float32 divisor (in ``y``'s dtype)."""
    return y / torch.tensor(divisor, dtype=torch.float32).to(y.dtype)


def int8_quantize(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """The ``int8`` quantizer's forward ``x_int / s``."""
    return _divide(int8_integers(x, divisor), divisor)


def batch_norm_epilogue(y: torch.Tensor, bn_scale: torch.Tensor, bn_shift: torch.Tensor, fma: bool) -> torch.Tensor:
    """A BatchNorm fused into a kernel's epilogue: ``y * bn_scale + bn_shift`` per channel (dim 1),
    rounded once (``fma``) or twice."""
    view = (1, -1) + (1,) * (y.dim() - 2)
    s, b = bn_scale.view(view), bn_shift.view(view)
    return fused_multiply_add(y, s, b) if fma else y * s + b


def _int8_epilogue(y: torch.Tensor, divisor: float, scale, bias, spatial_dims: int) -> torch.Tensor:
    """``fl(fl(fl(acc / s) * scale) + bias)`` per channel (the dimension before ``spatial_dims``)."""
    view = [-1] + [1] * spatial_dims
    y = _divide(y, divisor)
    if scale is not None:
        y = y * scale.reshape(view)
    if bias is not None:
        y = y + bias.reshape(view)
    return y


def int8_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    divisor: float,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    bn=None,
) -> torch.Tensor:
    """``conv(x_int, w) / s * scale + bias`` (then ``bn``) of float ``x`` and int8 levels ``w`` (or the
    same levels as floats), ``bn = (bn_scale, bn_shift, fma)`` a BatchNorm after it (see
    :func:`batch_norm_epilogue`): the integer sum is exact in float32 while taps x 127^2 < 2^24."""
    levels = w.to(x.dtype)
    y = F.conv2d(int8_integers(x, divisor), levels, None, stride, padding, dilation, groups)
    y = _int8_epilogue(y, divisor, scale, bias, 2)
    return y if bn is None else batch_norm_epilogue(y, *bn)


def int8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    divisor: float,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x_int @ w.T) / s * scale + bias`` over the last dimension of float ``x``."""
    return _int8_epilogue(F.linear(int8_integers(x, divisor), w.to(x.dtype)), divisor, scale, bias, 0)
