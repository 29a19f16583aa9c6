"""The ONNX graph under construction: uniquely named nodes and initializers, small constants shared."""

from __future__ import annotations

import numpy as np
import torch


def onnx_modules():
    """``(onnx, onnx.helper, onnx.numpy_helper)``; without them an ImportError naming the extra."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("ONNX export needs the 'onnx' package: pip install 'onebit[onnx]'") from error
    return onnx, helper, numpy_helper


class Builder:
    """Collects ONNX nodes and initializers with unique names.

    A constant of at most 16 elements is stored once and shared by every node that uses it."""

    def __init__(self):
        _, self.helper, self.numpy_helper = onnx_modules()
        self.nodes: list = []
        self.initializers: list = []
        self.names: set[str] = set()
        self.constants: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        """``base`` made a valid, unused name (``base``, then ``base_1``, ``base_2``, ...)."""
        base = "".join(c if c.isalnum() or c in "_." else "_" for c in base) or "v"
        out, k = base, 1
        while out in self.names:
            out, k = f"{base}_{k}", k + 1
        self.names.add(out)
        return out

    def const(self, value, dtype=np.float32, base: str = "c") -> str:
        """An initializer holding ``value`` as ``dtype``; returns its name."""
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self.constants:
            return self.constants[key]
        name = self.name(base)
        self.initializers.append(self.numpy_helper.from_array(array, name))
        if key is not None:
            self.constants[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs) -> str:
        """A node ``op_type(inputs)`` with one output, named after ``base``; returns the output's name."""
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def tensor_type(self, dtype) -> int:
        """ONNX's element type of a numpy dtype (for ``Cast``)."""
        return self.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def channel_const(b: Builder, values: torch.Tensor, rank: int, base: str, dtype=np.float32) -> str:
    """A per-channel constant shaped ``[1, C, 1, ...]`` to broadcast over ``[N, C, ...]`` of ``rank``
    (``[1, F]`` for rank 2, which broadcasts over any ``[..., F]``)."""
    array = values.detach().cpu().numpy().astype(dtype)
    return b.const(array.reshape([1, -1] + [1] * (rank - 2)), dtype, base)
