"""k-bit and ternary convolutions as sums of binary ones, by bit planes.

An integer level ``v`` of a k-bit or ternary quantizer is a sum of +-1 planes:

    divisor * v = sum_i coeff[i] * s_i + offset,        s_i in {-1, +1}

- symmetric k-bit (odd levels -n .. n, n = 2^k - 1; ``dorefa_sym``, ``dorefa_weight``):
  ``v = sum_i 2^i s_i`` with ``s_i = 2 bit_i((v + n) / 2) - 1``;
- unsigned k-bit (levels 0 .. n; ``dorefa``): ``2 v = sum_i 2^i s_i + n`` with ``s_i = 2 bit_i(v) - 1``;
- ternary (-1, 0, +1): ``2 v = s_0 + s_1`` with ``s_0 = +1 iff v >= 0``, ``s_1 = +1 iff v > 0``;
- binary (+-1): ``v = s_0``.

So a convolution of integer activations ``a`` with integer weights ``w`` is

    D_a D_w sum a w = sum_i sum_j c_i d_j conv(s_i, t_j) + offset_a * sum_j d_j T_j

where each ``conv(s_i, t_j)`` is an exact binary (xnor-popcount) convolution and ``T_j`` is the
sum of plane ``t_j`` over a kernel window. All plane pairs run as ONE binary convolution: the
activation planes stacked as groups (``P_a * G`` groups), each group's weights all the weight
planes of its output channels (``P_w * C_out / G`` outputs a group). The integer result is then
exact: equal to a float64 convolution of the integer levels.

Zero padding: a padded activation is 0. For codes without offset the planes are padded with 0
(the binary kernel's exact correction); for unsigned codes with -1 in every plane
(``sum_i 2^i (-1) + n = 0``), and the offset term then counts every tap (``T_j`` over the whole
kernel).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onebit import quant
from onebit.engine import ops
from onebit.nn.functional import scale_and_bias

__all__ = [
    "PlaneCode",
    "input_code",
    "weight_code",
    "integer_input",
    "stack_weight_planes",
    "activation_planes",
    "bitplane_conv2d_int",
    "bitplane_layer",
    "nan_where_read",
]

#: the most activation / weight planes a layer is run with by planes (more: a float conv is faster)
MAX_INPUT_PLANES, MAX_WEIGHT_PLANES = 4, 3


@dataclass(frozen=True)
class PlaneCode:
    """``divisor * v = sum_i coeffs[i] * s_i + offset`` for the integer levels ``v`` of one quantizer."""

    kind: str  # "symmetric", "unsigned", "ternary", "binary"
    bits: int

    @staticmethod
    def symmetric(bits: int) -> PlaneCode:
        return PlaneCode("symmetric", _bits(bits))

    @staticmethod
    def unsigned(bits: int) -> PlaneCode:
        return PlaneCode("unsigned", _bits(bits))

    @staticmethod
    def ternary() -> PlaneCode:
        return PlaneCode("ternary", 2)

    @staticmethod
    def binary() -> PlaneCode:
        return PlaneCode("binary", 1)

    @property
    def planes(self) -> int:
        return {"ternary": 2, "binary": 1}.get(self.kind, self.bits)

    @property
    def coeffs(self) -> tuple[int, ...]:
        if self.kind == "ternary":
            return (1, 1)
        return tuple(1 << i for i in range(self.planes))

    @property
    def offset(self) -> int:
        return (1 << self.bits) - 1 if self.kind == "unsigned" else 0

    @property
    def divisor(self) -> int:
        return 2 if self.kind in ("unsigned", "ternary") else 1

    @property
    def levels(self) -> tuple[int, int]:
        """The smallest and largest level."""
        n = (1 << self.bits) - 1
        return {"symmetric": (-n, n), "unsigned": (0, n), "ternary": (-1, 1), "binary": (-1, 1)}[self.kind]

    @property
    def pad_value(self) -> float:
        """The value of every plane at a zero-padded position."""
        return -1.0 if self.offset else 0.0

    def split(self, v: torch.Tensor) -> torch.Tensor:
        """The +-1 planes of integer levels ``v`` (float32 ``[planes, *v.shape]``); checks every level."""
        _check_levels(v, self)
        vi = v.to(torch.int64)
        if self.kind == "binary":
            bits = [vi > 0]
        elif self.kind == "ternary":
            bits = [vi >= 0, vi > 0]
        else:
            j = (vi + ((1 << self.bits) - 1)) // 2 if self.kind == "symmetric" else vi
            bits = [((j >> i) & 1).bool() for i in range(self.planes)]
        return torch.stack([torch.where(b, 1.0, -1.0) for b in bits])

    def join(self, planes: torch.Tensor) -> torch.Tensor:
        """``v`` back from its planes (float64): the code's definition."""
        total = sum(c * planes[i].double() for i, c in enumerate(self.coeffs)) + self.offset
        return total / self.divisor


