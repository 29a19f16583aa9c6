"""Quantized ops run as the model computes them: quantizers, layers whose weights are levels
(float, or +-1 unpacked from bits), bit-plane layers and BitNet's ternary linear layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from onebit.bits import unpack_signs
from onebit.engine import bitplanes, ops
from onebit.engine.geometry import words_for
from onebit.engine.graph.floats import padded_conv
from onebit.engine.graph.schema import (
    BINARY_CONV_ATTRS,
    F32,
    FLOAT,
    FLOAT_CONV_ATTRS,
    GraphError,
    OpSpec,
    TensorSpec,
    binary_weight_shape,
    boolean,
    check_groups,
    choice,
    integer,
    number,
    optional_positive,
    per_out_channel,
    per_out_feature,
    positive,
)
from onebit.engine.steps import Step
from onebit.engine.sum_order import NormOrderProbe
from onebit.math import sign
from onebit.nn.functional import scale_and_bias
from onebit.quant import DoReFaSymmetric


class DerivedWeights:
    """A tensor derived from a layer's weight (its +-1 levels unpacked from bits, its planes repeated),
    kept and made again when the weight is written: seen by the weight's version counter, address
    and sampled words, as :class:`onebit.engine.kernels.WeightCache` sees writes."""

    __slots__ = ("state", "value")

    def __init__(self) -> None:
        self.state, self.value = None, None

    def get(self, weight: torch.Tensor, derive: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if type(weight) is not torch.Tensor or torch.compiler.is_compiling():
            return derive(weight)  # traced (torch.export, torch.compile): the derivation is part of the program
        state = bits_state(weight)
        if self.value is None or self.state != state:
            self.value, self.state = derive(weight), state
        return self.value


def _levels(t, a, derived: DerivedWeights | None) -> torch.Tensor:
    """A float-run quantized layer's weight levels: the float tensor, or +-1 unpacked from bits (once
    per write of the bits, with ``derived``)."""
    if "weight" in t:
        return t["weight"]
    return (derived or DerivedWeights()).get(t["weight_bits"], lambda bits: _unpacked_levels(bits, a))


def _unpacked_levels(bits: torch.Tensor, a: dict) -> torch.Tensor:
    """+-1 levels from packed sign weights: conv ``[Co, KH, KW, Wg]`` words -> ``[Co, Cg, KH, KW]``, linear
    ``[Co, Wg]`` -> ``[Co, F]``."""
    if "kernel_size" in a:
        return unpack_signs(bits, a["in_channels"] // a["groups"]).permute(0, 3, 1, 2).contiguous()
    return unpack_signs(bits, a["in_features"]).contiguous()


def bits_state(bits: torch.Tensor) -> tuple:
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


def _qconv2d(t, a, x, derived=None):
    """A quantized conv run in float, as :func:`onebit.nn.functional.qconv` computes it:
    ``conv(pad(x, pad_value), levels) [/ input_divisor] * scale + bias`` (x already quantized, or
    its integers when the input quantizer factors them out)."""
    y = padded_conv(x, _levels(t, a, derived), None, a)
    if a["input_divisor"] is not None:
        y = y / a["input_divisor"]
    return _scale_and_bias(t, y, 2)


def _qlinear(t, a, x, derived=None):
    """A quantized linear layer run in float: ``(x @ levels.T) [/ input_divisor] * scale + bias``."""
    y = F.linear(x, _levels(t, a, derived))
    if a["input_divisor"] is not None:
        y = y / a["input_divisor"]
    return _scale_and_bias(t, y, 0)


def _bind_levels(fn: Callable) -> Callable:
    """The runner of a float-run quantized layer: its levels unpacked once per write of its bits."""

    def bind(step: Step) -> Callable:
        t, a, derived = step.tensors, step.attrs, DerivedWeights()
        return lambda x: fn(t, a, x, derived)

    return bind


def _quantize_int(t, a, x):
    """An input quantizer's integers (``integer_factor``), see :func:`onebit.engine.bitplanes.integer_input`."""
    return bitplanes.integer_input(x, a["kind"], a["bits"], a["clip"])


