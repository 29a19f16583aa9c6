"""Sums of products as ONNX nodes: ``Conv`` (with the conv's padding) and ``MatMul`` of a layer's weight."""

from __future__ import annotations

import numpy as np

from onebit.engine.onnx.context import ExportContext
from onebit.engine.onnx.errors import OnnxExportError
from onebit.engine.onnx.signs import bits_weight

#: torch's padding_mode -> ONNX Pad's mode (circular has none at opset 18)
PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge"}


def conv(
    ctx: ExportContext,
    x: str,
    w: str,
    attrs: dict,
    base: str,
    *,
    explicit: list[int] | None = None,
    pad_value: float = 0.0,
    mode: str = "zeros",
    bias: str | None = None,
) -> str:
    """``Conv(x, w [, bias])`` with ``attrs``' stride, dilation and groups. Zero padding is the conv's own
    ``pads`` (``explicit`` [left, right, top, bottom], else ``attrs["padding"]``); any other (a constant
    ``pad_value``, reflect, replicate) is a ``Pad`` node first."""
    b = ctx.b
    if explicit is None:
        ph, pw = attrs["padding"]
        explicit = [pw, pw, ph, ph]  # left, right, top, bottom
    left, right, top, bottom = explicit
    pads = [top, left, bottom, right]
    if mode == "zeros" and pad_value == 0.0:
        conv_pads = pads
    else:
        if mode == "circular":
            raise OnnxExportError(f"'{base}': padding_mode='circular' has no ONNX Pad mode at opset 18")
        onnx_mode = PAD_MODES[mode]
        inputs = [x, b.const([0, 0, top, left, 0, 0, bottom, right], np.int64)]
        if onnx_mode == "constant":
            inputs.append(b.const(float(pad_value)))
        x = b.op("Pad", inputs, f"{base}_pad", mode=onnx_mode)
        conv_pads = [0, 0, 0, 0]
    return b.op(
        "Conv",
        [x, w] + ([bias] if bias else []),
        f"{base}_conv",
        pads=conv_pads,
        strides=list(attrs["stride"]),
        dilations=list(attrs["dilation"]),
        group=int(attrs["groups"]),
        kernel_shape=list(attrs["kernel_size"]),
    )


def matmul(ctx: ExportContext, x: str, w: str, base: str) -> str:
    """``x @ w.T`` for a weight ``[Out, F]``: a ``MatMul`` over the last dimension of any ``[..., F]``."""
    wt = ctx.b.op("Transpose", [w], f"{base}_wt", perm=[1, 0])
    return ctx.b.op("MatMul", [x, wt], f"{base}_mm")


def stored_weight(ctx: ExportContext, node: dict, attrs: dict, base: str) -> str:
    """A quantized layer's weight as the graph stores it: +-1 from bits (``weight_bits``) or float levels
    (``weight``)."""
    tensors = node.get("tensors", {})
    if "weight_bits" in tensors:
        return bits_weight(ctx, node, "weight_bits", attrs, base)
    return ctx.b.const(ctx.tensors[tensors["weight"]].numpy(), np.float32, f"{base}_w")
