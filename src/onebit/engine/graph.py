"""The packed engine's graph: a fixed whitelist of ops, their checks and their float semantics.

A graph is plain JSON data (it is stored in the file's metadata)::

    {"input": {"name": "input", "rank": 4, "channels": 3, "dtype": "float32"},
     "nodes": [{"name": "conv1", "op": "conv2d", "inputs": ["input"],
                "attrs": {...}, "tensors": {"weight": "conv1.weight", ...}}, ...],
     "outputs": ["fc"], "output_kind": "tensor"}

Values are either *float* tensors (NCHW / NC, as in the model) or *packed* bit
tensors (``[N, Hp, Wp, G, Wg]`` or ``[N, Wg]`` int64) whose layout (padding,
pad value, groups) is fixed by the op that produced them and must be the one
the consuming binary layer expects. Every op here names a function of this
module; nothing from a file is ever executed or imported, and :func:`validate`
checks names, references, value kinds, attributes and tensor dtypes/shapes
before a graph runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from onebit.bits import unpack_signs
from onebit.engine import bitplanes, ops
from onebit.engine.geometry import ConvSpec, used_bits, words_for
from onebit.math import sign
from onebit.nn.functional import scale_and_bias
from onebit.nn.twist import coordinate_maps
from onebit.quant_lowbit import DoReFaSymmetric

__all__ = ["OPS", "OpSpec", "validate", "attrs", "GraphError", "binary_weight_shape", "compact_shape"]


class GraphError(ValueError):
    """A graph (or its tensors) is malformed."""


FLOAT, PACKED = "float", "packed"

# ---------------------------------------------------------------------------
# attribute checkers: each returns the normalised value or raises GraphError


def _int(lo: int = 0, hi: int = 1 << 30):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise GraphError(f"expected an integer in [{lo}, {hi}], got {v!r}")
        return v

    return check


def _pair(lo: int = 0, hi: int = 1 << 16):
    item = _int(lo, hi)

    def check(v):
        if not isinstance(v, list) or len(v) != 2:
            raise GraphError(f"expected a pair of integers, got {v!r}")
        return [item(x) for x in v]

    return check


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GraphError(f"expected a finite number, got {v!r}")
    return float(v)


def _non_negative(v):
    v = _float(v)
    if v < 0:
        raise GraphError(f"expected a non-negative number, got {v!r}")
    return v


def _bool(v):
    if not isinstance(v, bool):
        raise GraphError(f"expected true or false, got {v!r}")
    return v


def _positive(v):
    v = _float(v)
    if not v > 0:
        raise GraphError(f"expected a positive number, got {v!r}")
    return v


def _optional_positive(v):
    return None if v is None else _positive(v)


def _pad_value(v):
    v = _float(v)
    if v not in (0.0, 1.0, -1.0):
        raise GraphError(f"pad_value must be 0, 1 or -1, got {v!r}")
    return v


def _choice(*options):
    def check(v):
        if v not in options:
            raise GraphError(f"expected one of {list(options)}, got {v!r}")
        return v

    return check


def _optional(check):
    return lambda v: None if v is None else check(v)


def _int_list(v):
    if not isinstance(v, list) or not 1 <= len(v) <= 8:
        raise GraphError(f"expected a list of integers, got {v!r}")
    return [_int(-1, 1 << 30)(x) for x in v]


def _conv_padding(v):
    if v in ("same", "valid"):
        return v
    return _pair()(v)


# ---------------------------------------------------------------------------
# tensor shapes, from a node's attributes


def binary_weight_shape(a: dict) -> tuple[int, ...]:
    """In-memory packed conv weight: ``[C_out, KH, KW, ceil((C_in/G)/64)]`` int64."""
    return (a["out_channels"], *a["kernel_size"], words_for(a["in_channels"] // a["groups"]))


def compact_shape(a: dict) -> tuple[int, ...]:
    """In-file binary weight: ``[C_out, ceil(C_in/G * KH * KW / 8)]`` uint8 (the bits of sign(w) < 0)."""
    if "kernel_size" in a:
        k = a["in_channels"] // a["groups"] * a["kernel_size"][0] * a["kernel_size"][1]
    else:
        k = a["in_features"]
    return (a["out_channels"] if "out_channels" in a else a["out_features"], (k + 7) // 8)


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: Callable[[dict], tuple[int, ...] | None]  # None: any 1-D length is checked by the op
    required: bool = True
    binary: bool = False  # a binary weight: stored compact in files
    check: Callable[[torch.Tensor, dict], str | None] | None = None  # content check: a problem, or None


@dataclass(frozen=True)
class OpSpec:
    fn: Callable
    inputs: tuple[str, ...]  # kinds of the inputs; ("float", "...") = one or more floats
    output: str
    attrs: dict[str, Callable] = field(default_factory=dict)
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    check: Callable[[dict], None] | None = None  # cross-attribute checks
    defaults: dict[str, Any] = field(default_factory=dict)  # optional attributes and their values


_CONV_ATTRS = {
    "in_channels": _int(1),
    "out_channels": _int(1),
    "kernel_size": _pair(1, 64),
    "stride": _pair(1, 1 << 10),
    "padding": _pair(0, 1 << 10),
    "dilation": _pair(1, 1 << 10),
    "groups": _int(1),
    "pad_value": _pad_value,
}
#: the attributes of a binary convolution that are the kernels' convolution arguments
CONV_ATTRS = tuple(_CONV_ATTRS)


def _check_groups(a):
    if a["in_channels"] % a["groups"] or a["out_channels"] % a["groups"]:
        raise GraphError(
            f"{a['in_channels']} -> {a['out_channels']} channels are not divisible by groups={a['groups']}"
        )


def _check_binary_conv(a):
    """A binary convolution's attributes make a convolution the kernels run (geometry's one check)."""
    _check_groups(a)
    try:
        ConvSpec.check(**{k: a[k] for k in _CONV_ATTRS})
    except ValueError as error:
        raise GraphError(str(error)) from None


def _conv_args(a) -> dict:
    """The convolution's keyword arguments from a node's attributes, pairs as tuples (hashable: the
    kernels' plan cache takes them as they are); made once per attrs dict and kept in it."""
    conv = a.get(_CONV_KEY)
    if conv is None:
        conv = a[_CONV_KEY] = {k: tuple(a[k]) if isinstance(a[k], list) else a[k] for k in _CONV_ATTRS}
    return conv


#: where _conv_args keeps its result in a step's attrs (not a graph attribute: never saved)
_CONV_KEY = "_conv_args"


# ---------------------------------------------------------------------------
# op implementations: fn(tensors: dict[str, Tensor], attrs: dict, *inputs) -> Tensor

#: the key, beside a binary conv's tensors, of the runner's cache of its prepared weights
WEIGHT_CACHE = "_weight_cache"
#: the key of the runner's bound native call of a binary conv (kernels.ConvLayer), used on the native backend
CONV_LAYER = "_conv_layer"


def _pack(t, a, x):
    return ops.pack_activations(x, a["padding"], a["pad_value"], a["groups"])


def _pack_features(t, a, x):
    if x.shape[-1] != a["features"]:
        raise ValueError(f"expected {a['features']} input features, got shape {list(x.shape)}")
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return ops.pack_features(x.float() if x.dtype != torch.float32 else x)


def _binary_conv2d(t, a, xp, residual=None):
    layer = t.get(CONV_LAYER)
    if layer is not None and ops.backend_is_native():
        return layer(xp, residual)
    # bn_scale / bn_shift / bn_fma: a BatchNorm fused into the step by PackedModel (not graph attributes)
    return ops.binary_conv2d(
        xp,
        t["weight"],
        scale=t.get("scale"),
        bias=t.get("bias"),
        residual=residual,
        cache=t.get(WEIGHT_CACHE),
        bn_scale=t.get("bn_scale"),
        bn_shift=t.get("bn_shift"),
        bn_fma=a.get("bn_fma", False),
        **_conv_args(a),
    )


def _binary_conv2d_threshold(t, a, xp):
    return ops.binary_conv2d_threshold(
        xp,
        t["weight"],
        thresholds=t["thresholds"],
        direction=t["direction"],
        out_padding=a["out_padding"],
        out_pad_value=a["out_pad_value"],
        out_groups=a["out_groups"],
        cache=t.get(WEIGHT_CACHE),
        **_conv_args(a),
    )


def _max_pool_bits(t, a, xp):
    return ops.max_pool_bits(
        xp,
        t["or_mask"],
        t["pad_words"],
        kernel_size=a["kernel_size"],
        stride=a["stride"],
        padding=a["padding"],
        dilation=a["dilation"],
        ceil_mode=a["ceil_mode"],
        out_padding=a["out_padding"],
        channels=a["channels"],
    )


def _threshold_pack(t, a, acc):
    return ops.threshold_pack(
        acc,
        t["thresholds"],
        t["direction"],
        out_padding=a["out_padding"],
        out_pad_value=a["out_pad_value"],
        out_groups=a["out_groups"],
    )


def _binary_linear(t, a, xp):
    return ops.binary_linear(xp, t["weight"], in_features=a["in_features"], scale=t.get("scale"), bias=t.get("bias"))


def _binary_linear_threshold(t, a, xp):
    return ops.binary_linear_threshold(
        xp, t["weight"], in_features=a["in_features"], thresholds=t["thresholds"], direction=t["direction"]
    )


def _padded_conv(x, weight, bias, a):
    """``conv2d(pad(x), weight) + bias`` with the node's padding: the conv's own zero ``padding``,
    or ``explicit_padding`` ([left, right, top, bottom]) of ``pad_value`` / ``padding_mode`` first."""
    if a["pad_value"] == 0.0 and a["padding_mode"] == "zeros":
        return F.conv2d(x, weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"])
    if a["padding_mode"] == "zeros":
        x = F.pad(x, a["explicit_padding"], mode="constant", value=a["pad_value"])
    else:
        x = F.pad(x, a["explicit_padding"], mode=a["padding_mode"])
    return F.conv2d(x, weight, bias, a["stride"], 0, a["dilation"], a["groups"])


def _conv2d(t, a, x):
    return _padded_conv(x, t["weight"], t.get("bias"), a)


def _linear(t, a, x):
    return F.linear(x, t["weight"], t.get("bias"))


#: the key, beside a quantized layer's bit-packed weight, of its unpacked +-1 levels
LEVELS_CACHE = "_levels"


def _levels(t, a) -> torch.Tensor:
    """A float-run quantized layer's weight levels: the float tensor, or +-1 unpacked from bits once."""
    if "weight" in t:
        return t["weight"]
    bits = t["weight_bits"]
    if type(bits) is not torch.Tensor or torch.compiler.is_compiling():
        return _unpacked_levels(bits, a)  # traced (torch.export, torch.compile): the unpacking is part of the program
    state = _bits_state(bits)
    cached = t.get(LEVELS_CACHE)
    levels = cached[1] if cached is not None and cached[0] == state else None
    if levels is None:  # first call, or the bits were written since (seen as the kernels' cache sees writes)
        levels = _unpacked_levels(bits, a)
        t[LEVELS_CACHE] = (state, levels)
    return levels


def _unpacked_levels(bits: torch.Tensor, a: dict) -> torch.Tensor:
    """+-1 levels from packed sign weights: conv ``[Co, KH, KW, Wg]`` words -> ``[Co, Cg, KH, KW]``, linear
    ``[Co, Wg]`` -> ``[Co, F]``."""
    if "kernel_size" in a:
        return unpack_signs(bits, a["in_channels"] // a["groups"]).permute(0, 3, 1, 2).contiguous()
    return unpack_signs(bits, a["in_features"]).contiguous()


def _bits_state(bits: torch.Tensor) -> tuple:
    """The version counter, address and up to 256 evenly spaced words of ``bits``: what
    :class:`onebit.engine.kernels.WeightCache` compares."""
    try:
        version = bits._version
    except RuntimeError:  # an inference tensor counts no writes
        version = None
    words = bits.detach().reshape(-1)
    step = max(1, -(-words.numel() // 256))
    return (version, bits.data_ptr(), words[::step].numpy().tobytes(), words[-1:].numpy().tobytes())


def _scale_and_bias(t, y, spatial_dims: int):
    return scale_and_bias(y, t.get("scale"), t.get("bias"), spatial_dims)


def _qconv2d(t, a, x):
    """A quantized conv run in float, as :func:`onebit.nn.functional.qconv` computes it:
    ``conv(pad(x, pad_value), levels) [/ input_divisor] * scale + bias`` (x already quantized, or
    its integers when the input quantizer factors them out)."""
    y = _padded_conv(x, _levels(t, a), None, a)
    if a["input_divisor"] is not None:
        y = y / a["input_divisor"]
    return _scale_and_bias(t, y, 2)


def _qlinear(t, a, x):
    """A quantized linear layer run in float: ``(x @ levels.T) [/ input_divisor] * scale + bias``."""
    y = F.linear(x, _levels(t, a))
    if a["input_divisor"] is not None:
        y = y / a["input_divisor"]
    return _scale_and_bias(t, y, 0)


def _quantize_int(t, a, x):
    """An input quantizer's integers (``integer_factor``), see :func:`onebit.engine.bitplanes.integer_input`."""
    return bitplanes.integer_input(x, a["kind"], a["bits"], a["clip"])


def _dorefa_sym(t, a, x):
    """``dorefa_sym``'s forward: ``c (2 floor((clamp(x, -c, c) / c + 1) / 2 * n + 1/2) / n - 1)``."""
    return DoReFaSymmetric(a["bits"], a["clip"])(x)


#: the key, beside a bit-plane conv's tensors, of its weight planes repeated for every activation plane
STACKED_CACHE = "_stacked"


def _bitplane_conv2d(t, a, x):
    """A k-bit / ternary conv (or linear layer, on ``[N, F]``) by bit planes: the input quantizer's
    integers, their exact integer conv with the weight levels (one binary conv of all plane pairs),
    then ``/ input_divisor * scale + bias`` as :func:`onebit.nn.functional.qconv` computes it."""
    act = bitplanes.PlaneCode(a["act_kind"], a["act_bits"])
    weight = bitplanes.PlaneCode(a["weight_kind"], a["weight_bits"])
    linear = x.dim() == 2
    if linear:
        x = x[:, :, None, None]
    planes = t["weight"]
    if type(planes) is torch.Tensor and not torch.compiler.is_compiling():  # a plain tensor: repeat it once
        cached = t.get(STACKED_CACHE)
        if cached is None or cached[0] is not planes or cached[1] != _bits_state(planes):
            cached = (planes, _bits_state(planes), planes.repeat(act.planes, 1, 1, 1))
            t[STACKED_CACHE] = cached
        stacked = cached[2]
    else:  # traced (torch.export, torch.compile): the repeat is part of the program
        stacked = planes.repeat(act.planes, 1, 1, 1)
    y = bitplanes.bitplane_layer(
        x,
        stacked,
        t["plane_sums"],
        act=act,
        weight=weight,
        quantizer=a["quantizer"],
        clip=a["clip"],
        input_divisor=a["input_divisor"],
        scale=t.get("scale"),
        bias=t.get("bias"),
        in_channels=a["in_channels"],
        out_channels=a["out_channels"],
        kernel_size=a["kernel_size"],
        stride=a["stride"],
        padding=a["padding"],
        dilation=a["dilation"],
        groups=a["groups"],
        cache=t.get(WEIGHT_CACHE),
    )
    return y[:, :, 0, 0].contiguous() if linear else y


def _batch_norm(t, a, x):
    return F.batch_norm(x, t["running_mean"], t["running_var"], t.get("weight"), t.get("bias"), False, 0.0, a["eps"])


def _max_pool2d(t, a, x):
    if x.dim() == 4 and x.shape[1] > 1 and statically_known_true(x.numel() >= 16384) and x.is_contiguous():
        # torch's NCHW max pooling is several times slower than its channels_last one; a max
        # rounds nothing, so pool channels_last and hand back the NCHW layout the model has.
        # Traced with a symbolic batch, the size is unknown and the plain pool is traced: the
        # choice never becomes a guard bounding the program's batch (torch.export's Dim)
        y = F.max_pool2d(
            x.contiguous(memory_format=torch.channels_last),
            a["kernel_size"],
            a["stride"],
            a["padding"],
            a["dilation"],
            ceil_mode=a["ceil_mode"],
        )
        return y.contiguous()
    return F.max_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], ceil_mode=a["ceil_mode"])


def _avg_pool2d(t, a, x):
    return F.avg_pool2d(
        x, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"], a["divisor_override"]
    )


def _adaptive_avg_pool2d(t, a, x):
    return F.adaptive_avg_pool2d(x, a["output_size"])


def _adaptive_max_pool2d(t, a, x):
    return F.adaptive_max_pool2d(x, a["output_size"])


def _flatten(t, a, x):
    return torch.flatten(x, a["start_dim"], a["end_dim"])


def _reshape(t, a, x):
    """Each sample reshaped to ``shape`` (the batch dimension kept): a -1 stands for the rest of a
    sample's elements, also in an empty batch (where torch cannot infer it from the total)."""
    shape = a["shape"]
    if x.shape[0] == 0 and -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape = [math.prod(x.shape[1:]) // known if d == -1 and known else d for d in shape]
    return x.reshape(x.shape[0], *shape)


def _add(t, a, *xs):
    if len(xs) == 1:
        return xs[0] + a["other"] * a["alpha"] if a["alpha"] != 1.0 else xs[0] + a["other"]
    if a["alpha"] != 1.0:
        return torch.add(xs[0], xs[1], alpha=a["alpha"])
    return xs[0] + xs[1]


def _mul(t, a, *xs):
    return xs[0] * xs[1] if len(xs) == 2 else xs[0] * a["other"]


def _div(t, a, x):
    return x / a["other"]


def _roll(t, a, x):
    return torch.roll(x, shifts=a["shifts"], dims=a["dim"])


def _twist_mix(t, a, y, gx, gy):
    xs, ys = coordinate_maps(y)  # TwistConv2d's sum, term for term
    return y + xs * gx + ys * gy


def _cat(t, a, *xs):
    return torch.cat(xs, dim=a["dim"])


def _relu(t, a, x):
    return F.relu(x)


def _relu6(t, a, x):
    return F.relu6(x)


def _leaky_relu(t, a, x):
    return F.leaky_relu(x, a["negative_slope"])


def _hardtanh(t, a, x):
    return F.hardtanh(x, a["min_val"], a["max_val"])


def _prelu(t, a, x):
    return F.prelu(x, t["weight"])


def _sigmoid(t, a, x):
    return torch.sigmoid(x)


def _tanh(t, a, x):
    return torch.tanh(x)


def _softmax(t, a, x):
    return F.softmax(x, dim=a["dim"])


def _sign(t, a, x):
    return sign(x)


def _sign_threshold(t, a, x):
    shape = [1] * x.dim()
    shape[1] = -1
    thr = t["thresholds"].view(shape).to(torch.int64)
    acc = x.to(torch.int64) if not x.is_floating_point() else x.to(torch.float64)
    negative = torch.where((t["direction"] > 0).view(shape), acc < thr, acc > thr)
    one = torch.ones((), dtype=x.dtype)
    return torch.where(negative, -one, one)


def _dorefa(t, a, x):
    levels = 2 ** a["bits"] - 1
    return torch.round(torch.clamp(x, 0.0, 1.0) * levels) / levels


def _identity(t, a, x):
    return x


def _ternary_linear(t, a, x):
    """BitLinear: ``[rms_norm] -> absmax8 -> (x_int @ levels.T) / s * scale + bias`` over the last dimension."""
    f = a["in_features"]
    if x.shape[-1] != f:
        raise ValueError(f"expected {f} input features, got shape {list(x.shape)}")
    if a["norm"]:
        x = F.rms_norm(x, (f,), eps=a["eps"])
    lead = x.shape[:-1]
    y = ops.ternary_linear(x.reshape(-1, f), t["weight"], in_features=f, scale=t.get("scale"), bias=t.get("bias"))
    return y.reshape(*lead, a["out_features"])


def _ternary_codes_problem(t: torch.Tensor, a: dict) -> str | None:
    """A 2-bit ternary weight holds only the codes 0, 1, 2 (w + 1), and 0 beyond ``in_features``."""
    codes = ((t.unsqueeze(-1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3).reshape(t.shape[0], -1)
    if bool((codes == 3).any()):
        return "holds the 2-bit code 3, which is no ternary weight (codes are w + 1 in {0, 1, 2})"
    if bool((codes[:, a["in_features"] :] != 0).any()):
        return f"has nonzero codes beyond the {a['in_features']} input features"
    return None


_F32 = torch.float32
_ANY = lambda a: None  # noqa: E731


def _cout(a):
    return (a["out_channels"],)


def _group_words(a):
    return (a["out_groups"], words_for(a["channels"] // a["out_groups"]))


def _fout(a):
    return (a["out_features"],)


def _chan(a):
    return (a["num_features"],)


_FLOAT_CONV_ATTRS = {
    "in_channels": _int(1),
    "out_channels": _int(1),
    "kernel_size": _pair(1, 1 << 10),
    "stride": _pair(1, 1 << 10),
    "padding": _conv_padding,
    "explicit_padding": lambda v: [_int(0, 1 << 10)(x) for x in v] if isinstance(v, list) and len(v) == 4 else _fail(v),
    "dilation": _pair(1, 1 << 10),
    "groups": _int(1),
    "pad_value": _pad_value,
    "padding_mode": _choice("zeros", "reflect", "replicate", "circular"),
}

_THRESH_ATTRS = {"out_padding": _pair(0, 1 << 10), "out_pad_value": _pad_value, "out_groups": _int(1)}

OPS: dict[str, OpSpec] = {
    "pack": OpSpec(_pack, (FLOAT,), PACKED, {"padding": _pair(0, 1 << 10), "pad_value": _pad_value, "groups": _int(1)}),
    "pack_features": OpSpec(_pack_features, (FLOAT,), PACKED, {"features": _int(1)}),
    "binary_conv2d": OpSpec(
        _binary_conv2d,
        (PACKED,),
        FLOAT,
        dict(_CONV_ATTRS),
        {
            "weight": TensorSpec(torch.int64, binary_weight_shape, binary=True),
            "scale": TensorSpec(_F32, _cout, required=False),
            "bias": TensorSpec(_F32, _cout, required=False),
        },
        _check_binary_conv,
    ),
    "binary_conv2d_threshold": OpSpec(
        _binary_conv2d_threshold,
        (PACKED,),
        PACKED,
        {**_CONV_ATTRS, **_THRESH_ATTRS},
        {
            "weight": TensorSpec(torch.int64, binary_weight_shape, binary=True),
            "thresholds": TensorSpec(torch.int32, _cout),
            "direction": TensorSpec(torch.int8, _cout),
        },
        lambda a: (_check_binary_conv(a), _check_out_groups(a)),
    ),
    "threshold_pack": OpSpec(
        _threshold_pack,
        (FLOAT,),
        PACKED,
        {"out_channels": _int(1), **_THRESH_ATTRS},
        {"thresholds": TensorSpec(torch.int32, _cout), "direction": TensorSpec(torch.int8, _cout)},
        lambda a: _check_out_groups(a),
    ),
    "max_pool_bits": OpSpec(
        _max_pool_bits,
        (PACKED,),
        PACKED,
        {
            "channels": _int(1),
            "kernel_size": _pair(1, 1 << 10),
            "stride": _pair(1, 1 << 10),
            "padding": _pair(0, 1 << 10),
            "dilation": _pair(1, 1 << 10),
            "ceil_mode": _bool,
            **_THRESH_ATTRS,
        },
        {
            "or_mask": TensorSpec(torch.int64, _group_words),
            "pad_words": TensorSpec(torch.int64, _group_words),
        },
        lambda a: _check_out_groups({**a, "out_channels": a["channels"]}),
    ),
    "binary_linear": OpSpec(
        _binary_linear,
        (PACKED,),
        FLOAT,
        {"in_features": _int(1), "out_features": _int(1)},
        {
            "weight": TensorSpec(
                torch.int64, lambda a: (a["out_features"], (a["in_features"] + 63) // 64), binary=True
            ),
            "scale": TensorSpec(_F32, _fout, required=False),
            "bias": TensorSpec(_F32, _fout, required=False),
        },
    ),
    "binary_linear_threshold": OpSpec(
        _binary_linear_threshold,
        (PACKED,),
        PACKED,
        {"in_features": _int(1), "out_features": _int(1)},
        {
            "weight": TensorSpec(
                torch.int64, lambda a: (a["out_features"], (a["in_features"] + 63) // 64), binary=True
            ),
            "thresholds": TensorSpec(torch.int32, _fout),
            "direction": TensorSpec(torch.int8, _fout),
        },
    ),
    "conv2d": OpSpec(
        _conv2d,
        (FLOAT,),
        FLOAT,
        dict(_FLOAT_CONV_ATTRS),
        {
            "weight": TensorSpec(
                _F32, lambda a: (a["out_channels"], a["in_channels"] // a["groups"], *a["kernel_size"])
            ),
            "bias": TensorSpec(_F32, _cout, required=False),
        },
        _check_groups,
    ),
    "linear": OpSpec(
        _linear,
        (FLOAT,),
        FLOAT,
        {"in_features": _int(1), "out_features": _int(1)},
        {
            "weight": TensorSpec(_F32, lambda a: (a["out_features"], a["in_features"])),
            "bias": TensorSpec(_F32, _fout, required=False),
        },
    ),
    "qconv2d": OpSpec(
        _qconv2d,
        (FLOAT,),
        FLOAT,
        {**_FLOAT_CONV_ATTRS, "input_divisor": _optional_positive},
        {
            "weight": TensorSpec(
                _F32, lambda a: (a["out_channels"], a["in_channels"] // a["groups"], *a["kernel_size"]), required=False
            ),
            "weight_bits": TensorSpec(torch.int64, binary_weight_shape, required=False, binary=True),
            "scale": TensorSpec(_F32, _cout, required=False),
            "bias": TensorSpec(_F32, _cout, required=False),
        },
        _check_groups,
        defaults={"input_divisor": None},
    ),
    "qlinear": OpSpec(
        _qlinear,
        (FLOAT,),
        FLOAT,
        {"in_features": _int(1), "out_features": _int(1), "input_divisor": _optional_positive},
        {
            "weight": TensorSpec(_F32, lambda a: (a["out_features"], a["in_features"]), required=False),
            "weight_bits": TensorSpec(
                torch.int64, lambda a: (a["out_features"], (a["in_features"] + 63) // 64), required=False, binary=True
            ),
            "scale": TensorSpec(_F32, _fout, required=False),
            "bias": TensorSpec(_F32, _fout, required=False),
        },
        defaults={"input_divisor": None},
    ),
    "batch_norm": OpSpec(
        _batch_norm,
        (FLOAT,),
        FLOAT,
        {"num_features": _int(1), "eps": _non_negative},
        {
            "running_mean": TensorSpec(_F32, _chan),
            "running_var": TensorSpec(_F32, _chan),
            "weight": TensorSpec(_F32, _chan, required=False),
            "bias": TensorSpec(_F32, _chan, required=False),
        },
    ),
    "max_pool2d": OpSpec(
        _max_pool2d,
        (FLOAT,),
        FLOAT,
        {"kernel_size": _pair(1), "stride": _pair(1), "padding": _pair(0), "dilation": _pair(1), "ceil_mode": _bool},
        check=lambda a: _check_pool_padding(a),
    ),
    "avg_pool2d": OpSpec(
        _avg_pool2d,
        (FLOAT,),
        FLOAT,
        {
            "kernel_size": _pair(1),
            "stride": _pair(1),
            "padding": _pair(0),
            "ceil_mode": _bool,
            "count_include_pad": _bool,
            "divisor_override": _optional(_int(1)),
        },
        check=lambda a: _check_pool_padding(a),
    ),
    "adaptive_avg_pool2d": OpSpec(_adaptive_avg_pool2d, (FLOAT,), FLOAT, {"output_size": _pair(1)}),
    "adaptive_max_pool2d": OpSpec(_adaptive_max_pool2d, (FLOAT,), FLOAT, {"output_size": _pair(1)}),
    "flatten": OpSpec(_flatten, (FLOAT,), FLOAT, {"start_dim": _int(-8, 8), "end_dim": _int(-8, 8)}),
    "reshape": OpSpec(_reshape, (FLOAT,), FLOAT, {"shape": _int_list}, check=lambda a: _check_shape(a)),
    "add": OpSpec(_add, (FLOAT, "..."), FLOAT, {"other": _float, "alpha": _float}),
    "mul": OpSpec(_mul, (FLOAT, "..."), FLOAT, {"other": _float}),
    "div": OpSpec(_div, (FLOAT,), FLOAT, {"other": _float}),
    "roll": OpSpec(_roll, (FLOAT,), FLOAT, {"shifts": _int(-(1 << 30), 1 << 30), "dim": _int(-8, 8)}),
    "twist_mix": OpSpec(_twist_mix, (FLOAT, FLOAT, FLOAT), FLOAT),
    "cat": OpSpec(_cat, (FLOAT, "..."), FLOAT, {"dim": _int(-8, 8)}),
    "relu": OpSpec(_relu, (FLOAT,), FLOAT),
    "relu6": OpSpec(_relu6, (FLOAT,), FLOAT),
    "leaky_relu": OpSpec(_leaky_relu, (FLOAT,), FLOAT, {"negative_slope": _float}),
    "hardtanh": OpSpec(
        _hardtanh, (FLOAT,), FLOAT, {"min_val": _float, "max_val": _float}, check=lambda a: _check_order(a)
    ),
    "prelu": OpSpec(_prelu, (FLOAT,), FLOAT, {}, {"weight": TensorSpec(_F32, _ANY)}),
    "sigmoid": OpSpec(_sigmoid, (FLOAT,), FLOAT),
    "tanh": OpSpec(_tanh, (FLOAT,), FLOAT),
    "softmax": OpSpec(_softmax, (FLOAT,), FLOAT, {"dim": _int(-8, 8)}),
    "sign": OpSpec(_sign, (FLOAT,), FLOAT),
    "sign_threshold": OpSpec(
        _sign_threshold,
        (FLOAT,),
        FLOAT,
        {"channels": _int(1)},
        {
            "thresholds": TensorSpec(torch.int32, lambda a: (a["channels"],)),
            "direction": TensorSpec(torch.int8, lambda a: (a["channels"],)),
        },
    ),
    "dorefa": OpSpec(_dorefa, (FLOAT,), FLOAT, {"bits": _int(1, 16)}),
    "dorefa_sym": OpSpec(_dorefa_sym, (FLOAT,), FLOAT, {"bits": _int(1, 16), "clip": _positive}),
    "quantize_int": OpSpec(
        _quantize_int,
        (FLOAT,),
        FLOAT,
        {"kind": _choice("dorefa", "dorefa_sym"), "bits": _int(1, 16), "clip": _positive},
    ),
    "bitplane_conv2d": OpSpec(
        _bitplane_conv2d,
        (FLOAT,),
        FLOAT,
        {
            **_CONV_ATTRS,
            "quantizer": _choice("dorefa", "dorefa_sym"),
            "clip": _positive,
            "act_kind": _choice("symmetric", "unsigned"),
            "act_bits": _int(1, bitplanes.MAX_INPUT_PLANES),
            "weight_kind": _choice("binary", "ternary", "symmetric"),
            "weight_bits": _int(1, bitplanes.MAX_WEIGHT_PLANES),
            "input_divisor": _positive,
        },
        {
            # the weight planes [G, P_w, C_out / G] as output channels, packed (stored once; repeated
            # for every activation plane at run time)
            "weight": TensorSpec(
                torch.int64,
                lambda a: (
                    bitplanes.PlaneCode(a["weight_kind"], a["weight_bits"]).planes * a["out_channels"],
                    *a["kernel_size"],
                    words_for(a["in_channels"] // a["groups"]),
                ),
                binary=True,
            ),
            "plane_sums": TensorSpec(
                torch.int32,
                lambda a: (bitplanes.PlaneCode(a["weight_kind"], a["weight_bits"]).planes, a["out_channels"]),
            ),
            "scale": TensorSpec(_F32, _cout, required=False),
            "bias": TensorSpec(_F32, _cout, required=False),
        },
        _check_groups,
    ),
    "identity": OpSpec(_identity, (FLOAT,), FLOAT),
    "ternary_linear": OpSpec(
        _ternary_linear,
        (FLOAT,),
        FLOAT,
        {"in_features": _int(1, 1 << 17), "out_features": _int(1), "norm": _bool, "eps": _float},
        {
            "weight": TensorSpec(
                torch.uint8, lambda a: (a["out_features"], (a["in_features"] + 3) // 4), check=_ternary_codes_problem
            ),
            "scale": TensorSpec(_F32, _fout, required=False),
            "bias": TensorSpec(_F32, _fout, required=False),
        },
        lambda a: _check_positive_eps(a),
    ),
}


def _check_positive_eps(a):
    if not a["eps"] > 0:
        raise GraphError(f"eps must be positive, got {a['eps']}")


def _fail(v):
    raise GraphError(f"unexpected value {v!r}")


def _check_order(a):
    if a["min_val"] > a["max_val"]:
        raise GraphError(f"min_val {a['min_val']} is greater than max_val {a['max_val']}")


def _check_shape(a):
    if a["shape"].count(-1) > 1:
        raise GraphError(f"shape {a['shape']} has more than one -1")


def _check_pool_padding(a):
    for k, p, d in zip(a["kernel_size"], a["padding"], a.get("dilation", [1, 1])):
        if p > (d * (k - 1) + 1) // 2:
            raise GraphError(f"padding {a['padding']} is more than half the kernel {a['kernel_size']}")


def _check_out_groups(a):
    if a["out_channels"] % a["out_groups"]:
        raise GraphError(f"{a['out_channels']} output channels are not divisible by out_groups={a['out_groups']}")


# ---------------------------------------------------------------------------
# ranks of float values

_IMAGE_OPS = {
    "pack",
    "threshold_pack",
    "conv2d",
    "qconv2d",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
}
_SAME_RANK = {
    "relu",
    "relu6",
    "leaky_relu",
    "hardtanh",
    "prelu",
    "sigmoid",
    "tanh",
    "sign",
    "dorefa",
    "dorefa_sym",
    "quantize_int",
    "identity",
    "div",
}


def _dim(dim: int, rank: int, what: str) -> int:
    if not -rank <= dim < rank:
        raise GraphError(f"{what} {dim} is out of range for a value of rank {rank}")
    return dim % rank


def _output_rank(op: str, a: dict, ranks: list[int | None]) -> int | None:
    """The rank of a node's float output from its inputs' ranks (None: packed, or not known);
    raises :class:`GraphError` when an input's rank does not suit the op."""
    if any(r is None for r in ranks) or not ranks:
        return 4 if op in ("binary_conv2d",) else 2 if op == "binary_linear" else None
    r = ranks[0]
    if op in _IMAGE_OPS:
        if r != 4:
            raise GraphError(f"op {op} takes a rank-4 [N, C, H, W] input, got rank {r}")
        return None if op in ("pack", "threshold_pack") else 4
    if op in ("batch_norm", "sign_threshold") and r < 2:
        raise GraphError(f"op {op} takes an input with a channel dimension (rank >= 2), got rank {r}")
    if op == "softmax":
        _dim(a["dim"], r, "dim")
    if op == "roll":
        _dim(a["dim"], r, "dim")
    if op == "flatten":
        start, end = _dim(a["start_dim"], r, "start_dim"), _dim(a["end_dim"], r, "end_dim")
        if start > end:
            raise GraphError(f"start_dim {a['start_dim']} comes after end_dim {a['end_dim']} for a value of rank {r}")
        return r - (end - start)
    if op == "reshape":
        return 1 + len(a["shape"])
    if op == "cat":
        if len(set(ranks)) != 1:
            raise GraphError(f"op cat takes inputs of one rank, got ranks {ranks}")
        _dim(a["dim"], r, "dim")
    if op in ("add", "mul"):
        return max(ranks)
    if op == "pack_features":
        return None
    if op == "bitplane_conv2d":  # a conv on [N, C, H, W], or a linear layer on [N, F]
        if r not in (2, 4) or (r == 2 and a["kernel_size"] != [1, 1]):
            raise GraphError(f"op bitplane_conv2d takes a rank-4 input (rank 2 for a 1 x 1 linear form), got rank {r}")
        return r
    if op in _SAME_RANK or op in ("batch_norm", "sign_threshold", "softmax", "roll", "cat", "linear", "qlinear"):
        return r
    return None  # an op whose output rank this table does not know: later checks skip it


# ---------------------------------------------------------------------------
# validation

_LAYOUT_KEYS = ("padding", "pad_value", "groups")


def _produced_layout(node: dict) -> tuple | None:
    """(padding, pad_value, groups, channels or None) of a packed value."""
    a = node["attrs"]
    if node["op"] == "pack":
        return (tuple(a["padding"]), a["pad_value"], a["groups"], None)
    if node["op"] in ("binary_conv2d_threshold", "threshold_pack"):
        return (tuple(a["out_padding"]), a["out_pad_value"], a["out_groups"], a["out_channels"])
    if node["op"] == "max_pool_bits":
        return (tuple(a["out_padding"]), a["out_pad_value"], a["out_groups"], a["channels"])
    if node["op"] == "pack_features":
        return ("features", a["features"])
    if node["op"] == "binary_linear_threshold":
        return ("features", a["out_features"])
    return None


def _expected_layout(node: dict) -> tuple:
    a = node["attrs"]
    if node["op"] in ("binary_linear", "binary_linear_threshold"):
        return ("features", a["in_features"])
    if node["op"] == "max_pool_bits":  # thresholded bits, unpadded, in the output's groups
        return ((0, 0), 0.0, a["out_groups"], a["channels"])
    return (tuple(a["padding"]), a["pad_value"], a["groups"], a["in_channels"])


def _layouts_match(produced: tuple, expected: tuple) -> bool:
    if produced[0] == "features" or expected[0] == "features":
        return produced == expected
    return produced[:3] == expected[:3] and (produced[3] is None or produced[3] == expected[3])


def validate(graph: Any, tensors: dict[str, torch.Tensor], *, compact: bool = False) -> None:
    """Check a graph and its tensors; raise :class:`GraphError` naming the first problem.

    ``compact=True`` checks binary weights in their file form (uint8 bits), else in
    their in-memory kernel form (int64 words). Besides names, references, kinds, attributes
    and tensors, the ranks of float values are followed from the input's: an op given a value
    of a rank it cannot take (a ``dim`` out of range, a 2-d value into a conv) is refused
    here, naming the node, instead of failing when the model runs. ``meta`` tensors (dtype
    and shape, no data) get every check but those of their values.
    """
    if not isinstance(graph, dict):
        raise GraphError("the graph must be a JSON object")
    for key in ("input", "nodes", "outputs"):
        if key not in graph:
            raise GraphError(f"the graph has no {key!r} entry")
    inp = graph["input"]
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
        raise GraphError("graph input must be an object with a name")
    try:
        _int(2, 8)(inp.get("rank"))  # batched, with a channel dimension
        _int(1)(inp.get("channels"))
        _choice(1, -1)(inp.get("channel_dim", 1))
    except GraphError as error:
        raise GraphError(f"graph input: {error}") from None
    if inp.get("dtype") != "float32":
        raise GraphError(f"graph input dtype must be float32, got {inp.get('dtype')!r}")
    if graph.get("output_kind", "tensor") not in ("tensor", "tuple", "list"):
        raise GraphError(f"unknown output_kind {graph.get('output_kind')!r}")
    kinds: dict[str, str] = {inp["name"]: FLOAT}
    ranks: dict[str, int | None] = {inp["name"]: inp["rank"]}
    producers: dict[str, dict] = {}
    used_tensors: set[str] = set()
    nodes = graph["nodes"]
    if not isinstance(nodes, list):
        raise GraphError("graph nodes must be a list")
    for index, node in enumerate(nodes):
        where = f"graph node {index}"
        if not isinstance(node, dict):
            raise GraphError(f"{where} is not an object")
        name, op = node.get("name"), node.get("op")
        if not isinstance(name, str) or not name:
            raise GraphError(f"{where} has no name")
        where = f"graph node {name!r}"
        if name in kinds:
            raise GraphError(f"{where}: duplicate value name")
        if not isinstance(op, str) or op not in OPS:
            raise GraphError(f"{where}: unknown op {op!r}")
        spec = OPS[op]
        inputs = node.get("inputs")
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise GraphError(f"{where}: inputs must be a list of value names")
        variadic = spec.inputs[-1] == "..."
        fixed = spec.inputs[:-1] if variadic else spec.inputs
        if len(inputs) < len(fixed) or (not variadic and len(inputs) != len(fixed)) or (variadic and len(inputs) > 64):
            raise GraphError(f"{where}: op {op} takes {len(fixed)}{'+' if variadic else ''} inputs, got {len(inputs)}")
        for i, ref in enumerate(inputs):
            if ref not in kinds:
                raise GraphError(f"{where}: input {ref!r} is not defined before it")
            want = fixed[min(i, len(fixed) - 1)]
            if kinds[ref] != want:
                raise GraphError(f"{where}: op {op} expects a {want} input, {ref!r} is {kinds[ref]}")
            if want == PACKED:
                producer = producers[ref]
                if not _layouts_match(
                    _produced_layout(producer), _expected_layout({"op": op, "attrs": _checked_attrs(node, spec, where)})
                ):
                    raise GraphError(f"{where}: packed input {ref!r} has a different layout than {op} expects")
        attrs = _checked_attrs(node, spec, where)
        for flag in ("conv1d", "linear"):  # the layout of the output (see PackedModel)
            if not isinstance(node.get(flag, False), bool):
                raise GraphError(f"{where}: {flag!r} must be true or false")
        node_tensors = node.get("tensors", {})
        if not isinstance(node_tensors, dict):
            raise GraphError(f"{where}: tensors must be an object")
        for role in node_tensors:
            if role not in spec.tensors:
                raise GraphError(f"{where}: op {op} has no tensor {role!r}")
        for role, ts in spec.tensors.items():
            key = node_tensors.get(role)
            if key is None:
                if ts.required:
                    raise GraphError(f"{where}: missing tensor {role!r}")
                continue
            if not isinstance(key, str) or key not in tensors:
                raise GraphError(f"{where}: tensor {role!r} refers to {key!r}, which is not in the file")
            t = tensors[key]
            if ts.binary and compact:  # one row of bits per packed row (output channel, or weight plane)
                dtype, shape = torch.uint8, (ts.shape(attrs)[0], compact_shape(attrs)[1])
            else:
                dtype, shape = ts.dtype, ts.shape(attrs)
            if t.dtype != dtype:
                raise GraphError(f"{where}: tensor {key!r} must be {dtype}, got {t.dtype}")
            if shape is not None and tuple(t.shape) != tuple(shape):
                raise GraphError(f"{where}: tensor {key!r} must have shape {list(shape)}, got {list(t.shape)}")
            if shape is None and t.dim() != 1:
                raise GraphError(f"{where}: tensor {key!r} must be 1-D, got shape {list(t.shape)}")
            if t.is_meta:  # dtype and shape only: the values are checked once they are read
                used_tensors.add(key)
                continue
            if ts.check is not None and t.numel():
                problem = ts.check(t, attrs)
                if problem:
                    raise GraphError(f"{where}: tensor {key!r} {problem}")
            if role == "direction" and t.numel() and not bool(((t == 1) | (t == -1)).all()):
                raise GraphError(f"{where}: tensor {key!r} must hold only +1 and -1")
            if role in ("or_mask", "pad_words") and t.numel():
                cg = attrs["channels"] // attrs["out_groups"]
                unused = _unused_bits(cg, t.shape[-1])
                if bool(((t & unused) != 0).any()):
                    raise GraphError(f"{where}: tensor {key!r} has bits set beyond the {cg} channels of a group")
            used_tensors.add(key)
        if op in ("qconv2d", "qlinear") and ("weight" in node_tensors) == ("weight_bits" in node_tensors):
            raise GraphError(f"{where}: op {op} needs exactly one of the tensors 'weight' and 'weight_bits'")
        try:
            ranks[name] = _output_rank(op, attrs, [ranks.get(ref) for ref in inputs])
        except GraphError as error:
            raise GraphError(f"{where}: {error}") from None
        kinds[name] = spec.output
        producers[name] = {"op": op, "attrs": attrs}
    outputs = graph["outputs"]
    if not isinstance(outputs, list) or not outputs:
        raise GraphError("graph outputs must be a non-empty list of value names")
    for ref in outputs:
        if not isinstance(ref, str) or ref not in kinds:
            raise GraphError(f"graph output {ref!r} is not a defined value")
        if kinds[ref] != FLOAT:
            raise GraphError(f"graph output {ref!r} is a packed value")
        if ref == inp["name"] and nodes:  # an identity model has no nodes; with nodes, none would count
            raise GraphError(f"graph output {ref!r} is the graph's input itself, not computed by any of its nodes")
    unused = set(tensors) - used_tensors
    if unused:
        raise GraphError(f"tensors not used by the graph: {sorted(unused)[:5]}")
    fallbacks = graph.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(
        isinstance(f, dict) and set(f) == {"module", "reason"} and all(isinstance(v, str) for v in f.values())
        for f in fallbacks
    ):
        raise GraphError("graph fallbacks must be a list of {module, reason} strings")


def _unused_bits(channels: int, words: int) -> torch.Tensor:
    """int64 ``[words]``: the bits beyond ``channels`` (which must stay 0)."""
    return torch.tensor([~word for word in used_bits(channels, words)], dtype=torch.int64)


def attrs(node: dict) -> dict:
    """A node's attributes, checked against its op and normalised (pairs as lists, numbers as their
    types); :class:`GraphError` naming the node when they are not what the op takes."""
    op = node.get("op")
    if op not in OPS:
        raise GraphError(f"graph node {node.get('name')!r}: unknown op {op!r}")
    return _checked_attrs(node, OPS[op], f"graph node {node.get('name')!r}")


def _checked_attrs(node: dict, spec: OpSpec, where: str) -> dict:
    attrs = node.get("attrs", {})
    if not isinstance(attrs, dict):
        raise GraphError(f"{where}: attrs must be an object")
    out = {}
    for key in attrs:
        if key not in spec.attrs:
            raise GraphError(f"{where}: unknown attribute {key!r} for op {node['op']}")
    for key, check in spec.attrs.items():
        if key not in attrs and key in spec.defaults:
            out[key] = spec.defaults[key]
            continue
        if key not in attrs:
            raise GraphError(f"{where}: missing attribute {key!r}")
        try:
            out[key] = check(attrs[key])
        except GraphError as error:
            raise GraphError(f"{where}: attribute {key!r}: {error}") from None
    if spec.check is not None:
        try:
            spec.check(out)
        except GraphError as error:
            raise GraphError(f"{where}: {error}") from None
    return out
