"""Running an exported ONNX file with onnxruntime's CPU provider, called like a model."""

from __future__ import annotations

import os

import torch

from onebit.engine.packed import InputError


class OnnxModel:
    """An ONNX file run by onnxruntime's CPU provider, called like a model: ``y = m(x)``
    (a float32 ``torch.Tensor`` in, ``torch.Tensor`` out, or a tuple for several outputs).

    An input the file cannot take raises :class:`onebit.engine.InputError` (a ``TypeError`` and a
    ``ValueError``) in one line naming the file: the shape it expects against the one it got, or
    onnxruntime's own message, on one line."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError("running ONNX files needs 'onnxruntime': pip install 'onebit[onnx]'") from error
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.path = os.fspath(path)
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: not a runnable ONNX model: {error}") from None
        first = self.session.get_inputs()[0]
        self.input = first.name
        #: the input's shape as the file declares it: an int, or a name (e.g. "batch") for a free dimension
        self.input_shape = list(first.shape)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            raise InputError(f"{self.path}: expected a float32 torch.Tensor input")
        got, expected = list(x.shape), "[" + ", ".join(str(d) for d in self.input_shape) + "]"
        if len(got) != len(self.input_shape) or any(
            isinstance(d, int) and d != n for d, n in zip(self.input_shape, got)
        ):
            raise InputError(f"{self.path}: expected an input of shape {expected}, got {got}")
        try:
            outs = self.session.run(self.outputs, {self.input: x.detach().contiguous().numpy()})
        except MemoryError:
            raise
        except Exception as error:  # onnxruntime raises its own exception types, with multi-line messages
            message = " ".join(str(error).split())
            raise InputError(
                f"{self.path}: onnxruntime cannot run the input of shape {got} (the file expects {expected}): {message}"
            ) from error
        tensors = tuple(torch.from_numpy(o) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    def __repr__(self) -> str:
        return f"OnnxModel({self.path!r})"


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> OnnxModel:
    """Load an ONNX file for onnxruntime's CPU provider (see :class:`OnnxModel`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such ONNX file")
    return OnnxModel(path, threads)
