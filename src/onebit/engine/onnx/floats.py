"""The float ops' ONNX forms: torch's layers and functions as their ONNX ops (``Conv``, ``MatMul``,
``BatchNormalization``, pools, activations, ``Concat``, ...), equal to torch's up to float rounding.

Shapes are the example input's: flatten and reshape targets, adaptive pools' windows and the
coordinate maps of twist_mix are fixed by it (the batch dimension stays free).
"""

from __future__ import annotations

import numpy as np
import torch

from onebit.engine.onnx.builder import channel_const
from onebit.engine.onnx.context import AS_INPUTS, Emitter, ExportContext
from onebit.engine.onnx.errors import OnnxExportError
from onebit.engine.onnx.pooling import pool
from onebit.engine.onnx.products import conv, matmul
from onebit.nn.twist import coordinate_maps


def conv2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    roles, b = ctx.roles(node), ctx.b
    w = b.const(roles["weight"].numpy(), np.float32, f"{name}_w")
    bias = b.const(roles["bias"].numpy(), np.float32, f"{name}_b") if roles.get("bias") is not None else None
    return conv(
        ctx,
        xs[0],
        w,
        a,
        name,
        explicit=a["explicit_padding"],
        pad_value=a["pad_value"],
        mode=a["padding_mode"],
        bias=bias,
    )


