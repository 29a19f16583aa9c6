"""The ONNX exporter's earlier import path: every name it had, from :mod:`onebit.engine.onnx`."""

from onebit.engine.onnx import DEFAULT_OPSET, OnnxExportError, OnnxModel, export_onnx, load_onnx
from onebit.engine.onnx.context import INTEGERS as INTEGERS
from onebit.engine.onnx.context import SIGNS as SIGNS
from onebit.engine.onnx.export import Exporter as _Exporter  # noqa: F401 - tests walk a graph with it

__all__ = ["export_onnx", "load_onnx", "OnnxModel", "OnnxExportError", "DEFAULT_OPSET"]
