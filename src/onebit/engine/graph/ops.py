"""``OPS``: the whitelist of graph ops, by name (the union of the op families' tables)."""

from __future__ import annotations

from onebit.engine.graph.binary import BINARY_OPS
from onebit.engine.graph.floats import FLOAT_OPS
from onebit.engine.graph.int8 import INT8_OPS
from onebit.engine.graph.quantized import QUANTIZED_OPS
from onebit.engine.graph.schema import GraphError, OpSpec, checked_attrs

#: every op a graph may name: its float semantics, input and output kinds, attributes and tensors
OPS: dict[str, OpSpec] = {**BINARY_OPS, **QUANTIZED_OPS, **INT8_OPS, **FLOAT_OPS}


def attrs(node: dict) -> dict:
    """A node's attributes, checked against its op and normalised (pairs as lists, numbers as their
    types); :class:`GraphError` naming the node when they are not what the op takes."""
    op = node.get("op")
    if op not in OPS:
        raise GraphError(f"graph node {node.get('name')!r}: unknown op {op!r}")
    return checked_attrs(node, OPS[op], f"graph node {node.get('name')!r}")