def linear(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    roles, b = ctx.roles(node), ctx.b
    y = matmul(ctx, xs[0], b.const(roles["weight"].numpy(), np.float32, f"{name}_w"), name)
    if roles.get("bias") is not None:
        y = b.op("Add", [y, b.const(roles["bias"].numpy(), np.float32, f"{name}_b")], f"{name}_biased")
    return y


def batch_norm(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``BatchNormalization`` with the running statistics (weight 1 and bias 0 when the layer has none)."""
    roles, c = ctx.roles(node), a["num_features"]
    weight = roles.get("weight") if roles.get("weight") is not None else torch.ones(c)
    bias = roles.get("bias") if roles.get("bias") is not None else torch.zeros(c)
    ins = [xs[0]] + [
        ctx.b.const(t.numpy(), np.float32, f"{name}_{k}")
        for k, t in (("w", weight), ("b", bias), ("mean", roles["running_mean"]), ("var", roles["running_var"]))
    ]
    return ctx.b.op("BatchNormalization", ins, name, epsilon=float(a["eps"]))


def max_pool2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    size, out = ctx.input_shape(node)[2:], ctx.shape[name][2:]
    return pool(ctx, "MaxPool", xs[0], a, size, out, name, dilations=list(a["dilation"]))


def avg_pool2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    if a["divisor_override"] is not None:
        raise OnnxExportError(f"node {name!r}: AvgPool2d(divisor_override=...) has no ONNX form")
    size, out = ctx.input_shape(node)[2:], ctx.shape[name][2:]
    return pool(ctx, "AveragePool", xs[0], a, size, out, name, count_include_pad=int(a["count_include_pad"]))


def _adaptive_pool(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str, kind: str) -> str:
    """A global pool to 1 x 1, else equal windows (an output size that divides the input's)."""
    h, w = ctx.input_shape(node)[2:]
    oh, ow = a["output_size"]
    if (oh, ow) == (1, 1):
        return ctx.b.op(f"Global{kind}Pool", xs, name)
    if h % oh or w % ow:
        raise OnnxExportError(f"node {name!r}: adaptive pooling of {h}x{w} to {oh}x{ow} has no ONNX form")
    k = [h // oh, w // ow]
    return ctx.b.op(f"{kind}Pool", xs, name, kernel_shape=k, strides=k)


def adaptive_avg_pool2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return _adaptive_pool(ctx, node, a, xs, name, "Average")


def adaptive_max_pool2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return _adaptive_pool(ctx, node, a, xs, name, "Max")


def reshape(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``Reshape`` to the engine's output shape, the batch dimension kept (``0``); also ``flatten``."""
    return ctx.b.op("Reshape", [xs[0], ctx.b.const([0, *ctx.shape[name][1:]], np.int64)], name)


def identity(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Identity", xs, name)


def add(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``x + alpha * other`` (a value, or a constant ``other``)."""
    b = ctx.b
    if len(xs) == 1:
        return b.op("Add", [xs[0], b.const(a["other"] * a["alpha"])], name)
    y = xs[1]
    if a["alpha"] != 1.0:
        y = b.op("Mul", [y, b.const(a["alpha"])], f"{name}_alpha")
    return b.op("Add", [xs[0], y], name)


def mul(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    other = xs[1] if len(xs) == 2 else ctx.b.const(a["other"])
    return ctx.b.op("Mul", [xs[0], other], name)


def div(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Div", [xs[0], ctx.b.const(a["other"])], name)


def roll(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``torch.roll`` along one dimension: the last ``shifts`` elements, then the others (``Concat``)."""
    b, shape = ctx.b, ctx.input_shape(node)
    dim = a["dim"] % len(shape)
    n = shape[dim]
    s = a["shifts"] % n if n else 0
    if s == 0:
        return b.op("Identity", xs, name)

    def i64(v: int) -> str:
        return b.const([v], np.int64)

    tail = b.op("Slice", [xs[0], i64(n - s), i64(n), i64(dim)], f"{name}_tail")
    head = b.op("Slice", [xs[0], i64(0), i64(n - s), i64(dim)], f"{name}_head")
    return b.op("Concat", [tail, head], name, axis=dim)


def twist_mix(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``x + gx * X + gy * Y`` with the coordinate maps ``X``, ``Y`` of the example's spatial size."""
    b = ctx.b
    cx, cy = coordinate_maps(ctx.run[node["inputs"][0]])
    gx = b.op("Mul", [xs[1], b.const(cx.numpy(), np.float32, f"{name}_X")], f"{name}_gx")
    gy = b.op("Mul", [xs[2], b.const(cy.numpy(), np.float32, f"{name}_Y")], f"{name}_gy")
    return b.op("Add", [b.op("Add", [xs[0], gx], f"{name}_x"), gy], name)


def cat(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Concat", xs, name, axis=a["dim"])


def relu(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Relu", xs, name)


def relu6(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Clip", [xs[0], ctx.b.const(0.0), ctx.b.const(6.0)], name)


def leaky_relu(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("LeakyRelu", xs, name, alpha=float(a["negative_slope"]))


def hardtanh(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Clip", [xs[0], ctx.b.const(a["min_val"]), ctx.b.const(a["max_val"])], name)


def prelu(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``PRelu`` with one slope, or one per channel (dimension 1, as torch's)."""
    slope = ctx.roles(node)["weight"]
    if slope.numel() > 1:
        slopes = channel_const(ctx.b, slope, len(ctx.input_shape(node)), f"{name}_slope")
        return ctx.b.op("PRelu", [xs[0], slopes], name)
    return ctx.b.op("PRelu", [xs[0], ctx.b.const(slope.numpy(), np.float32, f"{name}_slope")], name)


def sigmoid(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Sigmoid", xs, name)


def tanh(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Tanh", xs, name)


def softmax(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return ctx.b.op("Softmax", xs, name, axis=a["dim"])


EMITTERS: dict[str, Emitter] = {
    "conv2d": conv2d,
    "linear": linear,
    "batch_norm": batch_norm,
    "max_pool2d": max_pool2d,
    "avg_pool2d": avg_pool2d,
    "adaptive_avg_pool2d": adaptive_avg_pool2d,
    "adaptive_max_pool2d": adaptive_max_pool2d,
    "flatten": reshape,
    "reshape": reshape,
    "identity": identity,
    "add": add,
    "mul": mul,
    "div": div,
    "roll": roll,
    "twist_mix": twist_mix,
    "cat": cat,
    "relu": relu,
    "relu6": relu6,
    "leaky_relu": leaky_relu,
    "hardtanh": hardtanh,
    "prelu": prelu,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "softmax": softmax,
}
#: the ops whose output holds values of their inputs only (integer-valued where those are)
KINDS: dict[str, str] = {
    op: AS_INPUTS for op in ("identity", "flatten", "reshape", "roll", "cat", "max_pool2d", "adaptive_max_pool2d")
}
