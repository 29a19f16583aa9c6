"""Pattern matching on the traced graph: which layers are binary, which conv kind runs them, the
layers the bit-plane conv runs.

Every function reads the lowering state (:class:`~onebit.engine.lowering.state.Lowering`) and
emits no node; :func:`note_fallback` records why a binary layer runs in float.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from onebit import quant
from onebit.engine import bitplanes
from onebit.engine.lowering.state import Lowering
from onebit.nn import functional as QF
from onebit.nn.layers import QConv2d, QLinear


def is_sign_quantizer(q: Any) -> bool:
    """True for quantizers whose forward is exactly :func:`onebit.math.sign` (:func:`onebit.quant.is_sign`)."""
    return quant.is_sign(q)


def binary_weight(q: Any) -> bool:
    """The weight quantizer gives +-1 levels (any per-channel scale): the weights are bits."""
    return quant.has_sign_levels(q)


def binary_input(low: Lowering, node: fx.Node | None, m: nn.Module) -> bool:
    """The layer's quantized input is +-1: a sign input quantizer, or none (the "NoAct" pattern)
    on a value that is the output of a sign (e.g. a ``QActivation('ste_sign')``)."""
    if is_sign_quantizer(m.input_quantizer):
        return True
    if m.input_quantizer is not None or node is None or not isinstance(node.args[0], fx.Node):
        return False
    return low.value.get(node.args[0]) in low.sign_source


def binary_conv_kind(low: Lowering, m: nn.Module, node: fx.Node) -> str | None:
    """'packed' for a binary QConv2d the kernels run, 'float' for one that runs simulated, None otherwise."""
    if not isinstance(m, QConv2d):
        return None
    if not binary_input(low, node, m) or not binary_weight(m.weight_quantizer):
        return None
    if m.padding_mode != "zeros":
        return "float"
    if m.padding == "valid":
        return "packed"
    pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
    if pad[0] != pad[1] or pad[2] != pad[3]:
        return "float"
    return "packed"


def conv_layout(m: nn.Module) -> tuple:
    """The packed input layout a binary conv reads: ``((pad_h, pad_w), pad_value, groups, in_channels)``."""
    pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
    return ((pad[2], pad[0]), float(m.pad_value), int(m.groups), int(m.in_channels))


def is_ternary_linear(m: nn.Module) -> bool:
    """A linear layer the ``ternary_linear`` kernels run: 8-bit ``absmax`` input integers
    (``absmax8``), ``ternary`` weight levels (:class:`onebit.quant.IntegerCode`)."""
    return (
        isinstance(m, QLinear)
        and quant.integer_code_of(m.input_quantizer) == quant.IntegerCode.absmax(8)
        and quant.factor_code_of(m.weight_quantizer) == quant.IntegerCode.ternary()
    )


def bitplane_codes(low: Lowering, m: nn.Module, node: fx.Node) -> tuple | None:
    """(input code, weight code) of a k-bit or ternary layer the bit-plane conv runs, else None:
    integer inputs (``dorefa``, ``dorefa_sym``) and integer weight levels (signs, ternary,
    ``dorefa_weight``), zero padding on both sides, exact integer sums."""
    act, weight = bitplanes.input_code(m.input_quantizer), bitplanes.weight_code(m.weight_quantizer)
    if act is None or weight is None:
        return None
    if isinstance(m, QConv2d):
        if m.padding_mode != "zeros" or float(m.pad_value) != 0.0:
            return None
        pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
        if pad[0] != pad[1] or pad[2] != pad[3]:
            return None
        taps = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    else:
        in_shape = low.shape(node.args[0])
        if in_shape is None or len(in_shape) != 2:
            return None
        taps = m.in_features
    largest = max(abs(v) for v in act.levels) * max(abs(v) for v in weight.levels)
    return (act, weight) if taps * largest < 1 << 24 else None  # exact in float32


def note_fallback(low: Lowering, node: fx.Node, m: nn.Module, why: str | None = None) -> None:
    """Record a layer with binary weights or a binary input that runs in float, and why."""
    binary_in, binary_w = binary_input(low, node, m), binary_weight(m.weight_quantizer)
    if not (binary_in or binary_w):
        return
    if why is None:
        if not binary_in:
            q = m.input_quantizer
            why = (
                "its input is float (input_quantizer=None on a value that is not the output of a sign)"
                if q is None
                else f"its input quantizer {type(q).__name__} is not a sign" + _void(q)
            )
        elif not binary_w:
            q = m.weight_quantizer
            why = (
                "its weights are float (weight_quantizer=None)"
                if q is None
                else f"its weight quantizer {type(q).__name__} does not give +-1 levels" + _void(q)
            )
        else:
            why = "the packed kernels do not run this configuration"
    low.fallbacks.append({"module": str(node.target), "reason": why})


def _void(q: Any) -> str:
    """`` (why)`` when ``q`` inherits a sign declaration that no longer holds
    (:func:`onebit.quant.void_declaration`)."""
    why = quant.void_declaration(q)
    return f" ({why})" if why else ""
