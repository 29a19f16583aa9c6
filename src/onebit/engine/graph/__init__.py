"""The packed engine's graph: a fixed whitelist of ops, their checks and their float semantics.

A graph is plain JSON data (it is stored in the file's metadata)::

    {"input": {"name": "input", "rank": 4, "channels": 3, "dtype": "float32"},
     "nodes": [{"name": "conv1", "op": "conv2d", "inputs": ["input"],
                "attrs": {...}, "tensors": {"weight": "conv1.weight", ...}}, ...],
     "outputs": ["fc"], "output_kind": "tensor"}

Values are either *float* tensors (NCHW / NC, as in the model) or *packed* bit
tensors (``[N, Hp, Wp, G, Wg]`` or ``[N, Wg]`` int64) whose layout (padding,
pad value, groups) is fixed by the op that produced them and must be the one
the consuming binary layer expects. Every op here names a function of this
module; nothing from a file is ever executed or imported, and :func:`validate`
checks names, references, value kinds, attributes and tensor dtypes/shapes
before a graph runs.

The package, one concept per module: :mod:`~.schema` (value kinds, attribute checkers, op and
tensor specs), the op families :mod:`~.binary`, :mod:`~.quantized` and :mod:`~.floats` (each
op's float semantics and spec, in one table per family), :mod:`~.ops` (``OPS``, their union),
:mod:`~.ranks` (ranks and packed layouts along edges) and :mod:`~.validate`.
"""

from onebit.engine.graph.ops import OPS, attrs
from onebit.engine.graph.schema import (
    CONV_ATTRS,
    FLOAT,
    PACKED,
    GraphError,
    OpSpec,
    TensorSpec,
    binary_weight_shape,
    compact_shape,
)
from onebit.engine.graph.validate import validate

__all__ = [
    "OPS",
    "OpSpec",
    "TensorSpec",
    "validate",
    "attrs",
    "GraphError",
    "binary_weight_shape",
    "compact_shape",
    "CONV_ATTRS",
    "FLOAT",
    "PACKED",
]
