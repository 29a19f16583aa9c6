"""The geometry of the engine's binary convolutions and bit max pooling, and their one argument check.

Every path of a binary convolution (the native kernels of :mod:`onebit.engine.kernels`, their
fake implementations under tracing, and the pure-torch reference that :mod:`onebit.engine.ops`
runs) checks its arguments here, so that the same mistake raises the same ``ValueError`` text
whichever path runs. The checks only read shapes, dtypes and strides: they run on fake tensors too.

Shapes (bit convention and layouts: :mod:`onebit.bits`, :mod:`onebit.engine.kernels`):

- packed activations ``[N, H + 2 ph, W + 2 pw, G, Wg]`` int64, ``Wg = words_for(C / G)``;
- packed conv weights ``[C_out, KH, KW, Wg]`` int64;
- the output side ``OH = floor((H + 2 ph - dh (KH - 1) - 1) / sh) + 1`` (torch's ``conv2d``), and
  for max pooling the same with ``ceil_mode`` as torch's ``max_pool2d`` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onebit.bits import words_for

__all__ = [
    "words_for",
    "used_bits",
    "conv_output_size",
    "pool_output_size",
    "pair",
    "PAD_CODES",
    "ConvSpec",
    "ConvCall",
    "check_conv",
    "check_conv_weight",
    "check_epilogue",
    "check_conv_epilogue",
    "check_direction",
    "check_thresholds",
    "check_threshold_pack",
    "check_threshold_output",
    "check_linear",
    "check_residual",
    "check_pack",
    "check_pack_features",
    "check_pack_weights",
    "check_pool_bits",
    "check_ternary",
    "check_relayout",
    "check_integer_planes",
    "check_combine_planes",
    "check_int",
    "check_tensor",
    "check_per_channel",
]

#: the pad values a packed layout knows, and the code the native kernels take for each
PAD_CODES = {0.0: 0, 1.0: 1, -1.0: -1}


def used_bits(channels: int, words: int) -> list[int]:
    """The ``words`` int64 words (as Python ints) with the bits of ``channels`` channels set: all
    bits of the full words, the low ``channels % 64`` bits of the last one (the others stay 0)."""
    out = []
    for k in range(words):
        n = min(max(channels - 64 * k, 0), 64)
        out.append(-1 if n == 64 else (1 << n) - 1)
    return out


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution, as torch computes it (floor)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of ``max_pool2d`` as torch computes it (ceil mode keeps the last window starting inside)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


# ---------------------------------------------------------------------------
# scalar and tensor checks


def _is_int(value) -> bool:
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def pair(value, name: str) -> tuple[int, int]:
    """``value`` (an int or a pair of ints) as a pair; ``ValueError`` naming ``name`` otherwise."""
    if _is_int(value):
        return (value, value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        a, b = value
        if _is_int(a) and _is_int(b):
            return (a, b)
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_int(value, name: str, minimum: int) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def pad_code(value, name: str) -> int:
    """The native code of a pad value (0.0, 1.0 or -1.0)."""
    try:
        return PAD_CODES[float(value)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{name} must be 0.0, 1.0 or -1.0, got {value!r}") from None


def check_tensor(t, name: str, dtype: torch.dtype, ndim: int | None = None, contiguous: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}; call .contiguous() first")


def check_per_channel(t, name: str, dtype: torch.dtype, channels: int) -> None:
    check_tensor(t, name, dtype, 1)
    if t.shape[0] != channels:
        raise ValueError(f"{name} must have shape [{channels}] (one per output channel), got {list(t.shape)}")


def _non_negative_pair(value, name: str) -> tuple[int, int]:
    a, b = pair(value, name)
    if a < 0 or b < 0:
        raise ValueError(f"{name} must be >= 0, got {(a, b)}")
    return a, b


# ---------------------------------------------------------------------------
# binary convolutions


@dataclass(frozen=True)
class ConvSpec:
    """The arguments of one binary convolution, checked: channels, ``(h, w)`` pairs, groups and the
    value of padded taps (0.0, +1.0 or -1.0; 0 is made exact by the kernels' correction)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    pad_value: float = 0.0

    @classmethod
    def check(
        cls, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, pad_value=0.0
    ) -> ConvSpec:
        """The spec of these arguments (as :func:`onebit.engine.kernels.binary_conv2d` takes them),
        or a ``ValueError`` naming the first bad one."""
        c = check_int(in_channels, "in_channels", 1)
        co = check_int(out_channels, "out_channels", 1)
        g = check_int(groups, "groups", 1)
        if c % g or co % g:
            raise ValueError(f"groups={g} must divide in_channels={c} and out_channels={co}")
        kernel = pair(kernel_size, "kernel_size")
        stride = pair(stride, "stride")
        padding = pair(padding, "padding")
        dilation = pair(dilation, "dilation")
        for name, value, minimum in (
            ("kernel_size", kernel, 1),
            ("stride", stride, 1),
            ("dilation", dilation, 1),
            ("padding", padding, 0),
        ):
            if value[0] < minimum or value[1] < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        pad_code(pad_value, "pad_value")
        return cls(c, co, kernel, stride, padding, dilation, g, float(pad_value))

    @property
    def words(self) -> int:
        """64-bit words per pixel and group of the packed input (and per tap of a weight)."""
        return words_for(self.in_channels // self.groups)

    @property
    def pad_code(self) -> int:
        return PAD_CODES[self.pad_value]

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """The packed weight ``[C_out, KH, KW, Wg]``."""
        return (self.out_channels, *self.kernel, self.words)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """``(OH, OW)`` of an unpadded ``h x w`` input."""
        return (
            conv_output_size(h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0]),
            conv_output_size(w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1]),
        )

    def op_args(self) -> tuple:
        """The positional arguments of the ``torch.ops.onebit.binary_conv2d*`` schemas."""
        return (
            self.in_channels,
            self.out_channels,
            list(self.kernel),
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.groups,
            self.pad_value,
        )

    def attrs(self) -> dict:
        """The graph attributes of a ``binary_conv2d`` node (JSON: pairs are lists)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "pad_value": self.pad_value,
        }


@dataclass(frozen=True)
class ConvCall:
    """A checked call of a binary convolution: its spec and the sizes of its input and output.
    ``hp, wp``: the padded input's spatial size; ``oh, ow``: the output's."""

    spec: ConvSpec
    n: int
    hp: int
    wp: int
    oh: int
    ow: int

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """``[N, C_out, OH, OW]``."""
        return (self.n, self.spec.out_channels, self.oh, self.ow)


def check_conv(
    xp, wp, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, pad_value=0.0
) -> ConvCall:
    """Check a binary convolution's arguments: ``xp`` packed int64 activations
    ``[N, H + 2 ph, W + 2 pw, G, Wg]`` or the float32 ``[N, C_in, H, W]`` input (packed by the
    call), ``wp`` the packed weight ``[C_out, KH, KW, Wg]``. ``ValueError`` naming the problem."""
    spec = ConvSpec.check(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, pad_value)
    c, g, wg = spec.in_channels, spec.groups, spec.words
    (ph, pw), (kh, kw), (dh, dw) = spec.padding, spec.kernel, spec.dilation
    if isinstance(xp, torch.Tensor) and xp.dtype == torch.float32 and xp.dim() != 4:
        raise ValueError(
            "xp must have dtype torch.int64 (packed activations [N, Hp, Wp, G, Wg]) or be the float32 "
            f"[N, C, H, W] input, got float32 of shape {list(xp.shape)}"
        )
    if isinstance(xp, torch.Tensor) and xp.dtype == torch.float32:  # packed on the fly
        check_tensor(xp, "input x", torch.float32, 4, contiguous=False)
        n, xc, h, w = xp.shape
        if xc != c:
            raise ValueError(f"input x has shape {list(xp.shape)}: expected [N, in_channels={c}, H, W]")
        hp, wpad = h + 2 * ph, w + 2 * pw
    else:
        check_tensor(xp, "packed input xp", torch.int64, 5)
        n, hp, wpad, xg, xwg = xp.shape
        if xg != g or xwg != wg:
            raise ValueError(
                f"packed input xp has shape {list(xp.shape)}: expected [N, Hp, Wp, groups={g}, "
                f"words={wg}] for {c} input channels in {g} groups"
            )
        h, w = hp - 2 * ph, wpad - 2 * pw
    if h < 1 or w < 1:
        raise ValueError(
            f"packed input xp of spatial size {hp}x{wpad} cannot hold padding {ph}x{pw} around a non-empty image"
        )
    oh, ow = spec.output_size(h, w)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"input of spatial size {h}x{w} with padding {ph}x{pw} is too small for kernel "
            f"{kh}x{kw} with dilation {dh}x{dw}"
        )
    check_conv_weight(wp, spec)
    return ConvCall(spec, n, hp, wpad, oh, ow)


def check_conv_weight(wp, spec: ConvSpec) -> None:
    """``wp`` is the packed weight of ``spec``: int64 ``[C_out, KH, KW, Wg]``, contiguous, on the CPU."""
    check_tensor(wp, "packed weight wp", torch.int64, 4)
    if tuple(wp.shape) != spec.weight_shape:
        (kh, kw), wg = spec.kernel, spec.words
        raise ValueError(
            f"packed weight wp has shape {list(wp.shape)}: expected [out_channels={spec.out_channels}, KH={kh}, "
            f"KW={kw}, words={wg}]"
        )


def check_conv_epilogue(
    call: ConvCall, scale=None, bias=None, residual=None, bn_scale=None, bn_shift=None, bn_fma=False
) -> None:
    """Check the per-channel tensors (:func:`check_epilogue`) and the shortcut of a float-output binary
    convolution."""
    check_epilogue(call.spec.out_channels, scale, bias, bn_scale, bn_shift, bn_fma)
    if residual is not None:
        check_residual(residual, call.output_shape)


def check_epilogue(channels: int, scale=None, bias=None, bn_scale=None, bn_shift=None, bn_fma=False) -> None:
    """The epilogue ``(acc * scale + bias) * bn_scale + bn_shift`` of a float output: each tensor optional,
    float32 ``[channels]``; ``bn_scale`` and ``bn_shift`` together; ``bn_fma`` a bool."""
    for t, name in ((scale, "scale"), (bias, "bias")):
        if t is not None:
            check_per_channel(t, name, torch.float32, channels)
    if (bn_scale is None) != (bn_shift is None):
        raise ValueError("bn_scale and bn_shift go together: give both or neither")
    if not isinstance(bn_fma, bool):
        raise ValueError(f"bn_fma must be a bool, got {type(bn_fma).__name__}")
    for t, name in ((bn_scale, "bn_scale"), (bn_shift, "bn_shift")):
        if t is not None:
            check_per_channel(t, name, torch.float32, channels)


def check_residual(residual, shape) -> None:
    check_tensor(residual, "residual", torch.float32, 4, contiguous=False)
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"residual must have the output's shape {list(shape)}, got {list(residual.shape)}")


def check_direction(direction, channels: int | None = None, *, values: bool = True) -> torch.Tensor:
    """The per-channel direction of a threshold as int8: ``+1`` (negative iff ``acc < thr``) or ``-1``
    (negative iff ``acc > thr``). int8 as given, bool as "negate above" (True = -1), other integers
    when each is +1 or -1. ``channels``: check the shape ``[channels]`` too. ``values=False`` leaves the
    values of an int8 tensor to the native kernel, which checks each as it reads it (no extra pass)."""
    if not isinstance(direction, torch.Tensor):
        raise ValueError(f"direction must be a torch.Tensor, got {type(direction).__name__}")
    if values or direction.dtype != torch.int8:
        direction = _int8_direction(direction)
    if channels is not None:
        check_per_channel(direction, "direction", torch.int8, channels)
    return direction


def _int8_direction(direction: torch.Tensor) -> torch.Tensor:
    dtype = direction.dtype
    if dtype == torch.bool:  # "negate above": True -> bit set iff acc > thr
        return torch.where(direction, -1, 1).to(torch.int8)
    if dtype.is_floating_point or dtype.is_complex:
        raise ValueError(f"direction must be int8 (+1 / -1) or bool (negate_above), got {dtype}")
    wrong = (direction != 1) & (direction != -1)
    if wrong.any():
        i = int(wrong.flatten().nonzero()[0])
        raise ValueError(f"direction must hold only +1 and -1, got direction[{i}] = {int(direction.flatten()[i])}")
    return direction.to(torch.int8)


def check_thresholds(
    thresholds, direction, channels: int | None = None, *, values: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int32 thresholds, int8 direction)`` of a thresholded output (channel ``c`` negative iff
    ``acc < thresholds[c]`` for direction +1, ``acc > thresholds[c]`` for -1): integer thresholds,
    clamped to int32 (``|acc| <= 2^24``: no decision changes); the direction by :func:`check_direction`.
    ``channels``: check both shapes ``[channels]`` too."""
    if not isinstance(thresholds, torch.Tensor):
        raise ValueError(f"thresholds must be a torch.Tensor, got {type(thresholds).__name__}")
    if thresholds.dtype != torch.int32:
        dtype = thresholds.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ValueError(f"thresholds must be integers (int32), got {dtype}")
        thresholds = thresholds.clamp(-(2**31), 2**31 - 1).to(torch.int32)
    if channels is not None:
        check_per_channel(thresholds, "thresholds", torch.int32, channels)
    return thresholds, check_direction(direction, channels, values=values)


