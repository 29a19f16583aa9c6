"""The state of one export: the packed graph, the ONNX name and shape of each graph value, what it holds."""

from __future__ import annotations

from collections.abc import Callable

import torch

from onebit.engine.onnx.builder import Builder

#: what an integer-valued graph value holds (:attr:`ExportContext.kind`; a value not named there is a
#: float): +-1 (never NaN: sign(NaN) = +1), or an input quantizer's integers (NaN where its input is NaN)
SIGNS, INTEGERS = "signs", "integers"
#: the kind of an op whose output holds values of its inputs only: SIGNS if all are, INTEGERS if all are
#: integer-valued and one holds integers, else a float
AS_INPUTS = "as_inputs"


class ExportContext:
    """One packed model's graph being written as ONNX nodes.

    ``value`` maps a graph value to its ONNX tensor name; ``run`` holds each graph value as the engine
    computes it on the example input (its shapes fix reshape targets and pooled sizes); ``shape`` the
    logical shape of each float value (a packed value is its +-1 ``[N, C, H, W]`` or ``[N, F]`` tensor
    in the ONNX graph); ``kind`` :data:`SIGNS` or :data:`INTEGERS` for integer-valued values."""

    def __init__(self, packed, example: torch.Tensor):
        self.b = Builder()
        self.graph = packed.graph
        self.nodes = {node["name"]: node for node in packed.graph["nodes"]}
        self.tensors = packed.named_graph_tensors()
        self.value: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.kind: dict[str, str] = {}
        self.run: dict[str, torch.Tensor] = {}
        self.example = example

    def roles(self, node: dict) -> dict[str, torch.Tensor]:
        """A node's tensors by role (``weight``, ``scale``, ``thresholds``, ...)."""
        return {role: self.tensors[key] for role, key in node.get("tensors", {}).items()}

    def input_shape(self, node: dict) -> tuple[int, ...]:
        """The logical shape of a node's first input."""
        return self.shape[node["inputs"][0]]

    def spatial_size(self, value: str) -> tuple[int, int]:
        """H, W of a graph value: a float ``[N, C, H, W]``, or a packed ``[N, H + 2 ph, W + 2 pw, G, Wg]``
        stored with its producer's padding (``padding`` of a ``pack``, ``out_padding`` of the others)."""
        if value in self.shape:
            return tuple(self.shape[value][2:])
        attrs = self.nodes[value]["attrs"]
        ph, pw = attrs["out_padding"] if "out_padding" in attrs else attrs["padding"]
        stored = self.run[value].shape
        return stored[1] - 2 * ph, stored[2] - 2 * pw


#: an op's ONNX form: ``emit(ctx, node, attrs, inputs, name) -> the ONNX name of its output``
Emitter = Callable[[ExportContext, dict, dict, list[str], str], str]
