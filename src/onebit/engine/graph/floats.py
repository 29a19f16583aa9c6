"""Float ops: the model's own torch ops (convolutions, linear layers, BatchNorm, pools, shapes,
arithmetic and activations) on the same values in the same memory format."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from onebit.engine import ops
from onebit.engine.graph.schema import (
    F32,
    FLOAT,
    FLOAT_CONV_ATTRS,
    GraphError,
    OpSpec,
    TensorSpec,
    any_length,
    boolean,
    check_groups,
    int_list,
    integer,
    non_negative,
    number,
    optional,
    pair,
    per_feature,
    per_out_channel,
    per_out_feature,
)
from onebit.engine.kernels.registry import direct
from onebit.engine.layout_probe import wide_range_probe
from onebit.engine.sum_order import RoundingProbe, SumOrderProbe
from onebit.nn.twist import coordinate_maps


def padded_conv(x, weight, bias, a):
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
    return padded_conv(x, t["weight"], t.get("bias"), a)


def _pointwise(t, a) -> bool:
    """Whether a float conv node is a plain 1x1 conv: stride 1, no padding, one group."""
    return (
        tuple(t["weight"].shape[2:]) == (1, 1)
        and a["stride"] == [1, 1]
        and a["padding"] in ([0, 0], "valid", "same")
        and a["groups"] == 1
        and a["pad_value"] == 0.0
        and a["padding_mode"] == "zeros"
    )


#: at most this many input channels for a conv that may run as onebit's tap-ordered conv (a network's
#: stem: RGB or grey images); on wider inputs its direct loop would not gain on torch's kernels
TAP_CONV_MAX_CHANNELS = 4


def _stem(t, a) -> bool:
    """Whether a float conv node is a stem onebit's tap-ordered conv may run: a few input channels, a
    kernel larger than 1x1, one group, no dilation, no bias, zero padding given as a pair."""
    w = t["weight"]
    return (
        w.shape[1] <= TAP_CONV_MAX_CHANNELS
        and tuple(w.shape[2:]) != (1, 1)
        and t.get("bias") is None
        and a["groups"] == 1
        and a["dilation"] == [1, 1]
        and isinstance(a["padding"], list)
        and a["pad_value"] == 0.0
        and a["padding_mode"] == "zeros"
    )


def _channelwise(t, a) -> bool:
    """Whether a float conv node is a depthwise 1x1 conv: one input channel per group, one output channel per
    input channel (a per-channel scale and bias, as a ReActNet-style block's learnable shift), stride 1, no
    padding."""
    w, b = t["weight"], t.get("bias")
    return (
        tuple(w.shape[1:]) == (1, 1, 1)
        and w.dtype == torch.float32
        and w.is_contiguous()
        and (b is None or (b.dtype == torch.float32 and b.is_contiguous()))
        and a["groups"] == w.shape[0]
        and a["stride"] == [1, 1]
        and a["padding"] in ([0, 0], "valid", "same")
        and a["pad_value"] == 0.0
        and a["padding_mode"] == "zeros"
    )


#: how onebit computes a depthwise 1x1 conv, by the rounding torch's kernel makes (RoundingProbe's answers)
CHANNELWISE_ROUNDINGS = {"multiply, then add": False, "fused multiply-add": True}


def _channelwise_probes(channels: int, with_bias: bool) -> dict:
    """Per layout (NCHW, channels_last), a :class:`RoundingProbe` asking how torch rounds a depthwise 1x1 conv of
    the input's shape: as a multiply and then an add, or as one fused multiply-add (its NCHW kernel on two
    threads), or neither. Asked with a weight and bias of wide range, not the model's: those may be exact
    products (ones, as at initialization), which round alike either way, and a packed model's weights may be
    loaded later."""
    values = wide_range_probe(torch.Size((2, channels)))
    w, b = values[0].reshape(channels, 1, 1, 1), (values[1] if with_bias else None)
    candidates = {name: ops.channelwise_conv1x1(w, b, fma) for name, fma in CHANNELWISE_ROUNDINGS.items()}

    def torch_conv(x):
        return F.conv2d(x, w, b, groups=channels)

    return {fmt: RoundingProbe(torch_conv, candidates, fmt) for fmt in (torch.contiguous_format, torch.channels_last)}


def _bind_channelwise_conv2d(t, plain):
    """A depthwise 1x1 conv's runner ``run(x, model_format=None)``: onebit's channelwise conv where torch rounds
    the input's shape in ``model_format`` (the model's layout; by default ``x``'s own) as one of its ways (asked
    of torch once per layout, shape and thread count), else torch's conv on ``x`` in that layout. onebit's conv
    rounds as torch's kernel for one layout does on a map in either, so a model need not copy its input."""
    weight, bias = t["weight"], t.get("bias")
    convs = {name: ops.channelwise_conv1x1(weight, bias, fma) for name, fma in CHANNELWISE_ROUNDINGS.items()}
    probes = _channelwise_probes(weight.shape[0], bias is not None)

    def run(x, model_format=None):
        if type(x) is torch.Tensor and x.dtype is torch.float32 and x.dim() == 4 and ops.backend_is_native():
            conv = convs["multiply, then add"]
            if conv.takes(x):  # eager calls on NCHW or channels_last maps only (a trace keeps torch's conv)
                layout = model_format or (torch.contiguous_format if x.is_contiguous() else torch.channels_last)
                rounding = probes[layout](x)
                if rounding:
                    return convs[rounding].run(x)
        if model_format is not None and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=model_format)  # torch's conv rounds by layout: the model's
        return plain(x)

    return run