def check_threshold_pack(acc, thresholds, direction) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`check_thresholds` of thresholding the accumulators ``acc [N, C, H, W]`` (any real dtype)."""
    if not isinstance(acc, torch.Tensor) or acc.dim() != 4 or acc.device.type != "cpu":
        got = f"shape {list(acc.shape)} on {acc.device}" if isinstance(acc, torch.Tensor) else type(acc).__name__
        raise ValueError(f"acc must be a CPU tensor [N, C, H, W], got {got}")
    return check_thresholds(thresholds, direction, acc.shape[1])


def check_threshold_output(call: ConvCall, out_padding, out_pad_value, out_groups) -> tuple:
    """``(shape, oph, opw, out pad code, out_groups)`` of a thresholded convolution's packed output
    ``[N, OH + 2 oph, OW + 2 opw, out_groups, Wg]``."""
    oph, opw = _non_negative_pair(out_padding, "out_padding")
    opad = pad_code(out_pad_value, "out_pad_value")
    og = check_int(out_groups, "out_groups", 1)
    co = call.spec.out_channels
    if co % og:
        raise ValueError(f"out_groups={og} must divide out_channels={co}")
    shape = (call.n, call.oh + 2 * oph, call.ow + 2 * opw, og, words_for(co // og))
    return shape, oph, opw, opad, og


def check_linear(xp, wp, in_features) -> tuple[int, int, int]:
    """``(N, Out, Wg)`` of a binary linear layer: packed features ``xp [N, Wg]``, weights ``wp [Out, Wg]``."""
    f = check_int(in_features, "in_features", 1)
    wg = words_for(f)
    check_tensor(xp, "packed input xp", torch.int64, 2)
    check_tensor(wp, "packed weight wp", torch.int64, 2)
    if xp.shape[1] != wg:
        raise ValueError(f"packed input xp has shape {list(xp.shape)}: expected [N, {wg}] for {f} features")
    if wp.shape[1] != wg:
        raise ValueError(f"packed weight wp has shape {list(wp.shape)}: expected [Out, {wg}] for {f} features")
    if wp.shape[0] < 1:
        raise ValueError("packed weight wp has no output features")
    return xp.shape[0], wp.shape[0], wg


# ---------------------------------------------------------------------------
# ternary weights x int8 activations (BitLinear)


def check_ternary(x, wp, in_features, dtype: torch.dtype, scale=None, bias=None) -> tuple[int, int, int]:
    """``(N, F, Out)`` of a ternary linear layer: ``x`` ``[N, F]`` of ``dtype`` (float32 tokens, or their
    int8 integers), ``wp`` the uint8 ``[Out, ceil(F / 4)]`` 2-bit weight, optional float32 ``[Out]``
    ``scale`` and ``bias``."""
    f = check_int(in_features, "in_features", 1)
    check_tensor(wp, "packed ternary weight wp", torch.uint8, 2)
    row = (f + 3) // 4
    if wp.shape[1] != row or wp.shape[0] < 1:
        raise ValueError(
            f"packed ternary weight wp has shape {list(wp.shape)}: expected [Out >= 1, {row}] "
            f"(four 2-bit codes a byte) for {f} input features"
        )
    check_tensor(x, "input x", dtype, 2, contiguous=False)
    if x.shape[1] != f:
        raise ValueError(
            f"ternary_linear: expected {dtype} [N, {f}] input x, got shape {list(x.shape)} "
            f"(expected [N, in_features={f}])"
        )
    out = wp.shape[0]
    if scale is not None or bias is not None:
        check_epilogue(out, scale, bias)
    return x.shape[0], f, out


# ---------------------------------------------------------------------------
# memory formats


def check_relayout(x, memory_format) -> None:
    """Copying float32 ``x [N, C, H, W]`` (any strides, on the CPU) into ``memory_format`` memory:
    ``torch.channels_last`` or ``torch.contiguous_format``."""
    check_tensor(x, "x", torch.float32, 4, contiguous=False)
    if memory_format not in (torch.channels_last, torch.contiguous_format):
        raise ValueError(f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format!r}")


# ---------------------------------------------------------------------------
# packing and bit max pooling


def check_pack(x, padding, pad_value, groups) -> tuple:
    """``(shape, ph, pw, pad code, groups)`` of packing float32 ``x [N, C, H, W]`` (any strides)."""
    check_tensor(x, "x", torch.float32, 4, contiguous=False)
    ph, pw = _non_negative_pair(padding, "padding")
    pad = pad_code(pad_value, "pad_value")
    g = check_int(groups, "groups", 1)
    n, c, h, w = x.shape
    if c < 1:
        raise ValueError(f"x must have at least one channel, got shape {list(x.shape)}")
    if c % g:
        raise ValueError(f"groups={g} must divide the {c} channels of x")
    return (n, h + 2 * ph, w + 2 * pw, g, words_for(c // g)), ph, pw, pad, g


def check_pack_features(x) -> tuple[int, int]:
    """``(N, F)`` of packing float32 features ``x [N, F]`` (any strides)."""
    check_tensor(x, "x", torch.float32, 2, contiguous=False)
    return x.shape[0], x.shape[1]


def check_pack_weights(w, groups) -> int:
    """The groups of packing the signs of float32 weights ``w``: ``[C_out, C_in / G, KH, KW]`` with
    ``G`` dividing ``C_out``, or a linear ``[Out, F]`` (one group)."""
    check_tensor(w, "w", torch.float32, contiguous=False)
    g = check_int(groups, "groups", 1)
    if w.dim() == 2:
        if g != 1:
            raise ValueError("a 2-D (linear) weight has no groups")
        return g
    if w.dim() != 4:
        raise ValueError(f"w must be [C_out, C_in / groups, KH, KW] or [Out, F], got shape {list(w.shape)}")
    if w.shape[0] % g:
        raise ValueError(f"groups={g} must divide the {w.shape[0]} output channels of w")
    return g


def check_integer_planes(x, padding, groups, bits, symmetric, clip) -> tuple:
    """``(shape, ph, pw)`` of packing the ``bits`` +-1 planes of a k-bit quantizer's level indices of
    float32 ``x [N, C, H, W]``: ``[N, H + 2 ph, W + 2 pw, bits * G, Wg]``, ``Wg = words_for(C / G)``."""
    check_tensor(x, "x", torch.float32, 4, contiguous=False)
    ph, pw = _non_negative_pair(padding, "padding")
    g = check_int(groups, "groups", 1)
    if not _is_int(bits) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    if symmetric and not clip > 0:
        raise ValueError(f"clip must be positive, got {clip!r}")
    n, c, h, w = x.shape
    if c % g:
        raise ValueError(f"groups={g} must divide the {c} channels of x")
    return (n, h + 2 * ph, w + 2 * pw, bits * g, words_for(c // g)), ph, pw


def check_combine_planes(y, coeff, act_planes, groups, weight_planes, exact_divisor) -> tuple[int, int, int, int]:
    """``[N, C_out, OH, OW]`` of combining the int32 output ``y`` (channels_last ``[N, P_a G P_w Cog, OH, OW]``)
    of a stacked bit-plane conv with the int32 ``coeff [P_a * P_w]`` of its plane pairs."""
    pa = check_int(act_planes, "act_planes", 1)
    g = check_int(groups, "groups", 1)
    pw = check_int(weight_planes, "weight_planes", 1)
    check_int(exact_divisor, "exact_divisor", 1)
    check_tensor(y, "y", torch.int32, 4, contiguous=False)
    n, stacked, oh, ow = y.shape
    if stacked % (pa * g * pw) or not y.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            f"y must be the stacked bit-plane conv's int32 output in channels_last memory, [N, {pa} x {g} x {pw} "
            f"x C_out / groups, OH, OW], got shape {list(y.shape)} and strides {y.stride()}"
        )
    check_tensor(coeff, "coeff", torch.int32, 1)
    if coeff.shape[0] != pa * pw:
        raise ValueError(f"coeff must have shape [{pa * pw}] (one per plane pair), got {list(coeff.shape)}")
    return n, g * (stacked // (pa * g * pw)), oh, ow


@dataclass(frozen=True)
class PoolSpec:
    """A max pooling window: ``(h, w)`` pairs of kernel, stride, padding and dilation."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool = False

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return (
            pool_output_size(h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0], self.ceil_mode),
            pool_output_size(w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1], self.ceil_mode),
        )


