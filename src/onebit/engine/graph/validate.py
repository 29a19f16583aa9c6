"""``validate``: a graph and its tensors checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from onebit.engine.geometry import check_direction, used_bits
from onebit.engine.graph.ops import OPS
from onebit.engine.graph.ranks import expected_layout, layouts_match, output_rank, produced_layout
from onebit.engine.graph.schema import (
    FLOAT,
    PACKED,
    GraphError,
    OpSpec,
    TensorSpec,
    checked_attrs,
    choice,
    compact_shape,
    integer,
)


def validate(graph: Any, tensors: dict[str, torch.Tensor], *, compact: bool = False) -> None:
    """Check a graph and its tensors; raise :class:`GraphError` naming the first problem.

    ``compact=True`` checks binary weights in their file form (uint8 bits), else in
    their in-memory kernel form (int64 words). Besides names, references, kinds, attributes
    and tensors, the ranks of float values are followed from the input's: an op given a value
    of a rank it cannot take (a ``dim`` out of range, a 2-d value into a conv) is refused
    here, naming the node, instead of failing when the model runs. ``meta`` tensors (dtype
    and shape, no data) get every check but those of their values.
    """
    inp = _checked_header(graph)
    flow = _Flow(kinds={inp["name"]: FLOAT}, ranks={inp["name"]: inp["rank"]})
    used_tensors: set[str] = set()
    nodes = graph["nodes"]
    if not isinstance(nodes, list):
        raise GraphError("graph nodes must be a list")
    for index, node in enumerate(nodes):
        name, op, where = _checked_identity(node, index, flow.kinds)
        spec = OPS[op]
        inputs = node.get("inputs")
        attrs = _checked_inputs(node, spec, inputs, flow, where)
        for flag in ("conv1d", "linear"):  # the layout of the output (see PackedModel)
            if not isinstance(node.get(flag, False), bool):
                raise GraphError(f"{where}: {flag!r} must be true or false")
        used_tensors |= _checked_tensors(node, spec, attrs, tensors, compact, where)
        try:
            flow.ranks[name] = output_rank(op, attrs, [flow.ranks.get(ref) for ref in inputs])
        except GraphError as error:
            raise GraphError(f"{where}: {error}") from None
        flow.kinds[name] = spec.output
        flow.producers[name] = {"op": op, "attrs": attrs}
    _check_outputs(graph, inp, flow.kinds)
    unused = set(tensors) - used_tensors
    if unused:
        raise GraphError(f"tensors not used by the graph: {sorted(unused)[:5]}")
    fallbacks = graph.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(
        isinstance(f, dict) and set(f) == {"module", "reason"} and all(isinstance(v, str) for v in f.values())
        for f in fallbacks
    ):
        raise GraphError("graph fallbacks must be a list of {module, reason} strings")


@dataclass
class _Flow:
    """What is known of the values defined so far: kind, rank of floats, producer of packed ones."""

    kinds: dict[str, str]
    ranks: dict[str, int | None]
    producers: dict[str, dict] = field(default_factory=dict)


def _checked_header(graph: Any) -> dict:
    """The graph's input entry, after checking the graph's top-level entries."""
    if not isinstance(graph, dict):
        raise GraphError("the graph must be a JSON object")
    for key in ("input", "nodes", "outputs"):
        if key not in graph:
            raise GraphError(f"the graph has no {key!r} entry")
    inp = graph["input"]
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
        raise GraphError("graph input must be an object with a name")
    try:
        integer(2, 8)(inp.get("rank"))  # batched, with a channel dimension
        integer(1)(inp.get("channels"))
        choice(1, -1)(inp.get("channel_dim", 1))
    except GraphError as error:
        raise GraphError(f"graph input: {error}") from None
    if inp.get("dtype") != "float32":
        raise GraphError(f"graph input dtype must be float32, got {inp.get('dtype')!r}")
    if graph.get("output_kind", "tensor") not in ("tensor", "tuple", "list"):
        raise GraphError(f"unknown output_kind {graph.get('output_kind')!r}")
    return inp


def _checked_identity(node: Any, index: int, kinds: dict[str, str]) -> tuple[str, str, str]:
    """(name, op, where) of a node: an object with a new name and a known op."""
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
    return name, op, where


def _checked_inputs(node: dict, spec: OpSpec, inputs: Any, flow: _Flow, where: str) -> dict:
    """The node's checked attributes, after checking its inputs: defined before, of the kinds the op
    takes, packed ones in the layout the op expects."""
    op = node["op"]
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise GraphError(f"{where}: inputs must be a list of value names")
    variadic = spec.inputs[-1] == "..."
    fixed = spec.inputs[:-1] if variadic else spec.inputs
    if len(inputs) < len(fixed) or (not variadic and len(inputs) != len(fixed)) or (variadic and len(inputs) > 64):
        raise GraphError(f"{where}: op {op} takes {len(fixed)}{'+' if variadic else ''} inputs, got {len(inputs)}")
    for i, ref in enumerate(inputs):
        if ref not in flow.kinds:
            raise GraphError(f"{where}: input {ref!r} is not defined before it")
        want = fixed[min(i, len(fixed) - 1)]
        if flow.kinds[ref] != want:
            raise GraphError(f"{where}: op {op} expects a {want} input, {ref!r} is {flow.kinds[ref]}")
        if want == PACKED:
            expected = expected_layout({"op": op, "attrs": checked_attrs(node, spec, where)})
            if not layouts_match(produced_layout(flow.producers[ref]), expected):
                raise GraphError(f"{where}: packed input {ref!r} has a different layout than {op} expects")
    return checked_attrs(node, spec, where)


def _checked_tensors(node: dict, spec: OpSpec, attrs: dict, tensors: dict, compact: bool, where: str) -> set[str]:
    """The keys of the tensors a node uses, after checking each against its role's spec."""
    op, used = node["op"], set()
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
        _check_tensor(tensors[key], key, role, ts, attrs, compact, where)
        used.add(key)
    if op in ("qconv2d", "qlinear") and ("weight" in node_tensors) == ("weight_bits" in node_tensors):
        raise GraphError(f"{where}: op {op} needs exactly one of the tensors 'weight' and 'weight_bits'")
    return used