def _dorefa_sym(t, a, x):
    """``dorefa_sym``'s forward: ``c (2 floor((clamp(x, -c, c) / c + 1) / 2 * n + 1/2) / n - 1)``."""
    return DoReFaSymmetric(a["bits"], a["clip"])(x)


def _bitplane_conv2d(t, a, x, cache=None, stacked=None):
    """A k-bit / ternary conv (or linear layer, on ``[N, F]``) by bit planes: the input quantizer's
    integers, their exact integer conv with the weight levels (one binary conv of all plane pairs),
    then ``/ input_divisor * scale + bias`` as :func:`onebit.nn.functional.qconv` computes it."""
    act = bitplanes.PlaneCode(a["act_kind"], a["act_bits"])
    weight = bitplanes.PlaneCode(a["weight_kind"], a["weight_bits"])
    linear = x.dim() == 2
    if linear:
        x = x[:, :, None, None]
    # the weight planes repeated for every activation plane (once per write of the planes, with ``stacked``)
    stacked = (stacked or DerivedWeights()).get(t["weight"], lambda planes: planes.repeat(act.planes, 1, 1, 1))
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
        cache=cache,
    )
    return y[:, :, 0, 0].contiguous() if linear else y


def _bind_bitplane_conv2d(step: Step) -> Callable:
    """A bit-plane conv with the step's weight cache and its repeated planes kept."""
    t, a, cache, stacked = step.tensors, step.attrs, step.cache, DerivedWeights()
    return lambda x: _bitplane_conv2d(t, a, x, cache, stacked)


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


def _ternary_linear(t, a, x, layer=None):
    """BitLinear: ``[rms_norm] -> absmax8 -> (x_int @ levels.T) / s * scale + bias`` over the last dimension;
    by ``layer`` (the step's bound native layer) on the native backend."""
    f = a["in_features"]
    if x.shape[-1] != f:
        raise ValueError(f"expected {f} input features, got shape {list(x.shape)}")
    tokens = x if x.dim() == 2 else x.reshape(-1, f)  # [N, F] as it comes: a decoding step's reshapes cost µs
    if layer is not None and ops.backend_is_native():
        y = layer(tokens)  # with the norm, when the step has one
    else:
        if a["norm"]:
            tokens = F.rms_norm(tokens, (f,), eps=a["eps"])
        y = ops.ternary_linear(tokens, t["weight"], in_features=f, scale=t.get("scale"), bias=t.get("bias"))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], a["out_features"])


#: which vector width gives F.rms_norm's bits, per token shape and thread count: one probe for every
#: packed BitLinear (the answer is torch's, not a layer's)
NORM_ORDER = NormOrderProbe(ops.rms_norm_in_order)


def _bind_ternary_linear(step: Step) -> Callable:
    """A ternary linear step with its weight, scale, bias and norm bound to a native layer (checked once)."""
    t, a = step.tensors, step.attrs
    layer = ops.ternary_layer(
        t["weight"],
        in_features=a["in_features"],
        scale=t.get("scale"),
        bias=t.get("bias"),
        norm_eps=a["eps"] if a["norm"] else None,
        norm_order=NORM_ORDER if a["norm"] else None,
    )
    return lambda x: _ternary_linear(t, a, x, layer)


