"""The binary ops' ONNX forms: a packed value is its +-1 float tensor, a binary layer a float
``Conv`` / ``MatMul`` of +-1 (integer sums, exact in float32 in any order up to 2^24).

- ``pack`` / ``pack_features``: the input's signs (``[N, C, H, W]``, or ``[N, F]``);
- a binary conv is ``Pad(constant pad_value)`` then ``Conv`` with +-1 weights unpacked from their
  stored bits, then the scale and bias (:func:`~onebit.engine.onnx.sums.scale_bias`): bit-identical;
- thresholds (BatchNorm + sign folded) are comparisons of the exact accumulator,
  ``Where(dir > 0 ? acc < thr : acc > thr, -1, +1)``;
- a max pool of thresholded bits is a ``MaxPool`` of +-1 values flipped by the channel's direction
  (a channel of direction +1 is -1 when all its window is; of direction -1, when any of it is).
"""

from __future__ import annotations

import numpy as np
import torch

from onebit.bits import unpack_bits
from onebit.engine.onnx.builder import channel_const
from onebit.engine.onnx.context import SIGNS, Emitter, ExportContext
from onebit.engine.onnx.pooling import pool
from onebit.engine.onnx.products import conv, matmul
from onebit.engine.onnx.signs import bits_weight, sign, threshold
from onebit.engine.onnx.sums import scale_bias


def pack(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return sign(ctx, xs[0], name)


def pack_features(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """The signs of ``[N, F]``; an input of higher rank is ``[-1, F]`` first, as the engine packs it."""
    x = xs[0]
    if len(ctx.input_shape(node)) != 2:
        x = ctx.b.op("Reshape", [x, ctx.b.const([-1, a["features"]], np.int64)], f"{name}_2d")
    return sign(ctx, x, name)


def _binary_conv_sum(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """The exact sum of a binary conv: its +-1 input padded with its layout's pad value, +-1 weights."""
    ph, pw = a["padding"]
    w = bits_weight(ctx, node, "weight", a, name)
    return conv(ctx, xs[0], w, a, name, explicit=[pw, pw, ph, ph], pad_value=float(a["pad_value"]))


def binary_conv2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return scale_bias(ctx, _binary_conv_sum(ctx, node, a, xs, name), node, 4, name, SIGNS)


def binary_conv2d_threshold(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return threshold(ctx, _binary_conv_sum(ctx, node, a, xs, name), node, 4, name)


def threshold_pack(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return threshold(ctx, xs[0], node, len(ctx.input_shape(node)), name)


def max_pool_bits(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``flip * MaxPool(flip * x)``, ``flip`` -1 on the channels of direction -1 (their or_mask):
    max of +-1 is -1 iff all are, so a flipped channel is -1 iff any is."""
    roles, c, g = ctx.roles(node), a["channels"], a["out_groups"]
    cg = c // g
    flips = torch.cat([unpack_bits(roles["or_mask"][k], cg) for k in range(g)])
    m = channel_const(ctx.b, torch.where(flips, -1.0, 1.0), 4, f"{name}_flip")
    flipped = ctx.b.op("Mul", [xs[0], m], f"{name}_in")
    oph, opw = a["out_padding"]
    out = (ctx.run[name].shape[1] - 2 * oph, ctx.run[name].shape[2] - 2 * opw)  # the engine's pooled H, W
    size = ctx.spatial_size(node["inputs"][0])
    pooled = pool(ctx, "MaxPool", flipped, a, size, out, f"{name}_max", dilations=list(a["dilation"]))
    return ctx.b.op("Mul", [pooled, m], name)


def _binary_linear_sum(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return matmul(ctx, xs[0], bits_weight(ctx, node, "weight", a, name), name)


def binary_linear(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return scale_bias(ctx, _binary_linear_sum(ctx, node, a, xs, name), node, 2, name, SIGNS)


def binary_linear_threshold(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return threshold(ctx, _binary_linear_sum(ctx, node, a, xs, name), node, 2, name)


EMITTERS: dict[str, Emitter] = {
    "pack": pack,
    "pack_features": pack_features,
    "binary_conv2d": binary_conv2d,
    "binary_conv2d_threshold": binary_conv2d_threshold,
    "threshold_pack": threshold_pack,
    "max_pool_bits": max_pool_bits,
    "binary_linear": binary_linear,
    "binary_linear_threshold": binary_linear_threshold,
}
#: the ops whose output is integer-valued (the others give floats)
KINDS: dict[str, str] = {
    "pack": SIGNS,
    "pack_features": SIGNS,
    "binary_conv2d_threshold": SIGNS,
    "threshold_pack": SIGNS,
    "max_pool_bits": SIGNS,
    "binary_linear_threshold": SIGNS,
}