def input_code(q) -> PlaneCode | None:
    """The plane code of an input quantizer's integers (:func:`onebit.quant.integer_code_of`:
    ``unsigned`` or ``symmetric``, at most :data:`MAX_INPUT_PLANES` bits), else None."""
    code = quant.integer_code_of(q)
    if code is None or code.kind not in ("unsigned", "symmetric") or code.bits > MAX_INPUT_PLANES:
        return None
    return PlaneCode(code.kind, code.bits)


def weight_code(q) -> PlaneCode | None:
    """The plane code of a weight quantizer's ``factor()`` levels (:func:`onebit.quant.factor_code_of`:
    ``binary``, ``ternary``, or ``symmetric`` of at most :data:`MAX_WEIGHT_PLANES` bits), else None."""
    code = quant.factor_code_of(q)
    if code is None or code.kind not in ("binary", "ternary", "symmetric"):
        return None
    if code.kind == "symmetric" and code.bits > MAX_WEIGHT_PLANES:
        return None
    return PlaneCode(code.kind, code.bits)


def integer_input(x: torch.Tensor, kind: str, bits: int, clip: float) -> torch.Tensor:
    """The integers an input quantizer's ``integer_factor`` gives (``"dorefa"``: 0 .. n; ``"dorefa_sym"``:
    odd -n .. n on the clip), computed by the same functions."""
    n = (1 << bits) - 1
    if kind == "dorefa":
        return quant.unsigned_integers(x, n)
    return quant.symmetric_integers(x, clip, n)[0]


def _bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bit planes: bits must be an integer in [1, 8], got {bits!r}")
    return bits


def _check_levels(v: torch.Tensor, code: PlaneCode) -> None:
    lo, hi = code.levels
    vd = v.detach()
    bad = (vd != torch.round(vd)) | (vd < lo) | (vd > hi)
    if code.kind == "symmetric":
        bad |= torch.remainder(vd, 2) != 1
    elif code.kind == "binary":
        bad |= vd == 0
    if bool(bad.any()):
        value = vd[bad].flatten()[0].item()
        raise ValueError(f"bit planes: level {value} is not a {code.kind} {code.bits}-bit integer level")


