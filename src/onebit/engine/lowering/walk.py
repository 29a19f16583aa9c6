"""The walk over the traced graph: each fx node dispatched to the emitter of its quantized layer,
float module, function or tensor method; then the graph's input, live nodes and outputs."""

from __future__ import annotations

from torch import fx, nn

from onebit.engine.lowering.floats import FUNCTIONS, METHODS, emit_module
from onebit.engine.lowering.operands import carry_sign
from onebit.engine.lowering.quantized import QUANTIZED
from onebit.engine.lowering.state import Lowering, UnsupportedModelError
from onebit.layerkinds import IDENTITIES
from onebit.nn.layers import QuantizedLayer


def lower_call_module(low: Lowering, node: fx.Node) -> None:
    """A module call: the first :data:`~.quantized.QUANTIZED` emitter that takes the layer, an
    eval-mode identity, or a float module (:func:`~.floats.emit_module`)."""
    m = low.modules[node.target]
    if len(node.args) != 1 or node.kwargs:
        raise low.unsupported(node, "expected one positional tensor argument")
    for applies, emitter in QUANTIZED:
        if applies(low, node, m):
            emitter(low, node, m)
            return
    if isinstance(m, QuantizedLayer):
        raise low.unsupported(node, "only 1-d and 2-d convolutions and linear layers are supported")
    if type(m) in IDENTITIES:
        low.value[node] = low.arg(node, node.args[0])
        return
    low.value[node] = emit_module(low, node, m, low.arg(node, node.args[0]))
    carry_sign(low, low.value[node])


def lower_call(low: Lowering, node: fx.Node, table: dict) -> None:
    """A function call or a tensor method: its emitter in ``table`` (by target); a node that
    computes no tensor (``x.size()`` for a reshape) gets no value."""
    emitter = table.get(node.target)
    if emitter is None:
        raise low.unsupported(node)
    value = emitter(low, node)
    if value is not None:
        low.value[node] = value
        carry_sign(low, value)


def live_nodes(nodes: list[dict], outputs: list[str]) -> list[dict]:
    """The nodes an output depends on, in order (every op is pure: e.g. a sign whose only
    reader packed its source instead is dropped)."""
    live = set(outputs)
    for node in reversed(nodes):
        if node["name"] in live:
            live.update(node["inputs"])
    return [node for node in nodes if node["name"] in live]


def features_last(low: Lowering, placeholder: fx.Node) -> bool:
    """The model's input is ``[N, ..., F]``, read only by linear layers (along its last dimension):
    its dimensions but the last are free, as they are for the model."""
    users = list(placeholder.users)
    return bool(users) and all(u.op == "call_module" and isinstance(low.modules[u.target], nn.Linear) for u in users)


def walk(low: Lowering) -> dict:
    """Lower every node of ``low.gm`` in order; returns the graph (input, nodes, outputs, fallbacks)."""
    graph_input = None
    output = None
    for node in low.gm.graph.nodes:
        if node.op == "placeholder":
            if graph_input is not None:
                raise UnsupportedModelError("the packed engine supports models with one tensor input")
            graph_input = node
            low.value[node] = "input"
        elif node.op == "call_module":
            lower_call_module(low, node)
        elif node.op == "call_function":
            lower_call(low, node, FUNCTIONS)
        elif node.op == "call_method":
            lower_call(low, node, METHODS)
        elif node.op == "output":
            output = node.args[0]
        else:
            raise low.unsupported(node, "model attributes used as tensors in forward")
    if isinstance(output, fx.Node):
        outputs, kind = [low.arg(output, output)], "tensor"
    elif isinstance(output, (tuple, list)) and output and all(isinstance(o, fx.Node) for o in output):
        # fx hands a returned list back as its immutable_list (a list subclass)
        outputs, kind = [low.arg(o, o) for o in output], "list" if isinstance(output, list) else "tuple"
    else:
        raise UnsupportedModelError("the model's output must be a tensor or a tuple/list of tensors")
    shape = tuple(low.example.shape)
    spec = {
        "name": "input",
        "rank": len(shape),
        "channels": int(shape[1]),
        "dtype": "float32",
        "example_shape": list(shape),
    }
    if len(shape) > 2 and graph_input is not None and features_last(low, graph_input):
        spec.update(channels=int(shape[-1]), channel_dim=-1)
    return {
        "input": spec,
        "nodes": live_nodes(low.nodes, outputs),
        "outputs": outputs,
        "output_kind": kind,
        "fallbacks": low.fallbacks,
    }
