"""``export_onnx``: walk a packed model's graph and write each node through its family's emitter."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

import onebit.engine.onnx.binary as binary
import onebit.engine.onnx.floats as floats
import onebit.engine.onnx.int8 as int8
import onebit.engine.onnx.quantized as quantized
from onebit import io
from onebit.engine import graph as G
from onebit.engine.onnx.builder import onnx_modules
from onebit.engine.onnx.context import AS_INPUTS, INTEGERS, SIGNS, Emitter, ExportContext
from onebit.engine.onnx.errors import OnnxExportError
from onebit.engine.packed import PackedModel, pack

DEFAULT_OPSET = 18

#: every graph op's ONNX form, by op name
EMITTERS: dict[str, Emitter] = {**binary.EMITTERS, **quantized.EMITTERS, **int8.EMITTERS, **floats.EMITTERS}
#: what the output of an integer-valued op holds (:data:`SIGNS`, :data:`INTEGERS`, :data:`AS_INPUTS`)
KINDS: dict[str, str] = {**binary.KINDS, **quantized.KINDS, **int8.KINDS, **floats.KINDS}


class Exporter(ExportContext):
    """The walk: each node run by the engine (its value fixes shapes), then written by its emitter."""

    def export(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Write every node; returns (the ONNX names of the graph's outputs, every value as the engine ran it)."""
        inp = self.graph["input"]
        self.value[inp["name"]] = "input"
        self.b.names.add("input")
        self.run[inp["name"]] = self.example
        self.shape[inp["name"]] = tuple(self.example.shape)
        for node in self.graph["nodes"]:
            self.emit(node)
        return [self.value[o] for o in self.graph["outputs"]], self.run

    def emit(self, node: dict) -> None:
        op, name = node["op"], node["name"]
        attrs = G.attrs(node)
        out = G.OPS[op].fn(self.roles(node), attrs, *[self.run[i] for i in node["inputs"]])
        self.run[name] = out
        if out.dtype != torch.int64:  # a packed value's logical shape is not its words'
            self.shape[name] = tuple(out.shape)
        xs = [self.value[i] for i in node["inputs"]]
        emitter = EMITTERS.get(op)
        if emitter is None:
            raise OnnxExportError(f"graph op {op!r} (node {name!r}) has no ONNX form")
        self.value[name] = emitter(self, node, attrs, xs, name)
        kind = self.value_kind(node)
        if kind is not None:
            self.kind[name] = kind

    def value_kind(self, node: dict) -> str | None:
        """:data:`SIGNS` or :data:`INTEGERS` when a node's output is integer-valued, else None."""
        kind = KINDS.get(node["op"])
        if kind == AS_INPUTS:
            kinds = {self.kind.get(i) for i in node["inputs"]}
            return None if None in kinds else INTEGERS if INTEGERS in kinds else SIGNS
        return kind


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    strict: bool = False,
) -> Any:
    """Write ``model`` (an eval-mode onebit/torch model, or a :class:`~onebit.engine.PackedModel`)
    as an ONNX file of standard ops; returns the ``onnx.ModelProto``.

    The model is lowered as :func:`onebit.engine.pack` lowers it (``strict`` as there), so
    binary layers give bit-identical outputs in onnxruntime and float layers equal ones up to
    float rounding. The file takes any batch size, 0 included; ``example_input`` may be an empty
    batch. Its other dimensions fix the graph, a features-last ``[N, ..., F]`` input's too (the packed
    model takes any length there; the file, the example's). Written atomically. Raises
    :class:`OnnxExportError` for an op with no standard-ONNX form at ``opset`` (>= 18).
    """
    onnx, helper, _ = onnx_modules()
    if not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise OnnxExportError(f"export_onnx: opset must be an integer >= {DEFAULT_OPSET}, got {opset!r}")
    if isinstance(example_input, torch.Tensor) and example_input.dim() >= 1 and example_input.shape[0] == 0:
        # an empty batch: the graph is built on one zero sample (only the other dimensions fix it; the
        # batch dimension of the file is free, so it runs batch 0 as any other)
        example_input = torch.zeros((1, *example_input.shape[1:]), dtype=example_input.dtype)
    packed = model if isinstance(model, PackedModel) else pack(model, example_input, strict=strict)
    packed._check_input(example_input)
    exporter = Exporter(packed, example_input)
    with torch.no_grad():
        outputs, run = exporter.export()
    in_shape = ["batch", *list(example_input.shape[1:])]
    float32 = helper.np_dtype_to_tensor_dtype(np.dtype("float32"))
    graph_outputs = []
    for k, (value, out) in enumerate(zip(packed.graph["outputs"], outputs)):
        name = "output" if len(outputs) == 1 else f"output_{k}"
        exporter.b.nodes.append(helper.make_node("Identity", [out], [name], name=f"{name}_identity"))
        shape = ["batch", *list(run[value].shape[1:])]
        graph_outputs.append(helper.make_tensor_value_info(name, float32, shape))
    graph = helper.make_graph(
        exporter.b.nodes,
        "onebit",
        [helper.make_tensor_value_info("input", float32, in_shape)],
        graph_outputs,
        initializer=exporter.b.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onebit")
    proto.ir_version = min(proto.ir_version, 9)  # readable by current onnxruntime releases
    onnx.checker.check_model(proto, full_check=True)
    io.atomic_write_bytes(path, proto.SerializeToString())
    return proto
