"""Reading and rewriting an engine graph in a pure pass.

:class:`GraphView` answers who reads a value; :class:`Rewrite` collects a pass's edits (nodes put in
another node's place, nodes removed, values renamed, new tensors) and applies them to a copy: the
graph and the tensors passed in are left as they are.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from onebit.engine.graph.schema import fresh_name

__all__ = ["GraphView", "Rewrite", "tensor_key", "node_tensors"]


def tensor_key(name: str, role: str) -> str:
    """The key of node ``name``'s tensor in role ``role``, as the lowering names them."""
    return f"{name}__{role}"


def node_tensors(node: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A node's tensors by role."""
    return {role: tensors[key] for role, key in node.get("tensors", {}).items()}


class GraphView:
    """A graph's nodes by name, the nodes reading each value, and its outputs."""

    def __init__(self, graph: dict) -> None:
        self.outputs = set(graph["outputs"])
        self.nodes = {node["name"]: node for node in graph["nodes"]}
        self.names = {node["name"] for node in graph["nodes"]} | {graph["input"]["name"]}
        self.readers: dict[str, list[dict]] = {}
        for node in graph["nodes"]:
            for ref in dict.fromkeys(node["inputs"]):
                self.readers.setdefault(ref, []).append(node)

    def readers_of(self, node: dict) -> list[dict]:
        """The nodes reading ``node``'s value (each once)."""
        return self.readers.get(node["name"], [])

    def only_reader(self, node: dict) -> dict | None:
        """The node reading ``node``'s value as its one input, when nothing else (no other node, no
        output) reads it; else None."""
        readers = self.readers_of(node)
        if len(readers) != 1 or node["name"] in self.outputs or readers[0]["inputs"] != [node["name"]]:
            return None
        return readers[0]

    def fresh_name(self, base: str) -> str:
        """A value name from ``base`` that no value has yet, taken now (``schema.fresh_name``)."""
        return fresh_name(self.names, base)


@dataclass
class Rewrite:
    """A pass's edits to a graph, applied to a copy by :meth:`apply`."""

    replace: dict[str, list[dict]] = field(default_factory=dict)  #: node name -> the nodes in its place
    remove: set[str] = field(default_factory=set)  #: names of nodes dropped
    rename: dict[str, str] = field(default_factory=dict)  #: value name -> the value read instead
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  #: new tensors by key

    def apply(self, graph: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        """``(graph, tensors)`` edited: nodes in order with their replacements, inputs and outputs
        renamed; the tensors the nodes refer to, in the nodes' order."""
        nodes = []
        for node in graph["nodes"]:
            if node["name"] in self.remove:
                continue
            for new in self.replace.get(node["name"], [node]):
                new = copy.deepcopy(new)
                new["inputs"] = [self._renamed(ref) for ref in new["inputs"]]
                nodes.append(new)
        out = {key: nodes if key == "nodes" else copy.deepcopy(value) for key, value in graph.items()}
        out["outputs"] = [self._renamed(ref) for ref in graph["outputs"]]
        available = {**tensors, **self.tensors}
        kept = {key: available[key] for node in nodes for key in node.get("tensors", {}).values()}
        return out, kept

    def _renamed(self, ref: str) -> str:
        while ref in self.rename:
            ref = self.rename[ref]
        return ref
