"""ONNX export of a packed model: standard ops only, the same numbers as the model.

:func:`export_onnx` lowers a model exactly as :func:`onebit.engine.pack` does (same graph, same
fallbacks) and writes each graph op as standard ONNX ops (opset >= 18), so that a stock runtime
(onnxruntime's CPU provider) runs it. A packed value is its ``[N, C, H, W]`` (or ``[N, F]``) tensor of
+-1 floats; binary and k-bit layers are float ``Conv`` / ``MatMul`` nodes of integers, exact in any
order, followed by onebit's own float roundings, so their outputs are bit-identical; float layers are
their ONNX ops, equal to torch's up to float rounding.

Modules, each importing only those above it: ``errors`` (:class:`OnnxExportError`), ``builder`` (nodes
and shared constants), ``context`` (one export's state: ONNX names, shapes and kinds of the graph's
values), ``signs`` (+-1 values, thresholds, weights from stored bits), ``sums`` (exact integer sums, the
scale and bias), ``products`` (``Conv``, ``MatMul``), ``pooling`` (torch's pool windows), ``levels``
(input quantizers' integers, a quantized sum's kind and division), then one module per op family, each
a table ``EMITTERS = {op: emit(ctx, node, attrs, inputs, name)}`` and the ``KINDS`` of its integer-valued
outputs: ``binary``, ``quantized``, ``floats``; ``export`` (the walk, :func:`export_onnx`) and
``runtime`` (:class:`OnnxModel`, :func:`load_onnx`). An op's ONNX form is one emitter and its table entry.

The batch dimension is dynamic; every other dimension is the example input's (flatten and reshape
targets, pooled sizes and coordinate maps are fixed by it). ``onnx`` and ``onnxruntime`` are optional
dependencies (``pip install onebit[onnx]``).
"""

from onebit.engine.onnx.errors import OnnxExportError
from onebit.engine.onnx.export import DEFAULT_OPSET, export_onnx
from onebit.engine.onnx.runtime import OnnxModel, load_onnx

__all__ = ["export_onnx", "load_onnx", "OnnxModel", "OnnxExportError", "DEFAULT_OPSET"]
