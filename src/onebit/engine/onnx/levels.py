"""A k-bit layer's integers as ONNX nodes: its input quantizer's integers, what its sum is, the division.

A k-bit layer (``bitplane_conv2d``, or ``quantize_int`` then ``qconv2d``) is the input quantizer's
integers, a float ``Conv`` of the integer weight levels (exact), then the division, scale and bias; a
quantized layer with a float operand (a float input, float weight levels) is a float ``Conv`` /
``MatMul`` whose sum is rounded as float sums are. A NaN input gives NaN exactly where the model gives
NaN (after a k-bit or float input; a sign makes it +1).
"""

from __future__ import annotations

import numpy as np
import torch

from onebit.engine.onnx.context import INTEGERS, ExportContext
from onebit.engine.onnx.sums import exact_sum, scale_bias


def integers(ctx: ExportContext, x: str, kind: str, bits: int, clip: float, base: str) -> str:
    """An input quantizer's integers, op for op as :func:`onebit.engine.bitplanes.integer_input`:
    ``round(clip(x, 0, 1) n)`` for DoReFa, ``2 floor(((clip(x, -c, c) / c + 1) / 2) n + 1/2) - n`` for
    the symmetric one (``n = 2^bits - 1``)."""
    b, n = ctx.b, float(2**bits - 1)
    if kind == "dorefa":
        clipped = b.op("Clip", [x, b.const(0.0), b.const(1.0)], f"{base}_clip")
        return b.op("Round", [b.op("Mul", [clipped, b.const(n)], f"{base}_scaled")], f"{base}_int")
    c = b.const(float(np.float32(clip)))
    clipped = b.op("Clip", [x, b.op("Neg", [c], f"{base}_negc"), c], f"{base}_clip")
    unit = b.op("Div", [clipped, c], f"{base}_unit")
    u = b.op("Div", [b.op("Add", [unit, b.const(1.0)], f"{base}_shift"), b.const(2.0)], f"{base}_u")
    half = b.op("Add", [b.op("Mul", [u, b.const(n)], f"{base}_un"), b.const(0.5)], f"{base}_half")
    j = b.op("Floor", [half], f"{base}_j")
    return b.op("Sub", [b.op("Mul", [j, b.const(2.0)], f"{base}_2j"), b.const(n)], f"{base}_int")


def integer_levels(ctx: ExportContext, node: dict) -> bool:
    """Whether a layer's weight levels are integers (+-1 bits, or float levels that are integers)."""
    tensors = node.get("tensors", {})
    if node["op"] == "bitplane_conv2d" or "weight_bits" in tensors:
        return True
    w = ctx.tensors[tensors["weight"]]
    return bool(torch.equal(w, torch.round(w)))


def sum_kind(ctx: ExportContext, node: dict) -> str | None:
    """What a quantized layer's sum is: :data:`SIGNS` or :data:`INTEGERS` when both operands are
    integer-valued (the input's kind; weight levels that are integers), so that the float ``Conv`` /
    ``MatMul`` computes the exact integer sum in any order; None when either is a float (a float
    input, float weight levels): the sum is a float, rounded as the runtime sums."""
    if node["op"] == "bitplane_conv2d":
        return INTEGERS  # the input quantizer's integers, the weight planes' integer levels
    if not integer_levels(ctx, node):
        return None
    return ctx.kind.get(node["inputs"][0])


def divided(ctx: ExportContext, acc: str, divisor: float | None, node: dict, rank: int, base: str) -> str:
    """``acc [/ divisor] * scale + bias``: an integer-input layer divides its sum first (in float32; an
    exact sum after :func:`~onebit.engine.onnx.sums.exact_sum`, which keeps the division out of the Conv)."""
    exact = sum_kind(ctx, node)
    if divisor is None:
        return scale_bias(ctx, acc, node, rank, base, exact)
    if exact:
        acc = exact_sum(ctx, acc, exact, base)
    y = ctx.b.op("Div", [acc, ctx.b.const(float(divisor))], f"{base}_divided")
    return scale_bias(ctx, y, node, rank, base, None)
