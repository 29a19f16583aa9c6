"""Pools as ONNX nodes with exactly torch's windows (``ceil_mode`` included)."""

from __future__ import annotations

import numpy as np

from onebit.engine.onnx.context import ExportContext
from onebit.engine.onnx.errors import OnnxExportError


def pool_geometry(size: tuple[int, int], a: dict) -> list[dict]:
    """Per spatial dimension of a pool (``kernel_size``, ``stride``, ``padding``, ``dilation``,
    ``ceil_mode`` of ``a``) on an input of ``size``: torch's window count ``out``, whether torch's
    last window is the partial one that ``ceil_mode`` adds (``partial``), and, for ONNX's ceil
    formula to give exactly the floor formula's windows, the ``crop`` length of the input (None:
    all of it) and the ``end_pad`` (see :func:`pool`)."""
    dims = []
    for i, length in enumerate(size):
        k, s, p = a["kernel_size"][i], a["stride"][i], a["padding"][i]
        extent = a.get("dilation", [1, 1])[i] * (k - 1) + 1
        span = length + 2 * p - extent
        floor_out = span // s + 1
        out = floor_out
        if a["ceil_mode"]:
            out = -(-span // s) + 1
            if (out - 1) * s >= length + p:  # torch: the last window must start before the end padding
                out -= 1
        end = (floor_out - 1) * s + extent - p  # where the floor formula's last window ends (input coordinates)
        dims.append(
            {
                "out": out,
                "partial": out > floor_out,
                "padding": p,
                "crop": end if end < length else None,
                "end_pad": max(end - length, 0),
            }
        )
    return dims


def pool(ctx: ExportContext, op_type: str, x: str, a: dict, size: tuple, out: tuple, base: str, **attrs) -> str:
    """A ``MaxPool`` / ``AveragePool`` of torch's windows on an input of spatial ``size`` (``out``:
    the engine's pooled size, which torch's formula gives).

    torch's ``ceil_mode`` adds a last, partial window only where it starts inside the input or the
    start padding (``(out - 1) * stride < L + padding``); ONNX's formula (``ceil((L + 2 p - d (k - 1) - 1)
    / s) + 1``, opset 18, and onnx's shape inference) keeps one that starts in the end padding too,
    while onnxruntime's kernel drops it as torch does. So no node is written where the two differ:
    per dimension, torch's windows are the floor formula's, or those plus one partial window, which
    ONNX's ceil formula gives exactly. ``ceil_mode`` is set only when some dimension has the partial
    window; a dimension without it then gets an exact fit, the input cropped after its last window's
    end, or that window's end as the end padding (never more than ``padding``), so that ceil and
    floor agree there. The windows, their elements and their divisors are torch's."""
    b, dims = ctx.b, pool_geometry(size, a)
    ceil = any(d["partial"] for d in dims)
    pads_end = []
    for axis, d in zip((2, 3), dims):
        end_pad, crop = (d["end_pad"], d["crop"]) if ceil and not d["partial"] else (d["padding"], None)
        if crop is not None:
            x = b.op(
                "Slice",
                [x, b.const([0], np.int64), b.const([crop], np.int64), b.const([axis], np.int64)],
                f"{base}_crop{axis}",
            )
        pads_end.append(end_pad)
    pads = [dims[0]["padding"], dims[1]["padding"], *pads_end]
    if [d["out"] for d in dims] != list(out):  # pragma: no cover - torch's formula, as the engine computed it
        raise OnnxExportError(f"'{base}': pooled size {[d['out'] for d in dims]} is not the engine's {list(out)}")
    return b.op(
        op_type,
        [x],
        base,
        kernel_shape=list(a["kernel_size"]),
        strides=list(a["stride"]),
        pads=pads,
        ceil_mode=int(ceil),
        **attrs,
    )