def check_max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode) -> tuple:
    """``(output shape, numbers)`` of torch's max pooling of float32 ``x [N, C, H, W]`` (any strides), or a
    ``ValueError``; ``numbers`` are those the native kernel takes: ``(N, C, H, W, OH, OW, KH, KW, SH, SW, PH,
    PW, DH, DW)``."""
    check_tensor(x, "x", torch.float32, 4, contiguous=False)
    n, c, h, w = x.shape
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    dh, dw = pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("max_pool2d: kernel_size, stride and dilation must be positive, padding not negative")
    if ph > kh // 2 or pw > kw // 2:  # torch's bound: every window holds an input tap
        raise ValueError(f"max_pool2d: padding {(ph, pw)} must be at most half the pooling window {(kh, kw)}")
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(f"max_pool2d: input {h}x{w} is too small for pooling window {kh}x{kw}")
    return (n, c, oh, ow), (n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)


def check_pool_bits(
    xp, or_mask, pad_words, kernel_size, stride, padding, dilation, ceil_mode, out_padding, channels
) -> tuple:
    """``(output shape, numbers)`` of a max pooling on packed bits (see
    :func:`onebit.engine.reference.max_pool_bits`), or a ``ValueError``; ``numbers`` are those the
    native kernel takes: ``(N, H, W, G, Wg, C / G, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, OPH, OPW)``."""
    check_tensor(xp, "xp", torch.int64, 5, contiguous=False)
    n, h, w, g, wg = xp.shape
    for name, t in (("or_mask", or_mask), ("pad_words", pad_words)):
        check_tensor(t, name, torch.int64, 2, contiguous=False)
        if tuple(t.shape) != (g, wg):
            raise ValueError(f"max_pool_bits: {name} must have shape [{g}, {wg}], got {list(t.shape)}")
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(padding, "padding")
    dh, dw = pair(dilation, "dilation")
    oph, opw = pair(out_padding, "out_padding")
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw, oph, opw) < 0:
        raise ValueError("max_pool_bits: kernel_size, stride and dilation must be positive, paddings not negative")
    if channels % g or words_for(channels // g) != wg:
        raise ValueError(f"max_pool_bits: {channels} channels do not fill {g} groups of {wg} words")
    oh = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(f"max_pool_bits: input {h}x{w} is too small for pooling window {kh}x{kw}")
    shape = (n, oh + 2 * oph, ow + 2 * opw, g, wg)
    return shape, (n, h, w, g, wg, channels // g, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, oph, opw)
