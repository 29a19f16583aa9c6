"""A layer's sum and its float epilogue, rounded as onebit rounds them whatever a runtime fuses.

Only sums known to be exact integers (of +-1, or of an input quantizer's integers with integer weight
levels) go through int32; a float sum is rounded as float sums are. ``scale`` and ``bias`` are the two
float roundings of onebit's own arithmetic, so binary-layer outputs are bit-identical.
"""

from __future__ import annotations

import numpy as np

from onebit.engine.onnx.builder import channel_const
from onebit.engine.onnx.context import SIGNS, ExportContext


def exact_sum(ctx: ExportContext, acc: str, kind: str, base: str) -> str:
    """An exact integer sum through int32 and back: the same values, and a runtime cannot fuse what
    follows (a ``BatchNormalization``, a division) into the ``Conv`` / ``MatMul`` that computed it
    (onnxruntime's ConvBNFusion would turn +-1 weights into floats). Only for sums of integer operands
    (``kind``): the cast truncates anything else. A sum of :data:`INTEGERS` is NaN where it read a NaN
    input, as in the model: it stays NaN (the cast would make it -2^31); a sum of :data:`SIGNS` is never NaN."""
    b = ctx.b
    integer = b.op(
        "Cast",
        [b.op("Cast", [acc], f"{base}_int", to=b.tensor_type("int32"))],
        f"{base}_acc",
        to=b.tensor_type("float32"),
    )
    if kind == SIGNS:
        return integer
    return b.op("Where", [b.op("IsNaN", [acc], f"{base}_nan"), acc, integer], f"{base}_exact")


def scale_bias(ctx: ExportContext, y: str, node: dict, rank: int, base: str, exact: str | None) -> str:
    """``fl32(fl32(y * scale) + bias)`` after a ``Conv`` / ``MatMul``, robust to runtime fusions.

    ``exact`` says what ``y`` is: the exact integer sum of integer operands (:data:`SIGNS` /
    :data:`INTEGERS`), or (None) a float sum, rounded as float sums are. A runtime may fold a ``Mul``
    or ``Add`` that follows a ``Conv`` into its weights or its accumulation (onnxruntime's ConvMulFusion /
    ConvAddFusion / MatMulAddFusion), which changes the rounding. So the scale and bias go through
    float64, where they are exact: ``y * scale`` (a product of two float32) is exact in float64, and its
    cast is the one float32 rounding; ``y + bias`` (two float32) rounded to float64 then to float32 is
    the float32 sum (53 >= 2 * 24 + 2 bits: the double rounding is innocuous). With neither, an exact
    sum goes through :func:`exact_sum`; a float sum is the layer's output as it is.
    """
    roles, b = ctx.roles(node), ctx.b
    scale, bias = roles.get("scale"), roles.get("bias")
    if scale is None and bias is None:
        return exact_sum(ctx, y, exact, base) if exact else y
    wide = b.op("Cast", [y], f"{base}_acc64", to=b.tensor_type("float64"))
    if scale is not None:
        scale64 = channel_const(b, scale.double(), rank, f"{base}_scale", np.float64)
        y = b.op(
            "Cast", [b.op("Mul", [wide, scale64], f"{base}_scaled64")], f"{base}_scaled", to=b.tensor_type("float32")
        )
        if bias is not None:
            y = b.op("Add", [y, channel_const(b, bias, rank, f"{base}_bias")], f"{base}_biased")
        return y
    bias64 = channel_const(b, bias.double(), rank, f"{base}_bias", np.float64)
    return b.op(
        "Cast", [b.op("Add", [wide, bias64], f"{base}_biased64")], f"{base}_biased", to=b.tensor_type("float32")
    )
