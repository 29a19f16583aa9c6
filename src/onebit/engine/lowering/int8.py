"""The emitters of int8 layers: a ``QConv2d`` / ``QLinear`` with an ``int8`` input quantizer
(:class:`onebit.quant.Int8`, one divisor ``s``) and ``int8_weight`` levels becomes one
``int8_conv2d`` / ``int8_linear`` (:mod:`onebit.engine.graph.int8`) on its int8 weights."""

from __future__ import annotations

import torch
from torch import fx, nn

from onebit import quant
from onebit.engine.lowering.attrs import float_copy, pair
from onebit.engine.lowering.operands import int8_divisor, weight_factors
from onebit.engine.lowering.state import Lowering
from onebit.nn import functional as QF
from onebit.nn.layers import QConv2d, QLinear


def _int8_levels(m: nn.Module) -> bool:
    code = quant.factor_code_of(m.weight_quantizer)
    return code is not None and code.kind == "signed" and code.bits == 8


def is_int8_layer(m: nn.Module) -> bool:
    """An int8 x int8 layer the ``int8_*`` ops run: int8 input and weight levels, and for a conv
    zero padding, the same on both sides (after quantization: ``pad_value`` 0)."""
    if not isinstance(m, (QConv2d, QLinear)) or int8_divisor(m.input_quantizer) is None or not _int8_levels(m):
        return False
    if isinstance(m, QLinear):
        return True
    pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
    return m.padding_mode == "zeros" and float(m.pad_value) == 0.0 and pad[0] == pad[1] and pad[2] == pad[3]


def int8_tensors(m: nn.Module) -> dict[str, torch.Tensor | None]:
    """The layer's int8 weight levels, float32 scale and bias."""
    levels, scale = weight_factors(m)
    weight = levels.to(torch.int8).contiguous()
    if not torch.equal(weight.to(levels.dtype), levels):
        raise ValueError(f"{type(m).__name__}: int8 weight levels are not integers in -127 .. 127")
    return {"weight": weight, "scale": scale, "bias": float_copy(m.bias)}


def emit_int8_layer(low: Lowering, node: fx.Node, m: nn.Module) -> None:
    """An int8 ``QConv2d`` -> ``int8_conv2d``, an int8 ``QLinear`` -> ``int8_linear``."""
    x = low.arg(node, node.args[0])
    divisor = int8_divisor(m.input_quantizer)
    if isinstance(m, QLinear):
        attrs = {"in_features": int(m.in_features), "out_features": int(m.out_features), "divisor": divisor}
        low.value[node] = low.emit(node.name, "int8_linear", [x], attrs, int8_tensors(m), node.target)
        return
    pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
    attrs = {
        "in_channels": int(m.in_channels),
        "out_channels": int(m.out_channels),
        "kernel_size": pair(m.kernel_size),
        "stride": pair(m.stride),
        "padding": [pad[2], pad[0]],
        "dilation": pair(m.dilation),
        "groups": int(m.groups),
        "divisor": divisor,
    }
    low.value[node] = low.emit(node.name, "int8_conv2d", [x], attrs, int8_tensors(m), node.target)
