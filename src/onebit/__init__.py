"""onebit: binary (1-bit) and low-bit neural networks for PyTorch.

Layers, from the bottom up:

- ``onebit.math``: the one sign convention (sign(0) = +1);
- ``onebit.quant``: quantizers with straight-through gradients, by alias and by family (signs,
  uniform k-bit, BitNet's ternary and 8-bit per-token), under one contract (``onebit.quant_lowbit``
  is kept for old imports);
- ``onebit.nn``: quantized layers, drop-in for torch.nn (``onebit.nn.functional`` holds the arithmetic);
- ``onebit.binarize``: float -> binary model conversion;
- ``onebit.canonize``, ``onebit.summary``, ``onebit.doctor``, ``onebit.plot``: model tools
  (exact reversible BatchNorm merging, bits-and-MACs tables, learning diagnostics, pictures);
- ``onebit.models``, ``onebit.data``, ``onebit.train``: the zoo, datasets and trainer;
- ``onebit.engine``: the bit-packed CPU inference engine; ``onebit.export_onnx``: the same
  lowering as standard ONNX ops, for onnxruntime;
- ``onebit.heap``: keep freed tensor memory for reuse (the ``onebit`` command does).
"""

from onebit import canonize, math, nn, quant, quant_lowbit
from onebit.convert import binarize
from onebit.doctor import doctor
from onebit.summary import summary

__version__ = "0.1.0"

__all__ = [
    "binarize",
    "canonize",
    "doctor",
    "engine",
    "export_onnx",
    "fit",
    "math",
    "nn",
    "plot",
    "quant",
    "quant_lowbit",
    "summary",
    "__version__",
]


def fit(model, train_data, valid_data, **kwargs):
    """Train a user's own model with onebit's trainer (see :func:`onebit.train.fit.fit`)."""
    from onebit.train.fit import fit as run

    return run(model, train_data, valid_data, **kwargs)


def export_onnx(model, example_input, path, *, opset: int = 18, strict: bool = False):
    """Write ``model`` as an ONNX file of standard ops (see :func:`onebit.engine.to_onnx.export_onnx`)."""
    from onebit.engine.to_onnx import export_onnx as export

    return export(model, example_input, path, opset=opset, strict=strict)


def _register_engine_ops() -> None:
    """Register the engine's kernels as torch custom ops (``torch.ops.onebit.*``), so that a
    program saved with ``torch.export`` loads wherever onebit is imported."""
    from onebit.engine import ops

    ops.native_available()  # imports onebit.engine.kernels; a missing extension is reported there


_register_engine_ops()


def __getattr__(name: str):
    # matplotlib and the engine load on first use, keeping `import onebit` light
    if name in ("plot", "engine", "models", "data"):
        import importlib

        return importlib.import_module(f"onebit.{name}")
    raise AttributeError(f"module 'onebit' has no attribute {name!r}")
