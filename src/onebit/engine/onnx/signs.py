"""+-1 values as standard ONNX ops: signs of floats, thresholds of accumulators, weights from stored bits.

``sign(x)`` (sign(0) = sign(-0.0) = sign(NaN) = +1) is ``Where(Less(x, 0), -1, +1)``. +-1 weights are
stored as bits (``uint8``, the packed file's compact layout: bit j of byte b is element 8 b + j of
``w[c_out].flatten()``, set for -1) and unpacked by a small ``BitShift`` / ``BitwiseAnd`` / ``Cast``
subgraph of initializers only, which onnxruntime folds once when it loads the model.
"""

from __future__ import annotations

import numpy as np

from onebit.engine.fileformat import compact_weight
from onebit.engine.onnx.builder import channel_const
from onebit.engine.onnx.context import ExportContext


def signs_where(ctx: ExportContext, negative: str, base: str) -> str:
    """``Where(negative, -1, +1)``."""
    return ctx.b.op("Where", [negative, ctx.b.const(-1.0), ctx.b.const(1.0)], base)


def sign(ctx: ExportContext, x: str, base: str) -> str:
    """-1 where ``x < 0``, else +1 (0, -0.0 and NaN give +1)."""
    negative = ctx.b.op("Less", [x, ctx.b.const(0.0)], f"{base}_neg")
    return signs_where(ctx, negative, base)


def threshold(ctx: ExportContext, acc: str, node: dict, rank: int, base: str) -> str:
    """+-1 from an exact accumulator (BatchNorm + sign folded): -1 where
    ``dir > 0 ? acc < thr : acc > thr``, compared in float64, channels along dimension 1 of ``rank``."""
    b, roles = ctx.b, ctx.roles(node)
    thr = channel_const(b, roles["thresholds"].double(), rank, f"{base}_thr", np.float64)
    pos = channel_const(b, roles["direction"] > 0, rank, f"{base}_dir", np.bool_)
    neg = channel_const(b, roles["direction"] < 0, rank, f"{base}_dirneg", np.bool_)
    acc64 = b.op("Cast", [acc], f"{base}_acc64", to=b.tensor_type("float64"))
    lt = b.op("And", [b.op("Less", [acc64, thr], f"{base}_lt"), pos], f"{base}_pos_lt")
    gt = b.op("And", [b.op("Greater", [acc64, thr], f"{base}_gt"), neg], f"{base}_neg_gt")
    return signs_where(ctx, b.op("Or", [lt, gt], f"{base}_negative"), base)


def bits_weight(ctx: ExportContext, node: dict, role: str, attrs: dict, base: str) -> str:
    """+-1 float weights ``[Co, Cg, KH, KW]`` (or ``[Out, F]``) from stored bits: ``1 - 2 ((bits >> j) & 1)``."""
    b = ctx.b
    compact = compact_weight(ctx.tensors[node["tensors"][role]], attrs)  # uint8 [Co, ceil(K / 8)]
    co, nbytes = compact.shape
    if "kernel_size" in attrs:
        cg = attrs["in_channels"] // attrs["groups"]
        shape = [co, cg, *attrs["kernel_size"]]
    else:
        shape = [co, attrs["in_features"]]
    k = int(np.prod(shape[1:]))
    bits = b.const(compact.numpy().reshape(co, nbytes, 1), np.uint8, f"{base}_bits")
    shifted = b.op(
        "BitShift", [bits, b.const(np.arange(8).reshape(1, 1, 8), np.uint8)], f"{base}_shift", direction="RIGHT"
    )
    one_bit = b.op("BitwiseAnd", [shifted, b.const(np.ones((1, 1, 1)), np.uint8)], f"{base}_and")
    flat = b.op("Reshape", [one_bit, b.const([co, nbytes * 8], np.int64)], f"{base}_flat")
    used = b.op("Slice", [flat, b.const([0], np.int64), b.const([k], np.int64), b.const([1], np.int64)], f"{base}_used")
    as_float = b.op("Cast", [used], f"{base}_float", to=b.tensor_type("float32"))
    signs = b.op("Sub", [b.const(1.0), b.op("Mul", [as_float, b.const(2.0)], f"{base}_x2")], f"{base}_signs")
    return b.op("Reshape", [signs, b.const(shape, np.int64)], f"{base}_w")