def _bind_conv2d(step):
    """A float conv's runner: torch's conv, or one of onebit's ordered convs where torch sums the input's
    shape in its order (asked of torch once per shape and thread count: :class:`SumOrderProbe`): a 1x1 conv on
    an NCHW input that torch's reference GEMM sums in channel order, several times faster; a stem (3 channels,
    7x7) that torch sums as fused multiply-add chains in (kh, kw, c) order, where it is faster than torch's
    conv in either layout (timed by the probe); a depthwise 1x1 conv that torch rounds as a multiply and an add,
    or as a fused multiply-add, in one pass (20-100x faster than torch's grouped conv)."""
    t, a = step.tensors, step.attrs
    plain = partial(_conv2d, t, a)
    native = ops.native_available()
    if native and _channelwise(t, a):
        step.keeps_layout = True
        return _bind_channelwise_conv2d(t, plain)
    if native and _pointwise(t, a):
        ordered = ops.ordered_conv1x1(t["weight"], t.get("bias"))
        probe = SumOrderProbe(plain, ordered)
    elif native and _stem(t, a):
        ordered = ops.tap_ordered_conv(t["weight"], a["stride"], a["padding"])
        probe = SumOrderProbe(plain, ordered, (torch.contiguous_format, torch.channels_last), timed=True)
    else:
        return plain

    def run(x):
        if type(x) is torch.Tensor and x.dtype is torch.float32 and x.dim() == 4 and ops.backend_is_native():
            # eager calls only (a trace keeps torch's conv); the shape's answer before the input's strides
            if direct() and probe(x) and ordered.takes(x):
                return ordered.run(x)
        return plain(x)

    return run


def _linear(t, a, x):
    return F.linear(x, t["weight"], t.get("bias"))


def _batch_norm(t, a, x):
    return F.batch_norm(x, t["running_mean"], t["running_var"], t.get("weight"), t.get("bias"), False, 0.0, a["eps"])


#: input sizes from which onebit's native max pool beats torch's: NCHW maps (torch's NCHW pool is several
#: times slower than its channels_last one) and channels_last ones
NATIVE_POOL_MIN_NCHW, NATIVE_POOL_MIN_CHANNELS_LAST = 2048, 16384


