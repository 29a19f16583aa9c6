"""The emitters of onebit's quantized layers.

An emitter ``emitter(low, node, m)`` writes the ops of layer ``m`` (the fx ``node`` calling it)
and sets its ``low.value``; it fuses nothing (:mod:`onebit.engine.fuse` does).
:data:`QUANTIZED` lists them in order as ``(predicate(low, node, m), emitter)``: the first whose
predicate holds lowers the layer. A new quantized layer is one emitter and one entry.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from onebit.engine import bitplanes, ops
from onebit.engine.lowering.attrs import conv_attrs, float_conv_attrs, float_copy, pair
from onebit.engine.lowering.floats import conv1d_as_2d, conv1d_float_attrs, to_1d
from onebit.engine.lowering.int8 import emit_int8_layer, is_int8_layer
from onebit.engine.lowering.operands import (
    binary_weights,
    clip,
    float_layer_tensors,
    input_kind,
    integer_divisor,
    layer_input,
    packed_features,
    packed_input,
    quantize,
    weight_factors,
)
from onebit.engine.lowering.patterns import (
    binary_conv_kind,
    binary_input,
    binary_weight,
    bitplane_codes,
    conv_layout,
    is_sign_quantizer,
    is_ternary_linear,
    note_fallback,
)
from onebit.engine.lowering.state import Lowering
from onebit.nn import functional as QF
from onebit.nn.bitlinear import BitLinear
from onebit.nn.layers import QConv1d, QConv2d, QLinear
from onebit.nn.twist import TwistConv2d


def _padding_reason(m: nn.Module) -> str:
    """Why a binary conv with constant-incompatible padding runs in float."""
    return (
        f"padding_mode={m.padding_mode!r} (the packed kernels pad with a constant)"
        if m.padding_mode != "zeros"
        else f"asymmetric padding {m.padding!r}"
    )


# -- binary 2-d convs -----------------------------------------------------------


def emit_binary_conv(low: Lowering, node: fx.Node, m: QConv2d) -> None:
    """A binary QConv2d the packed kernels run: ``pack`` (shared by every conv reading the same
    value in the same layout) + ``binary_conv2d`` with the per-channel scale and bias."""
    layout = conv_layout(m)
    xp = packed_input(low, node, node.args[0], layout)
    wp, scale = binary_weights(m)
    conv = conv_attrs(m, m.kernel_size, m.stride, layout[0], m.dilation, m.pad_value)
    low.value[node] = low.emit(
        node.name, "binary_conv2d", [xp], conv, {"weight": wp, "scale": scale, "bias": float_copy(m.bias)}, node.target
    )


def emit_float_qconv(low: Lowering, node: fx.Node, m: QConv2d) -> None:
    """A QConv2d run as the model runs it (:func:`onebit.nn.functional.qconv`): quantize the
    input, float conv of the weight levels, then scale and bias."""
    x = low.arg(node, node.args[0])
    why = _padding_reason(m) if binary_conv_kind(low, m, node) == "float" else None
    note_fallback(low, node, m, why)
    x, divisor = layer_input(low, node, m, x)
    attrs = {**float_conv_attrs(m, float(m.pad_value)), "input_divisor": divisor}
    low.value[node] = low.emit(node.name, "qconv2d", [x], attrs, float_layer_tensors(m), node.target)


# -- 1-d convs --------------------------------------------------------------------


def emit_qconv1d(low: Lowering, node: fx.Node, m: QConv1d) -> None:
    """A QConv1d is a 2-d convolution of ``[N, C, 1, L]`` with a ``1 x k`` kernel (as torch runs it).

    Binary (+-1 input, sign or magnitude-aware weights) and zero-padded alike on both sides:
    packed. Otherwise as the model runs it: quantized input, float conv of the weight levels.
    """
    binary = binary_input(low, node, m) and binary_weight(m.weight_quantizer)
    pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
    packable = m.padding_mode == "zeros" and pad[0] == pad[1]
    x = low.arg(node, node.args[0])
    if not (binary and packable):
        note_fallback(low, node, m, _padding_reason(m) if binary else None)
        x, divisor = layer_input(low, node, m, x)
        x2d, attrs = conv1d_float_attrs(low, node, m, x, float(m.pad_value))
        attrs["input_divisor"] = divisor
        y = low.emit(node.name, "qconv2d", [x2d], attrs, float_layer_tensors(m), node.target)
        low.value[node] = to_1d(low, node, m, y)
        return
    x = low.sign_source.get(x, x)
    x2d, conv = conv1d_as_2d(low, node, m, x, float(m.pad_value))
    xp = low.emit(
        f"{x2d}_packed",
        "pack",
        [x2d],
        {"padding": conv["padding"], "pad_value": conv["pad_value"], "groups": conv["groups"]},
    )
    wp, scale = binary_weights(m)  # [Co, 1, k, Wg]: the 1 x k kernel
    y = low.emit(
        node.name, "binary_conv2d", [xp], conv, {"weight": wp, "scale": scale, "bias": float_copy(m.bias)}, node.target
    )
    low.value[node] = to_1d(low, node, m, y)


# -- twist convs --------------------------------------------------------------------


def emit_twist(low: Lowering, node: fx.Node, m: TwistConv2d) -> None:
    """``TwistConv2d``, step by step as the layer computes it (``onebit.nn.twist``).

    Per pass: the quantized input, its channels rolled by one group (``permute``), the
    grouped 3x3 conv (packed when the input quantizer is a sign and the weights binary, else
    the float conv of the weight levels, then the scale), the two twist convs ``K_x``, ``K_y``
    as float convs of the +-1 input (small integer kernels: exact), and
    ``y + X * gx + Y * gy``. When the layer iterates: ``z = x + f(x) / n``, ``n - 1`` times
    ``z = z + f(z) / n``, then ``z - x``.
    """
    binary = is_sign_quantizer(m.input_quantizer) and binary_weight(m.weight_quantizer)
    if not binary:
        note_fallback(low, node, m)
    groups = int(m.groups)
    conv = conv_attrs(m, 3, pair(m.stride), 1, 1, 0.0)
    float_conv = {**conv, "explicit_padding": [1, 1, 1, 1], "padding_mode": "zeros"}
    with torch.no_grad():
        twists = [float_copy(k) for k in m.twist_kernels()] if m.twist else []
    packed_weight, scale = binary_weights(m) if binary else (None, None)
    layer_tensors = None if binary else {k: v for k, v in float_layer_tensors(m).items() if v is not None}

    def step(v: str, k: int) -> str:
        base = f"{node.name}_step{k}" if m.iterates else node.name
        if m.input_quantizer is not None:
            v = quantize(low, node, m.input_quantizer, v)
        if m.permute:
            v = low.emit(f"{base}_roll", "roll", [v], {"shifts": int(m.in_channels // groups), "dim": 1})
        if binary:
            xp = low.emit(f"{v}_packed", "pack", [v], {"padding": [1, 1], "pad_value": 0.0, "groups": groups})
            y = low.emit(base, "binary_conv2d", [xp], conv, {"weight": packed_weight, "scale": scale}, node.target)
        else:
            y = low.emit(base, "qconv2d", [v], float_conv, layer_tensors, node.target)
        if not twists:
            return y
        gx, gy = (
            low.emit(f"{base}_{axis}", "conv2d", [v], float_conv, {"weight": kernel}, node.target)
            for axis, kernel in zip("xy", twists)
        )
        return low.emit(f"{base}_twist", "twist_mix", [y, gx, gy], module=node.target)

    x = low.arg(node, node.args[0])
    if not m.iterates:
        low.value[node] = step(x, 0)
        return
    n = float(m.iters)
    z = x
    for k in range(m.iters):
        f = low.emit(f"{node.name}_step{k}_div", "div", [step(z, k)], {"other": n})
        z = low.emit(f"{node.name}_iter{k}", "add", [z, f], {"other": 0.0, "alpha": 1.0}, module=node.target)
    low.value[node] = low.emit(f"{node.name}_out", "add", [z, x], {"other": 0.0, "alpha": -1.0}, module=node.target)


# -- bit planes ---------------------------------------------------------------------


def emit_bitplane(low: Lowering, node: fx.Node, m: nn.Module) -> None:
    """A k-bit / ternary layer -> one ``bitplane_conv2d`` (a linear layer as a 1 x 1 conv of [N, F])."""
    act, wcode = bitplane_codes(low, m, node)
    x = low.arg(node, node.args[0])
    levels, scale = weight_factors(m)
    if isinstance(m, QConv2d):
        pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
        conv = conv_attrs(m, m.kernel_size, m.stride, (pad[2], pad[0]), m.dilation, 0.0)
        groups = int(m.groups)
    else:
        levels = levels[:, :, None, None]
        conv = {
            "in_channels": int(m.in_features),
            "out_channels": int(m.out_features),
            "kernel_size": [1, 1],
            "stride": [1, 1],
            "padding": [0, 0],
            "dilation": [1, 1],
            "groups": 1,
            "pad_value": 0.0,
        }
        groups = 1
    planes = bitplanes.stack_weight_planes(levels.contiguous(), wcode, 1, groups)
    q = m.input_quantizer
    attrs = {
        **conv,
        "quantizer": input_kind(q),
        "clip": clip(q),
        "act_kind": act.kind,
        "act_bits": act.bits,
        "weight_kind": wcode.kind,
        "weight_bits": wcode.bits,
        "input_divisor": integer_divisor(q),
    }
    tensors = {
        "weight": ops.pack_weights(planes, groups),
        "plane_sums": wcode.split(levels).sum(dim=(2, 3, 4)).to(torch.int32).contiguous(),
        "scale": scale,
        "bias": float_copy(m.bias),
    }
    low.value[node] = low.emit(node.name, "bitplane_conv2d", [x], attrs, tensors, node.target)
    if isinstance(m, QLinear):
        low.nodes[-1]["linear"] = True  # a 2-d output, contiguous as torch's linear gives it


# -- linear layers ------------------------------------------------------------------


def emit_qlinear(low: Lowering, node: fx.Node, m: QLinear) -> None:
    """A QLinear: ``pack_features`` + ``binary_linear`` when binary on ``[N, features]``; else as the
    model runs it: quantized input, ``qlinear`` of the weight levels."""
    binary = binary_input(low, node, m) and binary_weight(m.weight_quantizer)
    in_shape = low.shape(node.args[0])
    why = None
    if binary and (in_shape is None or len(in_shape) != 2):
        binary = False  # [N, ..., features]: run as torch runs it
        why = f"its input has rank {len(in_shape) if in_shape else '?'} (packed linear layers take [N, features])"
    if binary:
        _emit_binary_linear(low, node, m)
        return
    note_fallback(low, node, m, why)
    x, divisor = layer_input(low, node, m, low.arg(node, node.args[0]))
    attrs = {"in_features": int(m.in_features), "out_features": int(m.out_features), "input_divisor": divisor}
    low.value[node] = low.emit(node.name, "qlinear", [x], attrs, float_layer_tensors(m), node.target)


def _emit_binary_linear(low: Lowering, node: fx.Node, m: QLinear) -> None:
    xp = packed_features(low, node, m)
    wp, scale = binary_weights(m)
    attrs = {"in_features": int(m.in_features), "out_features": int(m.out_features)}
    low.value[node] = low.emit(
        node.name, "binary_linear", [xp], attrs, {"weight": wp, "scale": scale, "bias": float_copy(m.bias)}, node.target
    )


def emit_ternary_linear(low: Lowering, node: fx.Node, m: QLinear) -> None:
    """A ``BitLinear`` (or a ``QLinear`` with ``absmax8`` input and ``ternary`` weights) -> one
    ``ternary_linear`` op: [RMSNorm], int8 tokens, 2-bit weights, exact integer sums."""
    f = int(m.in_features)
    if f > 1 << 17:
        raise low.unsupported(node, f"in_features={f} > 131072: its integer sums are not exact in float32")
    x = low.arg(node, node.args[0])
    levels, gamma = weight_factors(m)
    norm = isinstance(m, BitLinear) and m.norm
    attrs = {
        "in_features": f,
        "out_features": int(m.out_features),
        "norm": bool(norm),
        "eps": float(m.eps) if isinstance(m, BitLinear) else 1e-5,
    }
    tensors = {"weight": ops.pack_ternary_weights(levels.contiguous()), "scale": gamma, "bias": float_copy(m.bias)}
    low.value[node] = low.emit(node.name, "ternary_linear", [x], attrs, tensors, node.target)


#: the quantized layers, in order: the first ``(predicate(low, node, m), emitter)`` that holds lowers ``m``
QUANTIZED = [
    (lambda low, node, m: is_int8_layer(m), emit_int8_layer),
    (
        lambda low, node, m: isinstance(m, (QConv2d, QLinear)) and bitplane_codes(low, m, node) is not None,
        emit_bitplane,
    ),
    (lambda low, node, m: binary_conv_kind(low, m, node) == "packed", emit_binary_conv),
    (lambda low, node, m: isinstance(m, QConv2d), emit_float_qconv),
    (lambda low, node, m: is_ternary_linear(m), emit_ternary_linear),
    (lambda low, node, m: isinstance(m, QLinear), emit_qlinear),
    (lambda low, node, m: isinstance(m, QConv1d), emit_qconv1d),
    (lambda low, node, m: isinstance(m, TwistConv2d), emit_twist),
]
