"""Pattern matching on the traced graph: which layers are binary, which conv kind runs them, the
BatchNorm + sign chains that become integer thresholds, the layers the bit-plane conv runs.

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
from onebit.nn.layers import QActivation, QConv2d, QLinear
from onebit.sign_chain import SignChain, find_sign_chain
from onebit.tracing import is_sign_threshold


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
    return node.args[0] in low.packed_signs or low.value.get(node.args[0]) in low.sign_source


def binary_conv_kind(
    low: Lowering, m: nn.Module, node: fx.Node | None = None, input_binary: bool | None = None
) -> str | None:
    """'packed' for a binary QConv2d the kernels run, 'float' for one that runs simulated, None otherwise."""
    if not isinstance(m, QConv2d):
        return None
    if input_binary is None:
        input_binary = binary_input(low, node, m)
    if not input_binary or not binary_weight(m.weight_quantizer):
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


def is_binary_linear(m: nn.Module) -> bool:
    """A QLinear with a sign input quantizer and +-1 weight levels."""
    return isinstance(m, QLinear) and is_sign_quantizer(m.input_quantizer) and binary_weight(m.weight_quantizer)


def is_ternary_linear(m: nn.Module) -> bool:
    """A linear layer the ``ternary_linear`` kernels run: 8-bit ``absmax`` input integers
    (``absmax8``), ``ternary`` weight levels (:class:`onebit.quant.IntegerCode`)."""
    return (
        isinstance(m, QLinear)
        and quant.integer_code_of(m.input_quantizer) == quant.IntegerCode.absmax(8)
        and quant.factor_code_of(m.weight_quantizer) == quant.IntegerCode.ternary()
    )


def _thresholds_layer(bn: nn.Module, m: nn.Module, batchnorm: type, channels: int) -> bool:
    """``bn`` after layer ``m`` becomes integer thresholds: a BatchNorm of type ``batchnorm`` with
    running statistics on ``channels``, or a canonized SignThreshold on the exact accumulator
    (``channels`` thresholds, ``m`` without bias and with sign weights)."""
    if is_sign_threshold(bn):
        return bn.threshold.numel() == channels and m.bias is None and is_sign_quantizer(m.weight_quantizer)
    return type(bn) is batchnorm and bn.running_mean is not None and bn.num_features == channels


def _is_sign_activation(low: Lowering, node: fx.Node, src: fx.Node) -> bool:
    """``node`` is a module applying a sign to ``src`` alone (a ``QActivation``, or a sign quantizer)."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or node.args[0] is not src:
        return False
    m = low.modules[node.target]
    return is_sign_quantizer(m.quantizer if isinstance(m, QActivation) else m)


class _TracedView:
    """The traced graph as a :class:`~onebit.sign_chain.ChainView`: between a layer and its
    BatchNorm one ``nn.MaxPool2d`` (exactly that class, without indices, read once); nothing after
    the BatchNorm (eval-mode identities are dropped before lowering)."""

    def __init__(self, low: Lowering) -> None:
        self.low = low

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        return node.all_input_nodes

    def users(self, node: fx.Node) -> list[fx.Node]:
        return list(node.users)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.low.modules[node.target] if node.op == "call_module" else None

    def reads_alone(self, node: fx.Node, value: fx.Node) -> bool:
        return len(node.args) == 1 and not node.kwargs and node.args[0] is value

    def crosses_before(self, node: fx.Node) -> bool:
        m = self.module(node)
        return type(m) is nn.MaxPool2d and not m.return_indices and len(node.users) == 1

    def crosses_after(self, node: fx.Node) -> bool:
        return False

    def describe(self, node: fx.Node) -> str:
        return node.format_node()


def _sign_chain(
    low: Lowering, node: fx.Node, m: nn.Module, bn_node: fx.Node, batchnorm: type, channels: int
) -> SignChain | None:
    """The chain layer ``m`` (``node``) -> [max pool] -> ``bn_node`` -> readers that take the sign
    (:func:`onebit.sign_chain.find_sign_chain`), when ``bn_node`` becomes integer thresholds after
    ``m`` (:func:`_thresholds_layer`); else None."""
    if bn_node.op != "call_module" or len(bn_node.args) != 1:
        return None
    if not _thresholds_layer(low.modules[bn_node.target], m, batchnorm, channels):
        return None
    chain = find_sign_chain(_TracedView(low), bn_node)
    return chain if chain.problem is None and chain.source is node else None


def _consumers_layout(low: Lowering, chain: SignChain) -> tuple | None:
    """(consumer layout, sign node | None) when the BatchNorm's readers are binary convs with one
    input layout, or one sign activation whose readers are binary-weight convs without input
    quantizer (the NoAct pattern) with one layout."""
    bn_node = chain.batchnorm
    consumers, sign_node = list(chain.readers), None
    if len(consumers) == 1 and _is_sign_activation(low, consumers[0], bn_node):
        sign_node = consumers[0]
        consumers = list(sign_node.users)
    if not consumers:
        return None
    source = sign_node or bn_node
    layouts = set()
    for c in consumers:
        if c.op != "call_module" or len(c.args) != 1 or c.kwargs or c.args[0] is not source:
            return None
        cm = low.modules[c.target]
        noact = sign_node is not None and getattr(cm, "input_quantizer", 0) is None
        if binary_conv_kind(low, cm, input_binary=True if noact else None) != "packed":
            return None
        layouts.add(conv_layout(cm))
    if len(layouts) != 1:
        return None
    return layouts.pop(), sign_node


def threshold_chain(low: Lowering, node: fx.Node, m: QConv2d) -> tuple | None:
    """(pool node | None, bn node, consumer layout, sign node | None) when conv -> [maxpool] -> BN ->
    binary convs only, or conv -> [maxpool] -> BN -> one sign (``QActivation``) -> convs without
    input quantizer and with binary weights only (the NoAct pattern); each node the only reader
    of the one before it up to the BatchNorm."""
    users = list(node.users)
    if len(users) != 1:
        return None
    bn_node = users[0]
    if _TracedView(low).crosses_before(bn_node):
        bn_node = next(iter(bn_node.users))
    chain = _sign_chain(low, node, m, bn_node, nn.BatchNorm2d, m.out_channels)
    consumers = None if chain is None else _consumers_layout(low, chain)
    if consumers is None:
        return None
    layout, sign_node = consumers
    pool = chain.before[0] if chain.before else None
    return pool, bn_node, layout, sign_node


def linear_threshold_chain(low: Lowering, node: fx.Node, m: QLinear) -> fx.Node | None:
    """The BatchNorm1d node when binary linear -> BatchNorm1d -> only binary linear layers."""
    shape = low.shape(node)
    if len(node.users) != 1 or shape is None or len(shape) != 2:
        return None
    bn_node = next(iter(node.users))
    chain = _sign_chain(low, node, m, bn_node, nn.BatchNorm1d, m.out_features)
    if chain is None or chain.before:
        return None
    if not all(is_binary_linear(low.modules[c.target]) for c in chain.readers):
        return None
    return bn_node


def single_batchnorm_user(low: Lowering, node: fx.Node, channels: int) -> fx.Node | None:
    """The BatchNorm2d node (with running statistics, on ``channels``) that alone reads ``node``."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or len(user.args) != 1 or user.kwargs or user.args[0] is not node:
        return None
    bn = low.modules[user.target]
    if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn.num_features != channels:
        return None
    return user


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