def _max_pool2d(t, a, x):
    if x.dim() == 4 and x.dtype == torch.float32 and x.shape[1] > 1:
        # a max rounds nothing, so the pool is layout-free: onebit's native pool reads NCHW or channels_last
        # and writes channels_last. Traced with a symbolic batch, the size is unknown and the plain pool
        # is traced: the choice never becomes a guard bounding the program's batch (torch.export's Dim)
        least = NATIVE_POOL_MIN_NCHW if x.is_contiguous() else NATIVE_POOL_MIN_CHANNELS_LAST
        if statically_known_true(x.numel() >= least):
            return ops.max_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    return F.max_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], ceil_mode=a["ceil_mode"])


def _avg_pool2d(t, a, x):
    return F.avg_pool2d(
        x, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"], a["divisor_override"]
    )


def _adaptive_avg_pool2d(t, a, x):
    return F.adaptive_avg_pool2d(x, a["output_size"])


def _bind_max_pool2d(step):
    """A max pool's runner; with a BatchNorm fused before it (``step.epilogue``), the pool of that
    BatchNorm, which the native kernel applies to the pooled values (:func:`batchnorm_before_pool`)."""
    t, a, e = step.tensors, step.attrs, step.epilogue
    if e is None:
        return lambda x: _max_pool2d(t, a, x)
    bn = (e.bn_scale, e.bn_shift, e.bn_fma)
    return lambda x: ops.max_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"], bn)


def batchnorm_before_pool(bn_scale: torch.Tensor, bn_shift: torch.Tensor, fma: bool) -> bool:
    """Whether a BatchNorm ``y = x * bn_scale + bn_shift`` (per channel, rounded once with ``fma``, else
    twice) may run after the max pool that reads it, the pool taking the max of ``x`` where
    ``bn_scale > 0`` and the min where ``< 0``, with torch's results bit for bit.

    Every scale finite and nonzero and every shift finite: then ``y`` is monotone in ``x`` (each
    rounding is), a NaN stays a NaN and an infinity infinite. Equal values of a window must have equal
    bits too (which of them torch's pool keeps cannot show then): only ``-0.0`` and ``+0.0`` could
    differ. A zero ``y`` with a nonzero shift is an exact cancellation, +0.0; with a shift of +0.0 it is
    +0.0 as well when rounded twice (``fl(x a) + 0.0``), and rounded once where ``|bn_scale| > 0.5`` (no
    nonzero ``x a`` then rounds to zero); a shift of -0.0 gives zeros of both signs."""
    scale, shift = bn_scale.reshape(-1), bn_shift.reshape(-1)
    if not (bool(torch.isfinite(scale).all()) and bool(torch.isfinite(shift).all())) or bool((scale == 0).any()):
        return False
    zero = shift == 0
    if bool((zero & torch.signbit(shift)).any()):
        return False
    return not fma or not bool((zero & (scale.abs() <= 0.5)).any())


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


def _identity(t, a, x):
    return x


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


