"""The quantized ops' ONNX forms: signs, input quantizers, k-bit and ternary layers, float-run quantized
layers.

A k-bit layer is its input quantizer's integers (:mod:`~onebit.engine.onnx.levels`), a float ``Conv`` /
``MatMul`` of integer weight levels (an exact sum), then the division, scale and bias; BitLinear's
``ternary_linear`` is its absmax int8 tokens times the 2-bit codes unpacked in the graph, op for op as
the kernels compute it.
"""

from __future__ import annotations

import numpy as np

from onebit.bits import unpack_signs
from onebit.engine.bitplanes import PlaneCode
from onebit.engine.onnx.context import INTEGERS, SIGNS, Emitter, ExportContext
from onebit.engine.onnx.levels import divided, integers
from onebit.engine.onnx.products import conv, matmul, stored_weight
from onebit.engine.onnx.signs import sign as sign_of
from onebit.engine.onnx.signs import threshold


def sign(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return sign_of(ctx, xs[0], name)


def sign_threshold(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return threshold(ctx, xs[0], node, len(ctx.input_shape(node)), name)


def quantize_int(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    return integers(ctx, xs[0], a["kind"], a["bits"], a["clip"], name)


def dorefa(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``round(clip(x, 0, 1) n) / n``, ``n = 2^bits - 1``."""
    b, levels = ctx.b, float(2 ** a["bits"] - 1)
    clipped = b.op("Clip", [xs[0], b.const(0.0), b.const(1.0)], f"{name}_clip")
    scaled = b.op("Mul", [clipped, b.const(levels)], f"{name}_scaled")
    return b.op("Div", [b.op("Round", [scaled], f"{name}_round"), b.const(levels)], name)


def dorefa_sym(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """``c ((2 j / n) - 1)`` of the symmetric quantizer's level ``j = (q + n) / 2`` (``q`` its integers)."""
    b, n = ctx.b, 2 ** a["bits"] - 1
    q = integers(ctx, xs[0], "dorefa_sym", a["bits"], a["clip"], f"{name}_q")
    j = b.op("Div", [b.op("Add", [q, b.const(float(n))], f"{name}_2j"), b.const(2.0)], f"{name}_j")
    level = b.op("Sub", [b.op("Mul", [j, b.const(2.0 / n)], f"{name}_jn"), b.const(1.0)], f"{name}_level")
    return b.op("Mul", [level, b.const(float(np.float32(a["clip"])))], name)


def qconv2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """A quantized conv run in float: ``Conv`` of its stored weight, ``[/ divisor] * scale + bias``."""
    w = stored_weight(ctx, node, a, name)
    y = conv(ctx, xs[0], w, a, name, explicit=a["explicit_padding"], pad_value=a["pad_value"], mode=a["padding_mode"])
    return divided(ctx, y, a["input_divisor"], node, 4, name)


def qlinear(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """A quantized linear layer run in float; ``[1, F]`` constants broadcast over any ``[..., F]``."""
    y = matmul(ctx, xs[0], stored_weight(ctx, node, a, name), name)
    return divided(ctx, y, a["input_divisor"], node, 2, name)


def bitplane_conv2d(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """A k-bit layer: the input quantizer's integers, ``Conv`` (or ``MatMul``) of the weight's integer
    levels joined from their bit planes, then the division, scale and bias."""
    roles, b = ctx.roles(node), ctx.b
    code = PlaneCode(a["weight_kind"], a["weight_bits"])
    g, co, cg = a["groups"], a["out_channels"], a["in_channels"] // a["groups"]
    signs = unpack_signs(roles["weight"], cg).permute(0, 3, 1, 2)  # [G * P_w * Cog, Cg, KH, KW]
    planes = signs.reshape(g, code.planes, co // g, cg, *a["kernel_size"]).transpose(0, 1)
    levels = code.join(planes.reshape(code.planes, co, cg, *a["kernel_size"])).float()
    x = integers(ctx, xs[0], a["quantizer"], a["act_bits"], a["clip"], name)
    if node.get("linear"):
        w = b.const(levels[:, :, 0, 0].numpy(), np.float32, f"{name}_w")
        return divided(ctx, matmul(ctx, x, w, name), a["input_divisor"], node, 2, name)
    w = b.const(levels.numpy(), np.float32, f"{name}_w")
    return divided(ctx, conv(ctx, x, w, a, name), a["input_divisor"], node, 4, name)


def ternary_weight(ctx: ExportContext, node: dict, attrs: dict, base: str) -> str:
    """The float levels ``[F, Out]`` (transposed for MatMul) of a 2-bit ternary weight, unpacked in the
    graph from the stored uint8 codes (``w + 1`` at bits ``2 (k % 4)`` of byte ``k // 4``)."""
    b = ctx.b
    codes = ctx.tensors[node["tensors"]["weight"]].numpy()  # uint8 [Out, ceil(F / 4)]
    out, nbytes = codes.shape
    stored = b.const(codes.reshape(out, nbytes, 1), np.uint8, f"{base}_codes")
    shifts = b.const(np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4), np.uint8)
    shifted = b.op("BitShift", [stored, shifts], f"{base}_shift", direction="RIGHT")
    code = b.op("BitwiseAnd", [shifted, b.const(np.full((1, 1, 1), 3), np.uint8)], f"{base}_code")
    flat = b.op("Reshape", [code, b.const([out, nbytes * 4], np.int64)], f"{base}_flat")
    used = b.op(
        "Slice",
        [flat, b.const([0], np.int64), b.const([attrs["in_features"]], np.int64), b.const([1], np.int64)],
        f"{base}_used",
    )
    levels = b.op(
        "Sub", [b.op("Cast", [used], f"{base}_float", to=b.tensor_type("float32")), b.const(1.0)], f"{base}_levels"
    )
    return b.op("Transpose", [levels], f"{base}_wt", perm=[1, 0])


def ternary_linear(ctx: ExportContext, node: dict, a: dict, xs: list[str], name: str) -> str:
    """BitLinear, op for op as the kernels compute it (docs/engine.md): [RMSNorm,] s = 127 / max(max|x|,
    1e-5), x_int = clip(round(x s)), the exact sum as a float MatMul of integers (|acc| < 2^24),
    then fl(fl(fl(acc / s) * scale) + bias); a token holding a NaN or an infinity gives NaN."""
    b, roles = ctx.b, ctx.roles(node)
    f32 = b.tensor_type("float32")
    x = xs[0]
    last = b.const([-1], np.int64)
    if a["norm"]:  # F.rms_norm without weight: x * rsqrt(mean(x^2) + eps)
        mean = b.op("ReduceMean", [b.op("Mul", [x, x], f"{name}_sq"), last], f"{name}_ms", keepdims=1)
        root = b.op("Sqrt", [b.op("Add", [mean, b.const(float(a["eps"]))], f"{name}_mse")], f"{name}_rms")
        x = b.op("Mul", [x, b.op("Reciprocal", [root], f"{name}_rrms")], f"{name}_normed")
    magnitude = b.op("ReduceMax", [b.op("Abs", [x], f"{name}_abs"), last], f"{name}_max", keepdims=1)
    s = b.op("Div", [b.const(127.0), b.op("Max", [magnitude, b.const(1e-5)], f"{name}_clamped")], f"{name}_s")
    rounded = b.op("Round", [b.op("Mul", [x, s], f"{name}_xs")], f"{name}_round")
    q = b.op("Clip", [rounded, b.const(-128.0), b.const(127.0)], f"{name}_q")
    bad = b.op("Or", [b.op("IsNaN", [x], f"{name}_nan"), b.op("IsInf", [x], f"{name}_inf")], f"{name}_bad")
    bad_token = b.op("ReduceMax", [b.op("Cast", [bad], f"{name}_badf", to=f32), last], f"{name}_badrow", keepdims=1)
    finite = b.op("Equal", [bad_token, b.const(0.0)], f"{name}_finite")
    q = b.op("Where", [finite, q, b.const(0.0)], f"{name}_qfinite")
    acc = b.op("MatMul", [q, ternary_weight(ctx, node, a, name)], f"{name}_mm")
    # through int32 and back: keeps the division out of the MatMul (a runtime's fusions)
    acc = b.op("Cast", [b.op("Cast", [acc], f"{name}_int", to=b.tensor_type("int32"))], f"{name}_acc", to=f32)
    y = b.op("Div", [acc, s], f"{name}_divided")
    if roles.get("scale") is not None:
        y = b.op("Mul", [y, b.const(roles["scale"].numpy(), np.float32, f"{name}_scale")], f"{name}_scaled")
    if roles.get("bias") is not None:
        y = b.op("Add", [y, b.const(roles["bias"].numpy(), np.float32, f"{name}_bias")], f"{name}_biased")
    return b.op("Where", [finite, y, b.const(float("nan"))], name)


EMITTERS: dict[str, Emitter] = {
    "sign": sign,
    "sign_threshold": sign_threshold,
    "quantize_int": quantize_int,
    "dorefa": dorefa,
    "dorefa_sym": dorefa_sym,
    "qconv2d": qconv2d,
    "qlinear": qlinear,
    "bitplane_conv2d": bitplane_conv2d,
    "ternary_linear": ternary_linear,
}
#: the ops whose output is integer-valued (the others give floats)
KINDS: dict[str, str] = {"sign": SIGNS, "sign_threshold": SIGNS, "quantize_int": INTEGERS}