def stack_weight_planes(levels: torch.Tensor, code: PlaneCode, act_planes: int, groups: int) -> torch.Tensor:
    """float32 +-1 weights ``[act_planes * G * P_w * C_out/G, C_in/G, KH, KW]`` of the stacked binary conv.

    Output channel ``((i * G + g) * P_w + j) * C_out/G + c`` holds weight plane ``j`` of output
    channel ``g * C_out/G + c``; its group ``i * G + g`` reads activation plane ``i`` of group ``g``.
    """
    co = levels.shape[0]
    if co % groups:
        raise ValueError(f"bit planes: groups={groups} must divide the {co} output channels")
    planes = code.split(levels)  # [P_w, Co, Cg, KH, KW]
    pw = planes.shape[0]
    per = planes.view(pw, groups, co // groups, *levels.shape[1:]).transpose(0, 1)  # [G, P_w, Cog, ...]
    return per.unsqueeze(0).expand(act_planes, *per.shape).reshape(-1, *levels.shape[1:]).contiguous()


def activation_planes(x_int: torch.Tensor, code: PlaneCode) -> torch.Tensor:
    """float32 ``[N, P_a * C, H, W]``, plane-major, whose signs are the +-1 planes of ``x_int``.

    A few tensor ops instead of bit extraction: for odd integers ``y`` in [-n, n] (symmetric
    levels, or ``2 v - n`` for unsigned ones) the top plane is ``sign(y)`` and the rest are the
    planes of ``y - 2^(k-1) sign(y)``; so plane ``i``'s values are that remainder after the planes
    above it. Ternary: ``v`` (sign(0) = +1) and ``v - 1/2``. Binary: ``v``.
    """
    if code.kind == "binary":
        return x_int
    if code.kind == "ternary":
        return torch.cat([x_int, x_int - 0.5], dim=1)
    y = x_int if code.kind == "symmetric" else 2.0 * x_int - code.offset
    planes = []
    for i in reversed(range(code.planes)):
        planes.append(y)
        if i:
            y = y - (1 << i) * torch.sign(y)
    return torch.cat(planes[::-1], dim=1)


def pair_coefficients(act: PlaneCode, weight: PlaneCode) -> list[int]:
    """``c_i d_j`` of every plane pair, activation plane major (pair ``i * P_w + j``)."""
    return [ci * dj for ci in act.coeffs for dj in weight.coeffs]


@functools.lru_cache(maxsize=64)
def _coefficient_tensor(act: PlaneCode, weight: PlaneCode) -> torch.Tensor:
    return torch.tensor(pair_coefficients(act, weight), dtype=torch.int32)  # read only, shared


def offset_term(act: PlaneCode, weight: PlaneCode, plane_sums: torch.Tensor) -> torch.Tensor | None:
    """int32 ``[C_out]`` ``offset_a * sum_j d_j T_j`` (unsigned activations), or None: ``plane_sums``
    is ``[P_w, C_out]``, each weight plane summed over its kernel window."""
    if not act.offset:
        return None
    sums = (plane_sums.to(torch.int64) * torch.tensor(weight.coeffs).view(-1, 1)).sum(0)
    return (act.offset * sums).to(torch.int32).contiguous()


def bitplane_conv2d_int(
    x_int: torch.Tensor,
    weight_planes_packed: torch.Tensor,
    weight_plane_sums: torch.Tensor,
    *,
    act: PlaneCode,
    weight: PlaneCode,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    cache=None,
) -> torch.Tensor:
    """``conv(x_int, levels)`` exactly, as float32 ``[N, C_out, OH, OW]`` (an integer in each element).

    ``weight_planes_packed``: ``pack_weights`` of :func:`stack_weight_planes` (with
    ``groups = act.planes * groups``); ``weight_plane_sums``: ``[P_w, C_out]`` integers, each weight
    plane summed over its kernel window (used by unsigned activations). Zero padding. The result
    is in channels_last memory.
    """
    pa, pw = act.planes, weight.planes
    g = groups * pa
    cog = out_channels // groups
    y = ops.binary_conv2d_int(  # the float planes are packed inside the call
        activation_planes(x_int, act),
        weight_planes_packed,
        in_channels=in_channels * pa,
        out_channels=pa * groups * pw * cog,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=g,
        pad_value=act.pad_value,
        cache=cache,
    )
    n, _, oh, ow = y.shape
    # [N, OH, OW, P_a, G, P_w, Cog] in the kernel's channels-last memory: a weighted sum of the
    # plane pairs in int32 (|sum| <= K * n_a * n_w, far below 2^31)
    y = y.permute(0, 2, 3, 1).reshape(n, oh, ow, pa, groups, pw, cog)
    total = None
    for k, f in enumerate(pair_coefficients(act, weight)):
        i, j = divmod(k, pw)
        term = y[:, :, :, i, :, j] if f == 1 else y[:, :, :, i, :, j] * f
        total = term if total is None else total + term
    total = total.reshape(n, oh, ow, out_channels)
    offset = offset_term(act, weight, weight_plane_sums)
    if offset is not None:
        total = total + offset
    divisor = act.divisor * weight.divisor
    if divisor != 1:
        total = torch.div(total, divisor, rounding_mode="floor")  # exact: the sum is a multiple
    return total.to(torch.float32).permute(0, 3, 1, 2)


def bitplane_layer(
    x: torch.Tensor,
    stacked_weight: torch.Tensor,
    plane_sums: torch.Tensor,
    *,
    act: PlaneCode,
    weight: PlaneCode,
    quantizer: str,
    clip: float,
    input_divisor: float,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    cache=None,
) -> torch.Tensor:
    """A k-bit layer on its float input ``x`` ``[N, C, H, W]``: ``conv(x_int, levels) / s * scale + bias``
    (channels_last memory). Natively three calls: the quantizer's integers packed as planes, the
    stacked binary conv, the weighted sum of plane pairs with ``/ s * scale + bias``; else the same
    by tensor ops (:func:`integer_input`, :func:`bitplane_conv2d_int`)."""
    conv = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    pa, pw = act.planes, weight.planes
    if ops.backend() != "native":
        x_int = integer_input(x, quantizer, act.bits, clip)
        acc = bitplane_conv2d_int(
            x_int,
            stacked_weight,
            plane_sums,
            act=act,
            weight=weight,
            in_channels=in_channels,
            out_channels=out_channels,
            groups=groups,
            cache=cache,
            **conv,
        )
        y = scale_and_bias(acc / input_divisor, scale, bias, spatial_dims=2)
        traced = type(x) is not torch.Tensor or torch.compiler.is_compiling()
        nan = None if traced else bool(torch.isnan(x).any())
    else:
        from onebit.engine import kernels as K

        xp, nan = K.pack_integer_planes_nan(
            x, padding, groups, symmetric=act.kind == "symmetric", bits=act.bits, clip=clip
        )
        y = ops.binary_conv2d_int(
            xp,
            stacked_weight,
            in_channels=in_channels * pa,
            out_channels=pa * pw * out_channels,
            groups=groups * pa,
            pad_value=act.pad_value,
            cache=cache,
            **conv,
        )
        y = K.combine_planes(
            y,
            _coefficient_tensor(act, weight),
            offset_term(act, weight, plane_sums),
            act_planes=pa,
            groups=groups,
            weight_planes=pw,
            exact_divisor=act.divisor * weight.divisor,
            divisor=input_divisor,
            scale=scale,
            bias=bias,
        )
    if nan is False:  # the kernel's pass over x saw no NaN: nothing more to do
        return y
    return nan_where_read(y, x, groups=groups, **conv)  # a NaN (or, traced, perhaps one)


def nan_where_read(
    y: torch.Tensor,
    x: torch.Tensor,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """``y`` (a conv of ``x``'s quantized integers) with NaN at every output that reads a NaN of ``x``.

    The quantizers keep a NaN (``clamp`` and ``round`` of NaN are NaN), so the model's float conv
    of the integers is NaN at every output channel of a group whose window (kernel, stride,
    dilation; a zero-padded position is no NaN) holds a NaN in one of that group's input channels,
    and finite elsewhere: the same positions here, the others untouched (the integer planes of the
    other inputs are exact). The window test is a max pool of the group's NaN indicator."""
    n, c, h, w = x.shape
    ph, pw = padding
    bad = torch.isnan(x).unflatten(1, (groups, c // groups)).any(dim=2).to(torch.float32)  # [N, G, H, W]
    if ph or pw:
        bad = F.pad(bad, (pw, pw, ph, ph))
    hit = F.max_pool2d(bad, kernel_size, stride, 0, dilation) > 0  # [N, G, OH, OW]
    hit = hit.repeat_interleave(y.shape[1] // groups, dim=1)
    return y.masked_fill(hit, float("nan"))