FLOAT_OPS: dict[str, OpSpec] = {
    "conv2d": OpSpec(
        _conv2d,
        (FLOAT,),
        FLOAT,
        dict(FLOAT_CONV_ATTRS),
        {
            "weight": TensorSpec(
                F32, lambda a: (a["out_channels"], a["in_channels"] // a["groups"], *a["kernel_size"])
            ),
            "bias": TensorSpec(F32, per_out_channel, required=False),
        },
        check_groups,
        bind=_bind_conv2d,
        probes_layout=True,
    ),
    "linear": OpSpec(
        _linear,
        (FLOAT,),
        FLOAT,
        {"in_features": integer(1), "out_features": integer(1)},
        {
            "weight": TensorSpec(F32, lambda a: (a["out_features"], a["in_features"])),
            "bias": TensorSpec(F32, per_out_feature, required=False),
        },
    ),
    "batch_norm": OpSpec(
        _batch_norm,
        (FLOAT,),
        FLOAT,
        {"num_features": integer(1), "eps": non_negative},
        {
            "running_mean": TensorSpec(F32, per_feature),
            "running_var": TensorSpec(F32, per_feature),
            "weight": TensorSpec(F32, per_feature, required=False),
            "bias": TensorSpec(F32, per_feature, required=False),
        },
        layout_free=True,
    ),
    "max_pool2d": OpSpec(
        _max_pool2d,
        (FLOAT,),
        FLOAT,
        {"kernel_size": pair(1), "stride": pair(1), "padding": pair(0), "dilation": pair(1), "ceil_mode": boolean},
        check=lambda a: _check_pool_padding(a),
        bind=_bind_max_pool2d,
        layout_free=True,
    ),
    "avg_pool2d": OpSpec(
        _avg_pool2d,
        (FLOAT,),
        FLOAT,
        {
            "kernel_size": pair(1),
            "stride": pair(1),
            "padding": pair(0),
            "ceil_mode": boolean,
            "count_include_pad": boolean,
            "divisor_override": optional(integer(1)),
        },
        check=lambda a: _check_pool_padding(a),
        layout_free=True,
        prefers_channels_last=True,
    ),
    "adaptive_avg_pool2d": OpSpec(_adaptive_avg_pool2d, (FLOAT,), FLOAT, {"output_size": pair(1)}),
    "adaptive_max_pool2d": OpSpec(_adaptive_max_pool2d, (FLOAT,), FLOAT, {"output_size": pair(1)}, layout_free=True),
    "flatten": OpSpec(
        _flatten, (FLOAT,), FLOAT, {"start_dim": integer(-8, 8), "end_dim": integer(-8, 8)}, layout_free=True
    ),
    "reshape": OpSpec(
        _reshape, (FLOAT,), FLOAT, {"shape": int_list}, check=lambda a: _check_shape(a), layout_free=True
    ),
    "add": OpSpec(_add, (FLOAT, "..."), FLOAT, {"other": number, "alpha": number}, layout_free=True),
    "mul": OpSpec(_mul, (FLOAT, "..."), FLOAT, {"other": number}, layout_free=True),
    "div": OpSpec(_div, (FLOAT,), FLOAT, {"other": number}, layout_free=True),
    "roll": OpSpec(
        _roll, (FLOAT,), FLOAT, {"shifts": integer(-(1 << 30), 1 << 30), "dim": integer(-8, 8)}, layout_free=True
    ),
    "twist_mix": OpSpec(_twist_mix, (FLOAT, FLOAT, FLOAT), FLOAT, layout_free=True),
    "cat": OpSpec(_cat, (FLOAT, "..."), FLOAT, {"dim": integer(-8, 8)}, layout_free=True),
    "relu": OpSpec(_relu, (FLOAT,), FLOAT, layout_free=True),
    "relu6": OpSpec(_relu6, (FLOAT,), FLOAT, layout_free=True),
    "leaky_relu": OpSpec(_leaky_relu, (FLOAT,), FLOAT, {"negative_slope": number}, layout_free=True),
    "hardtanh": OpSpec(
        _hardtanh,
        (FLOAT,),
        FLOAT,
        {"min_val": number, "max_val": number},
        check=lambda a: _check_order(a),
        layout_free=True,
    ),
    "prelu": OpSpec(_prelu, (FLOAT,), FLOAT, {}, {"weight": TensorSpec(F32, any_length)}, layout_free=True),
    "sigmoid": OpSpec(_sigmoid, (FLOAT,), FLOAT),
    "tanh": OpSpec(_tanh, (FLOAT,), FLOAT),
    "softmax": OpSpec(_softmax, (FLOAT,), FLOAT, {"dim": integer(-8, 8)}),
    "identity": OpSpec(_identity, (FLOAT,), FLOAT, layout_free=True),
}