def _check_tensor(t: torch.Tensor, key: str, role: str, ts: TensorSpec, attrs: dict, compact: bool, where: str):
    """One tensor: its dtype and shape for its role, then (unless meta) its values."""
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
    if t.is_meta or not t.numel():  # dtype and shape only: the values are checked once they are read
        return
    problem = ts.check(t, attrs) if ts.check is not None else None
    if problem:
        raise GraphError(f"{where}: tensor {key!r} {problem}")
    if role == "direction":
        try:
            check_direction(t)
        except ValueError as error:
            raise GraphError(f"{where}: tensor {key!r}: {error}") from None
    if role in ("or_mask", "pad_words"):
        cg = attrs["channels"] // attrs["out_groups"]
        if bool(((t & _unused_bits(cg, t.shape[-1])) != 0).any()):
            raise GraphError(f"{where}: tensor {key!r} has bits set beyond the {cg} channels of a group")


def _check_outputs(graph: dict, inp: dict, kinds: dict[str, str]) -> None:
    outputs = graph["outputs"]
    if not isinstance(outputs, list) or not outputs:
        raise GraphError("graph outputs must be a non-empty list of value names")
    for ref in outputs:
        if not isinstance(ref, str) or ref not in kinds:
            raise GraphError(f"graph output {ref!r} is not a defined value")
        if kinds[ref] != FLOAT:
            raise GraphError(f"graph output {ref!r} is a packed value")
        if ref == inp["name"] and graph["nodes"]:  # an identity model has no nodes; with nodes, none would count
            raise GraphError(f"graph output {ref!r} is the graph's input itself, not computed by any of its nodes")


def _unused_bits(channels: int, words: int) -> torch.Tensor:
    """int64 ``[words]``: the bits beyond ``channels`` (which must stay 0)."""
    return torch.tensor([~word for word in used_bits(channels, words)], dtype=torch.int64)
