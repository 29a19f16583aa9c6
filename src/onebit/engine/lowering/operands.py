"""The operands of quantized layers: their weights as levels, bits and scales, their inputs
quantized or packed."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from onebit import quant
from onebit.engine import ops
from onebit.engine.lowering.attrs import float_copy
from onebit.engine.lowering.patterns import binary_weight, is_sign_quantizer
from onebit.engine.lowering.state import Lowering
from onebit.nn import functional as QF
from onebit.nn.layers import QLinear

# -- weights ------------------------------------------------------------------


def weight_factors(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(levels, scale)`` of the layer's weight quantizer (:meth:`onebit.quant.Quantizer.factor`),
    computed as the layer computes them; a 1-d conv's levels as the ``1 x k`` kernel it runs as."""
    with torch.no_grad():
        levels, scale = QF.weight_factors(m.weight.detach().to(torch.float32), m.weight_quantizer)
    if levels.dim() == 3:
        levels = levels.unsqueeze(2)
    return levels.detach(), None if scale is None else float_copy(scale.reshape(-1))


def binary_weights(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(packed sign weights, per-output-channel magnitude scale or None)."""
    levels, scale = weight_factors(m)
    return ops.pack_weights(levels.contiguous(), getattr(m, "groups", 1)), scale


def float_layer_tensors(m: nn.Module) -> dict[str, torch.Tensor | None]:
    """The tensors of a quantized layer run in float: its weight levels (as bits when they are
    +-1: a file stores binary weights as bits whatever the layer's input), scale and bias."""
    if binary_weight(m.weight_quantizer):
        bits, scale = binary_weights(m)
        return {"weight_bits": bits, "scale": scale, "bias": float_copy(m.bias)}
    levels, scale = weight_factors(m)  # float weights (no quantizer) are their own levels
    return {"weight": float_copy(levels), "scale": scale, "bias": float_copy(m.bias)}


# -- inputs -------------------------------------------------------------------


#: the engine op that computes an input quantizer of each integer code (:class:`onebit.quant.IntegerCode`)
INTEGER_INPUT_OPS = {"unsigned": "dorefa", "symmetric": "dorefa_sym"}


def input_code(q: Any) -> quant.IntegerCode | None:
    """The integer code of input quantizer ``q`` (:func:`onebit.quant.integer_code_of`) when the
    engine has an op for it (:data:`INTEGER_INPUT_OPS`), else None."""
    code = quant.integer_code_of(q)
    return code if code is not None and code.kind in INTEGER_INPUT_OPS else None


def input_kind(q: Any) -> str | None:
    """The engine op that computes input quantizer ``q`` exactly: ``"sign"`` (:func:`onebit.quant.is_sign`),
    ``"dorefa"`` or ``"dorefa_sym"`` (its :func:`input_code`); None when the engine has none."""
    if is_sign_quantizer(q):
        return "sign"
    code = input_code(q)
    return None if code is None else INTEGER_INPUT_OPS[code.kind]


def integer_divisor(q: Any) -> float | None:
    """The divisor ``s`` of an input quantizer's ``integer_factor`` (one number: ``dorefa``,
    ``dorefa_sym``), as the float32 value the layer divides by; None for any other quantizer."""
    if input_kind(q) not in ("dorefa", "dorefa_sym"):
        return None
    with torch.no_grad():
        _, s = q.integer_factor(torch.zeros(1))
    return float(s)


def int8_divisor(q: Any) -> float | None:
    """The float32 divisor ``s`` of an ``int8`` input quantizer (its ``divisor()``), None for any other."""
    code = quant.integer_code_of(q)
    if code is None or code.kind != "signed" or code.bits != 8 or not callable(getattr(q, "divisor", None)):
        return None
    with torch.no_grad():
        return float(q.divisor().to(torch.float32))


def clip(q: Any) -> float:
    """A ``symmetric`` input code's clip as a float (1.0, unused, for ``unsigned``)."""
    code = input_code(q)
    return float(code.clip) if code is not None and code.kind == "symmetric" else 1.0


def bits(q: Any) -> int:
    """The bit width of an integer input code (``dorefa``, ``dorefa_sym``)."""
    return input_code(q).bits


def quantize(low: Lowering, node: fx.Node, q: Any, x: str) -> str:
    """Emit quantizer ``q`` applied to value ``x`` (``sign``, ``dorefa``, ``dorefa_sym``)."""
    kind = input_kind(q)
    if kind == "sign":
        out = low.emit(f"{node.name}_sign", "sign", [x])
        low.sign_source[out] = low.sign_source.get(x, x)  # sign(sign(x)) = sign(x)
        return out
    if kind == "dorefa":
        return low.emit(f"{node.name}_dorefa", "dorefa", [x], {"bits": bits(q)})
    if kind == "dorefa_sym":
        return low.emit(f"{node.name}_dorefa_sym", "dorefa_sym", [x], {"bits": bits(q), "clip": clip(q)})
    divisor = int8_divisor(q)
    if divisor is not None:
        return low.emit(f"{node.name}_int8", "int8_quantize", [x], {"divisor": divisor})
    why = quant.void_declaration(q)
    raise low.unsupported(node, f"quantizer {type(q).__name__} has no engine op" + (f" ({why})" if why else ""))


#: ops that commute with the sign: ``op(sign(x)) == sign(op(x))`` bit for bit (a flatten or reshape
#: moves values; a max is non-decreasing, so the max of signs is the sign of the max, NaN included:
#: torch's max pooling gives NaN, whose sign is +1, as is every sign of a window holding it)
SIGN_COMMUTING = ("flatten", "reshape", "max_pool2d", "adaptive_max_pool2d")


def carry_sign(low: Lowering, value: str) -> None:
    """When ``value`` is the last node emitted, an op of :data:`SIGN_COMMUTING` on a sign's output
    ``sign(x)``: ``value`` is a sign too, of the same op applied to ``x`` (emitted beside it), so that
    a layer without input quantizer reading it is binary (the NoAct pattern through a flatten, a
    reshape or a max pool) and packs ``op(x)``. The walk keeps only the nodes an output needs."""
    node = low.nodes[-1] if low.nodes else None
    if node is None or node["name"] != value or node["op"] not in SIGN_COMMUTING or len(node["inputs"]) != 1:
        return
    source = low.sign_source.get(node["inputs"][0])
    if source is None:
        return
    twin = low.emit(f"{value}_of_{source}", node["op"], [source], dict(node["attrs"]), module=node.get("module"))
    low.sign_source[value] = twin


def layer_input(low: Lowering, node: fx.Node, m: nn.Module, x: str) -> tuple[str, float | None]:
    """A float-run layer's quantized input as the layer computes with it (see
    :func:`onebit.nn.functional.qconv`): the integers and their divisor when the input
    quantizer factors them out (``dorefa``, ``dorefa_sym``, ``int8``; zero padding for a conv), else the
    quantizer's output and None."""
    q = m.input_quantizer
    if q is None:
        return x, None
    step_divisor = int8_divisor(q)
    if step_divisor is not None and (isinstance(m, QLinear) or float(m.pad_value) == 0.0):
        return low.emit(f"{node.name}_int", "int8_integers", [x], {"divisor": step_divisor}), step_divisor
    divisor = integer_divisor(q)
    if divisor is None or (not isinstance(m, QLinear) and float(m.pad_value) != 0.0):
        return quantize(low, node, q, x), None
    attrs = {"kind": input_kind(q), "bits": bits(q), "clip": clip(q)}
    return low.emit(f"{node.name}_int", "quantize_int", [x], attrs), divisor


def packed_input(low: Lowering, node: fx.Node, src: Any, layout: tuple) -> str:
    """``src`` packed in a binary conv's input ``layout`` (:func:`~.patterns.conv_layout`): one
    ``pack`` per float value and layout."""
    name = low.arg(node, src)
    name = low.sign_source.get(name, name)  # pack(sign(x)) == pack(x): the same bits
    key = (name, layout)
    if key not in low.packed:
        padding, pad_value, groups, _ = layout
        low.packed[key] = low.emit(
            f"{name}_packed", "pack", [name], {"padding": list(padding), "pad_value": pad_value, "groups": groups}
        )
    return low.packed[key]


def packed_features(low: Lowering, node: fx.Node, m: QLinear) -> str:
    """A binary linear layer's ``[N, features]`` input packed (``pack_features``), once per value."""
    x = low.arg(node, node.args[0])
    x = low.sign_source.get(x, x)
    key = (x, ("features", int(m.in_features)))
    if key not in low.packed:
        low.packed[key] = low.emit(
            f"{x}_packed", "pack_features", [x], {"features": int(m.in_features)}, module=node.target
        )
    return low.packed[key]