def _ternary_codes_problem(t: torch.Tensor, a: dict) -> str | None:
    """A 2-bit ternary weight holds only the codes 0, 1, 2 (w + 1), and 0 beyond ``in_features``."""
    codes = ((t.unsqueeze(-1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3).reshape(t.shape[0], -1)
    if bool((codes == 3).any()):
        return "holds the 2-bit code 3, which is no ternary weight (codes are w + 1 in {0, 1, 2})"
    if bool((codes[:, a["in_features"] :] != 0).any()):
        return f"has nonzero codes beyond the {a['in_features']} input features"
    return None


def _check_positive_eps(a):
    if not a["eps"] > 0:
        raise GraphError(f"eps must be positive, got {a['eps']}")


QUANTIZED_OPS: dict[str, OpSpec] = {
    "qconv2d": OpSpec(
        _qconv2d,
        (FLOAT,),
        FLOAT,
        {**FLOAT_CONV_ATTRS, "input_divisor": optional_positive},
        {
            "weight": TensorSpec(
                F32, lambda a: (a["out_channels"], a["in_channels"] // a["groups"], *a["kernel_size"]), required=False
            ),
            "weight_bits": TensorSpec(torch.int64, binary_weight_shape, required=False, binary=True),
            "scale": TensorSpec(F32, per_out_channel, required=False),
            "bias": TensorSpec(F32, per_out_channel, required=False),
        },
        check_groups,
        defaults={"input_divisor": None},
        bind=_bind_levels(_qconv2d),
    ),
    "qlinear": OpSpec(
        _qlinear,
        (FLOAT,),
        FLOAT,
        {"in_features": integer(1), "out_features": integer(1), "input_divisor": optional_positive},
        {
            "weight": TensorSpec(F32, lambda a: (a["out_features"], a["in_features"]), required=False),
            "weight_bits": TensorSpec(
                torch.int64, lambda a: (a["out_features"], (a["in_features"] + 63) // 64), required=False, binary=True
            ),
            "scale": TensorSpec(F32, per_out_feature, required=False),
            "bias": TensorSpec(F32, per_out_feature, required=False),
        },
        defaults={"input_divisor": None},
        bind=_bind_levels(_qlinear),
    ),
    "sign": OpSpec(_sign, (FLOAT,), FLOAT, layout_free=True),
    "sign_threshold": OpSpec(
        _sign_threshold,
        (FLOAT,),
        FLOAT,
        {"channels": integer(1)},
        {
            "thresholds": TensorSpec(torch.int32, lambda a: (a["channels"],)),
            "direction": TensorSpec(torch.int8, lambda a: (a["channels"],)),
        },
        layout_free=True,
    ),
    "dorefa": OpSpec(_dorefa, (FLOAT,), FLOAT, {"bits": integer(1, 16)}, layout_free=True),
    "dorefa_sym": OpSpec(_dorefa_sym, (FLOAT,), FLOAT, {"bits": integer(1, 16), "clip": positive}, layout_free=True),
    "quantize_int": OpSpec(
        _quantize_int,
        (FLOAT,),
        FLOAT,
        {"kind": choice("dorefa", "dorefa_sym"), "bits": integer(1, 16), "clip": positive},
        layout_free=True,
    ),
    "bitplane_conv2d": OpSpec(
        _bitplane_conv2d,
        (FLOAT,),
        FLOAT,
        {
            **BINARY_CONV_ATTRS,
            "quantizer": choice("dorefa", "dorefa_sym"),
            "clip": positive,
            "act_kind": choice("symmetric", "unsigned"),
            "act_bits": integer(1, bitplanes.MAX_INPUT_PLANES),
            "weight_kind": choice("binary", "ternary", "symmetric"),
            "weight_bits": integer(1, bitplanes.MAX_WEIGHT_PLANES),
            "input_divisor": positive,
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
            "scale": TensorSpec(F32, per_out_channel, required=False),
            "bias": TensorSpec(F32, per_out_channel, required=False),
        },
        check_groups,
        bind=_bind_bitplane_conv2d,
        weight_cache=True,
        layout_free=True,
    ),
    "ternary_linear": OpSpec(
        _ternary_linear,
        (FLOAT,),
        FLOAT,
        {"in_features": integer(1, 1 << 17), "out_features": integer(1), "norm": boolean, "eps": number},
        {
            "weight": TensorSpec(
                torch.uint8, lambda a: (a["out_features"], (a["in_features"] + 3) // 4), check=_ternary_codes_problem
            ),
            "scale": TensorSpec(F32, per_out_feature, required=False),
            "bias": TensorSpec(F32, per_out_feature, required=False),
        },
        lambda a: _check_positive_eps(a),
        bind=_bind_ternary_linear,
    ),
}
