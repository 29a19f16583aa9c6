"""The one error of the ONNX export."""


class OnnxExportError(ValueError):
    """A graph op or configuration that has no standard-ONNX form at the requested opset."""
