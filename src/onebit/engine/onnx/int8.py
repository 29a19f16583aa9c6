"""The int8 ops' ONNX forms (:mod:`onebit.engine.graph.int8`), op for op as the model computes them:
``x_int = Clip(Round(x * s), -127, 127)`` (``Round`` is half to even, as torch's), a float ``Conv`` /
``MatMul`` of the integers and the int8 weight (stored as int8, cast to float: the sum is exact while
``taps * 127^2 < 2^24``), kept exact through int32, then ``/ s``, ``* scale`` and ``+ bias``."""

from __future__ import annotations

import numpy as np

from onebit.engine.onnx.context import INTEGERS, Emitter, ExportContext
from onebit.engine.onnx.products import conv, matmul
from onebit.engine.onnx.sums import exact_sum, scale_bias


def _integers(ctx: ExportContext, x: str, divisor: float, base: str) -> str:
    b = ctx.b
    rounded = b.op("Round", [b.op("Mul", [x, b.const(float(divisor))], f"{base}_xs")], f"{base}_round")
    return b.op("Clip", [rounded, b.const(-127.0), b.const(127.0)], f"{base}_int")


def _weight(ctx: ExportContext, node: dict, base: str) -> str:
    """The int8 weight as an int8 initializer, cast to float32 in the graph."""
    b = ctx.b
    stored = b.const(ctx.roles(node)["weight"].numpy(), np.int8, f"{base}_w8")
    return b.op("Cast", [stored], f"{base}_w", to=b.tensor_type("float32"))


def _divided(ctx: ExportContext, acc: str, node: dict, a: dict, rank: int, base: str) -> str:
    y = ctx.b.op("Div", [exact_sum(ctx, acc, INTEGERS, base), ctx.b.const(float(a["divisor"]))], f"{base}_divided")
    return scale_bias(ctx, y, node, rank, base, None)


def int8_integers(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return _integers(ctx, xs[0], a["divisor"], name)


def int8_quantize(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``x_int / s``."""
    return ctx.b.op("Div", [_integers(ctx, xs[0], a["divisor"], name), ctx.b.const(float(a["divisor"]))], name)


def int8_conv2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    acc = conv(ctx, _integers(ctx, xs[0], a["divisor"], name), _weight(ctx, node, name), a, name)
    return _divided(ctx, acc, node, a, 4, name)


def int8_linear(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    acc = matmul(ctx, _integers(ctx, xs[0], a["divisor"], name), _weight(ctx, node, name), name)
    return _divided(ctx, acc, node, a, 2, name)


EMITTERS: dict[str, Emitter] = {
    "int8_integers": int8_integers,
    "int8_quantize": int8_quantize,
    "int8_conv2d": int8_conv2d,
    "int8_linear": int8_linear,
}
#: the ops whose output is integer-valued
KINDS: dict[str, str] = {"int8_integers": INTEGERS}
