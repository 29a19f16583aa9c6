"""ONNX export of a packed model: standard ops only, the same numbers as the model.

:func:`export_onnx` lowers a model exactly as :func:`onebit.engine.pack` does (same
graph, same fallbacks) and writes each graph op as standard ONNX ops (opset >= 18),
so that a stock runtime (onnxruntime's CPU provider) runs it:

- ``sign(x)`` (sign(0) = sign(-0.0) = sign(NaN) = +1) is ``Where(Less(x, 0), -1, +1)``;
  a packed value is its ``[N, C, H, W]`` (or ``[N, F]``) tensor of +-1 floats;
- a binary conv is ``Pad(constant pad_value)`` (or the conv's own zero ``pads``) then
  ``Conv`` with +-1 weights: integer sums of +-1, exact in float32 in any order (up to
  2^24), then ``Mul`` by the per-channel scale and ``Add`` of the bias -- the two float
  roundings of onebit's own arithmetic, so binary-layer outputs are bit-identical;
- +-1 weights are stored as bits (``uint8``, the packed file's compact layout: bit j of
  byte b is element 8 b + j of ``w[c_out].flatten()``, set for -1) and unpacked by a
  small ``BitShift`` / ``BitwiseAnd`` / ``Cast`` subgraph of initializers only, which
  onnxruntime folds once when it loads the model;
- thresholds (BatchNorm + sign folded) are comparisons of the exact accumulator,
  ``Where(dir > 0 ? acc < thr : acc > thr, -1, +1)``; a max pool of thresholded bits is a
  ``MaxPool`` of +-1 values flipped by the channel's direction (all-negative or any-negative);
- a k-bit layer (``bitplane_conv2d``, or ``quantize_int`` then ``qconv2d``) is the input
  quantizer's integers, a float ``Conv`` of the integer weight levels (exact), then the division,
  scale and bias; a quantized layer with a float operand (a float input, float weight levels) is a
  float ``Conv`` / ``MatMul`` whose sum is rounded as float sums are. Only sums known to be exact
  integers go through int32 (:meth:`_Exporter.sum_kind`); a NaN input gives NaN exactly where the
  model gives NaN (after a k-bit or float input; a sign makes it +1);
- float layers are their ONNX ops (``Conv``, ``Gemm``, ``BatchNormalization``, pools,
  activations, ``Concat``, ...), equal to torch's up to float rounding.

The batch dimension is dynamic; the spatial size is the example input's (flatten and
reshape targets, pooling of adaptive pools and coordinate maps are fixed by it).
``onnx`` and ``onnxruntime`` are optional dependencies (``pip install onebit[onnx]``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from onebit import io
from onebit.bits import unpack_bits
from onebit.engine import graph as G
from onebit.engine.fileformat import compact_weight

__all__ = ["export_onnx", "load_onnx", "OnnxModel", "OnnxExportError"]

DEFAULT_OPSET = 18

#: what an integer-valued graph value holds (:attr:`_Exporter.kind`; a value not named there is a float):
#: +-1 (never NaN: sign(NaN) = +1), or an input quantizer's integers (NaN where its input is NaN)
SIGNS, INTEGERS = "signs", "integers"

#: graph ops whose output holds +-1 (a packed value is its +-1 tensor in the graph)
_SIGN_OPS = frozenset(
    {
        "pack",
        "pack_features",
        "threshold_pack",
        "binary_conv2d_threshold",
        "binary_linear_threshold",
        "max_pool_bits",
        "sign",
        "sign_threshold",
    }
)
#: graph ops whose output holds values of their input(s) only
_SAME_VALUE_OPS = frozenset({"identity", "flatten", "reshape", "roll", "cat", "max_pool2d", "adaptive_max_pool2d"})


class OnnxExportError(ValueError):
    """A graph op or configuration that has no standard-ONNX form at the requested opset."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("ONNX export needs the 'onnx' package: pip install 'onebit[onnx]'") from error
    return onnx, helper, numpy_helper


def _pool_geometry(size: tuple[int, int], a: dict) -> list[dict]:
    """Per spatial dimension of a pool (``kernel_size``, ``stride``, ``padding``, ``dilation``,
    ``ceil_mode`` of ``a``) on an input of ``size``: torch's window count ``out``, whether torch's
    last window is the partial one that ``ceil_mode`` adds (``partial``), and, for ONNX's ceil
    formula to give exactly the floor formula's windows, the ``crop`` length of the input (None:
    all of it) and the ``end_pad`` (see :meth:`_Exporter.pool`)."""
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


class _Builder:
    """Collects ONNX nodes and initializers with unique names."""

    def __init__(self):
        _, self.helper, self.numpy_helper = _onnx()
        self.nodes: list = []
        self.initializers: list = []
        self.names: set[str] = set()
        self.constants: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        base = "".join(c if c.isalnum() or c in "_." else "_" for c in base) or "v"
        out, k = base, 1
        while out in self.names:
            out, k = f"{base}_{k}", k + 1
        self.names.add(out)
        return out

    def const(self, value, dtype=np.float32, base: str = "c") -> str:
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self.constants:
            return self.constants[key]
        name = self.name(base)
        self.initializers.append(self.numpy_helper.from_array(array, name))
        if key is not None:
            self.constants[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _channel(b: _Builder, values: torch.Tensor, rank: int, base: str, dtype=np.float32) -> str:
    """A per-channel constant shaped to broadcast over ``[N, C, ...]`` of the given rank."""
    array = values.detach().cpu().numpy().astype(dtype)
    return b.const(array.reshape([1, -1] + [1] * (rank - 2)), dtype, base)


class _Exporter:
    def __init__(self, packed, example: torch.Tensor):
        self.b = _Builder()
        self.graph = packed.graph
        self.nodes = {node["name"]: node for node in packed.graph["nodes"]}
        self.tensors = packed.named_graph_tensors()
        self.value: dict[str, str] = {}  # graph value -> ONNX tensor name
        self.shape: dict[str, tuple[int, ...]] = {}  # graph value -> logical shape (+-1 NCHW for packed)
        self.kind: dict[str, str] = {}  # graph value -> SIGNS / INTEGERS when integer-valued (else a float)
        self.run: dict[str, torch.Tensor] = {}
        self.example = example

    # -- helpers ------------------------------------------------------------

    def spatial_size(self, value: str) -> tuple[int, int]:
        """H, W of a graph value: a float ``[N, C, H, W]``, or a packed ``[N, H + 2 ph, W + 2 pw, G, Wg]``
        stored with its producer's padding (``padding`` of a ``pack``, ``out_padding`` of the others)."""
        if value in self.shape:
            return tuple(self.shape[value][2:])
        attrs = self.nodes[value]["attrs"]
        ph, pw = attrs["out_padding"] if "out_padding" in attrs else attrs["padding"]
        stored = self.run[value].shape
        return stored[1] - 2 * ph, stored[2] - 2 * pw

    def roles(self, node: dict) -> dict[str, torch.Tensor]:
        return {role: self.tensors[key] for role, key in node.get("tensors", {}).items()}

    def sign(self, x: str, base: str) -> str:
        b = self.b
        negative = b.op("Less", [x, b.const(0.0)], f"{base}_neg")
        return b.op("Where", [negative, b.const(-1.0), b.const(1.0)], base)

    def signs_where(self, negative: str, base: str) -> str:
        return self.b.op("Where", [negative, self.b.const(-1.0), self.b.const(1.0)], base)

    def bits_weight(self, node: dict, role: str, attrs: dict, base: str) -> str:
        """+-1 float weights from stored bits: ``1 - 2 * ((bits >> j) & 1)``, reshaped."""
        b = self.b
        compact = compact_weight(self.tensors[node["tensors"][role]], attrs)  # uint8 [Co, ceil(K / 8)]
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
        used = b.op(
            "Slice", [flat, b.const([0], np.int64), b.const([k], np.int64), b.const([1], np.int64)], f"{base}_used"
        )
        as_float = b.op("Cast", [used], f"{base}_float", to=self.b.helper.np_dtype_to_tensor_dtype(np.dtype("float32")))
        signs = b.op("Sub", [b.const(1.0), b.op("Mul", [as_float, b.const(2.0)], f"{base}_x2")], f"{base}_signs")
        return b.op("Reshape", [signs, b.const(shape, np.int64)], f"{base}_w")

    def weight(self, node: dict, attrs: dict, base: str) -> str:
        """A float-run layer's weight: bits (``weight_bits``) or float levels (``weight``)."""
        t = node.get("tensors", {})
        if "weight_bits" in t:
            return self.bits_weight(node, "weight_bits", attrs, base)
        w = self.tensors[t["weight"]]
        return self.b.const(w.numpy(), np.float32, f"{base}_w")

    def exact_sum(self, acc: str, kind: str, base: str) -> str:
        """An exact integer sum through int32 and back: the same values, and a runtime cannot
        fuse what follows (a ``BatchNormalization``, a division) into the ``Conv`` / ``MatMul``
        that computed it (onnxruntime's ConvBNFusion would turn +-1 weights into floats). Only
        for sums of integer operands (``kind``, :meth:`sum_kind`): the cast truncates anything
        else. A sum of :data:`INTEGERS` is NaN where it read a NaN input, as in the model: it stays
        NaN (the cast would make it -2^31); a sum of :data:`SIGNS` is never NaN."""
        b = self.b
        i32 = b.helper.np_dtype_to_tensor_dtype(np.dtype("int32"))
        f32 = b.helper.np_dtype_to_tensor_dtype(np.dtype("float32"))
        integer = b.op("Cast", [b.op("Cast", [acc], f"{base}_int", to=i32)], f"{base}_acc", to=f32)
        if kind == SIGNS:
            return integer
        return b.op("Where", [b.op("IsNaN", [acc], f"{base}_nan"), acc, integer], f"{base}_exact")

    def scale_bias(self, y: str, node: dict, rank: int, base: str, exact: str | None) -> str:
        """``fl32(fl32(y * scale) + bias)`` after a ``Conv`` / ``MatMul``, robust to runtime fusions.

        ``exact`` says what ``y`` is (:meth:`sum_kind`): the exact integer sum of integer operands,
        or (None) a float sum, rounded as float sums are. A runtime may fold a ``Mul`` or ``Add``
        that follows a ``Conv`` into its weights or its accumulation (onnxruntime's ConvMulFusion /
        ConvAddFusion / MatMulAddFusion), which changes the rounding. So the scale and bias go
        through float64, where they are exact: ``y * scale`` (a product of two float32) is exact in
        float64, and its cast is the one float32 rounding; ``y + bias`` (two float32) rounded to
        float64 then to float32 is the float32 sum (53 >= 2 * 24 + 2 bits: the double rounding is
        innocuous). With neither, an exact sum goes through :meth:`exact_sum`; a float sum is the
        layer's output as it is.
        """
        roles, b = self.roles(node), self.b
        scale, bias = roles.get("scale"), roles.get("bias")
        f32 = b.helper.np_dtype_to_tensor_dtype(np.dtype("float32"))
        f64 = b.helper.np_dtype_to_tensor_dtype(np.dtype("float64"))
        if scale is None and bias is None:
            return self.exact_sum(y, exact, base) if exact else y
        wide = b.op("Cast", [y], f"{base}_acc64", to=f64)
        if scale is not None:
            product = b.op(
                "Mul", [wide, _channel(b, scale.double(), rank, f"{base}_scale", np.float64)], f"{base}_scaled64"
            )
            y = b.op("Cast", [product], f"{base}_scaled", to=f32)
            if bias is not None:
                y = b.op("Add", [y, _channel(b, bias, rank, f"{base}_bias")], f"{base}_biased")
            return y
        total = b.op("Add", [wide, _channel(b, bias.double(), rank, f"{base}_bias", np.float64)], f"{base}_biased64")
        return b.op("Cast", [total], f"{base}_biased", to=f32)

    def threshold(self, acc: str, node: dict, rank: int, base: str) -> str:
        """+-1 from an exact accumulator: -1 where (dir > 0 ? acc < thr : acc > thr)."""
        b, roles = self.b, self.roles(node)
        thr = _channel(b, roles["thresholds"].double(), rank, f"{base}_thr", np.float64)
        pos = _channel(b, roles["direction"] > 0, rank, f"{base}_dir", np.bool_)
        neg = _channel(b, roles["direction"] < 0, rank, f"{base}_dirneg", np.bool_)
        acc64 = b.op("Cast", [acc], f"{base}_acc64", to=b.helper.np_dtype_to_tensor_dtype(np.dtype("float64")))
        lt = b.op("And", [b.op("Less", [acc64, thr], f"{base}_lt"), pos], f"{base}_pos_lt")
        gt = b.op("And", [b.op("Greater", [acc64, thr], f"{base}_gt"), neg], f"{base}_neg_gt")
        return self.signs_where(b.op("Or", [lt, gt], f"{base}_negative"), base)

    def conv(
        self,
        x: str,
        w: str,
        attrs: dict,
        base: str,
        *,
        explicit=None,
        pad_value=0.0,
        mode="zeros",
        bias: str | None = None,
    ) -> str:
        """``Conv`` of x with w; padding by the conv's zero ``pads`` or an explicit ``Pad`` first."""
        b = self.b
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
            onnx_mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
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

    def packed_conv_input(self, xp: str, attrs: dict) -> tuple[str, dict]:
        """The +-1 input of a binary conv and how to pad it (its layout's pad value)."""
        ph, pw = attrs["padding"]
        return self.value[xp], {"explicit": [pw, pw, ph, ph], "pad_value": float(attrs["pad_value"])}

    # -- the walk -----------------------------------------------------------

    def export(self) -> tuple[list[str], dict]:
        inp = self.graph["input"]
        self.value[inp["name"]] = "input"
        self.b.names.add("input")
        self.run[inp["name"]] = self.example
        self.shape[inp["name"]] = tuple(self.example.shape)
        for node in self.graph["nodes"]:
            self.emit(node)
        return [self.value[o] for o in self.graph["outputs"]], self.run

    def emit(self, node: dict) -> None:
        op, name = node["op"], node["name"]
        spec = G.OPS[op]
        attrs = G.attrs(node)
        out = spec.fn(self.roles(node), attrs, *[self.run[i] for i in node["inputs"]])  # shapes, from the engine
        self.run[name] = out
        if out.dtype != torch.int64:
            self.shape[name] = tuple(out.shape)
        xs = [self.value[i] for i in node["inputs"]]
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise OnnxExportError(f"graph op {op!r} (node {name!r}) has no ONNX form")
        self.value[name] = method(node, attrs, xs, name)
        kind = self.value_kind(node)
        if kind is not None:
            self.kind[name] = kind

    def value_kind(self, node: dict) -> str | None:
        """:data:`SIGNS` or :data:`INTEGERS` when a node's output is integer-valued, else None."""
        op = node["op"]
        if op in _SIGN_OPS:
            return SIGNS
        if op == "quantize_int":
            return INTEGERS
        if op in _SAME_VALUE_OPS:
            kinds = {self.kind.get(i) for i in node["inputs"]}
            return None if None in kinds else INTEGERS if INTEGERS in kinds else SIGNS
        return None

    # packing: +-1 floats
    def op_pack(self, node, a, xs, name):
        return self.sign(xs[0], name)

    def op_pack_features(self, node, a, xs, name):
        x = xs[0]
        if len(self.shape[node["inputs"][0]]) != 2:
            x = self.b.op("Reshape", [x, self.b.const([-1, a["features"]], np.int64)], f"{name}_2d")
        return self.sign(x, name)

    def _binary_conv_acc(self, node, a, xs, name):
        x, pad = self.packed_conv_input(node["inputs"][0], a)
        w = self.bits_weight(node, "weight", a, name)
        return self.conv(x, w, a, name, explicit=pad["explicit"], pad_value=pad["pad_value"])

    def op_binary_conv2d(self, node, a, xs, name):
        return self.scale_bias(self._binary_conv_acc(node, a, xs, name), node, 4, name, SIGNS)

    def op_binary_conv2d_threshold(self, node, a, xs, name):
        return self.threshold(self._binary_conv_acc(node, a, xs, name), node, 4, name)

    def op_threshold_pack(self, node, a, xs, name):
        return self.threshold(xs[0], node, len(self.shape[node["inputs"][0]]), name)

    def op_max_pool_bits(self, node, a, xs, name):
        # direction +1 channels: negative iff all are (max of +-1); direction -1: iff any is
        roles, c, g = self.roles(node), a["channels"], a["out_groups"]
        cg = c // g
        flips = torch.cat([unpack_bits(roles["or_mask"][k], cg) for k in range(g)])
        m = _channel(self.b, torch.where(flips, -1.0, 1.0), 4, f"{name}_flip")
        flipped = self.b.op("Mul", [xs[0], m], f"{name}_in")
        oph, opw = a["out_padding"]
        out = (self.run[name].shape[1] - 2 * oph, self.run[name].shape[2] - 2 * opw)  # the engine's pooled H, W
        pooled = self.pool(
            "MaxPool",
            flipped,
            a,
            self.spatial_size(node["inputs"][0]),
            out,
            f"{name}_max",
            dilations=list(a["dilation"]),
        )
        return self.b.op("Mul", [pooled, m], name)

    def _binary_linear_acc(self, node, a, xs, name):
        w = self.bits_weight(node, "weight", a, name)
        wt = self.b.op("Transpose", [w], f"{name}_wt", perm=[1, 0])
        return self.b.op("MatMul", [xs[0], wt], f"{name}_mm")

    def op_binary_linear(self, node, a, xs, name):
        return self.scale_bias(self._binary_linear_acc(node, a, xs, name), node, 2, name, SIGNS)

    def op_binary_linear_threshold(self, node, a, xs, name):
        return self.threshold(self._binary_linear_acc(node, a, xs, name), node, 2, name)

    # float layers
    def op_conv2d(self, node, a, xs, name):
        roles = self.roles(node)
        w = self.b.const(roles["weight"].numpy(), np.float32, f"{name}_w")
        bias = self.b.const(roles["bias"].numpy(), np.float32, f"{name}_b") if roles.get("bias") is not None else None
        return self.conv(
            xs[0],
            w,
            a,
            name,
            explicit=a["explicit_padding"],
            pad_value=a["pad_value"],
            mode=a["padding_mode"],
            bias=bias,
        )

    def op_qconv2d(self, node, a, xs, name):
        w = self.weight(node, a, name)
        y = self.conv(
            xs[0], w, a, name, explicit=a["explicit_padding"], pad_value=a["pad_value"], mode=a["padding_mode"]
        )
        return self.divided(y, a["input_divisor"], node, 4, name)

    def divided(self, acc: str, divisor: float | None, node: dict, rank: int, base: str) -> str:
        """``acc [/ divisor] * scale + bias``: an integer-input layer divides its sum first (in
        float32; an exact sum after :meth:`exact_sum`, which keeps the division out of the Conv)."""
        exact = self.sum_kind(node)
        if divisor is None:
            return self.scale_bias(acc, node, rank, base, exact)
        if exact:
            acc = self.exact_sum(acc, exact, base)
        y = self.b.op("Div", [acc, self.b.const(float(divisor))], f"{base}_divided")
        return self.scale_bias(y, node, rank, base, None)

    def sum_kind(self, node: dict) -> str | None:
        """What a quantized layer's sum is: :data:`SIGNS` or :data:`INTEGERS` when both operands
        are integer-valued (the input's kind; weight levels that are integers), so that the float
        ``Conv`` / ``MatMul`` computes the exact integer sum in any order; None when either is a float
        (a float input, float weight levels): the sum is a float, rounded as the runtime sums."""
        if node["op"] == "bitplane_conv2d":
            return INTEGERS  # the input quantizer's integers, the weight planes' integer levels
        if not self.integer_levels(node):
            return None
        return self.kind.get(node["inputs"][0])

    def integer_levels(self, node: dict) -> bool:
        """Whether a layer's weight levels are integers (+-1 bits, or float levels that are integers)."""
        tensors = node.get("tensors", {})
        if node["op"] == "bitplane_conv2d" or "weight_bits" in tensors:
            return True
        w = self.tensors[tensors["weight"]]
        return bool(torch.equal(w, torch.round(w)))

    def integers(self, x: str, kind: str, bits: int, clip: float, base: str) -> str:
        """An input quantizer's integers, op for op as :func:`onebit.engine.bitplanes.integer_input`."""
        b, n = self.b, float(2**bits - 1)
        if kind == "dorefa":
            clipped = b.op("Clip", [x, b.const(0.0), b.const(1.0)], f"{base}_clip")
            return b.op("Round", [b.op("Mul", [clipped, b.const(n)], f"{base}_scaled")], f"{base}_int")
        c = b.const(float(np.float32(clip)))
        clipped = b.op("Clip", [x, b.op("Neg", [c], f"{base}_negc"), c], f"{base}_clip")
        u = b.op(
            "Div",
            [b.op("Add", [b.op("Div", [clipped, c], f"{base}_unit"), b.const(1.0)], f"{base}_shift"), b.const(2.0)],
            f"{base}_u",
        )
        j = b.op(
            "Floor",
            [b.op("Add", [b.op("Mul", [u, b.const(n)], f"{base}_un"), b.const(0.5)], f"{base}_half")],
            f"{base}_j",
        )
        return b.op("Sub", [b.op("Mul", [j, b.const(2.0)], f"{base}_2j"), b.const(n)], f"{base}_int")

    def op_quantize_int(self, node, a, xs, name):
        return self.integers(xs[0], a["kind"], a["bits"], a["clip"], name)

    def op_dorefa_sym(self, node, a, xs, name):
        b, n = self.b, 2 ** a["bits"] - 1
        j = b.op(
            "Div",
            [
                b.op(
                    "Add",
                    [self.integers(xs[0], "dorefa_sym", a["bits"], a["clip"], f"{name}_q"), b.const(float(n))],
                    f"{name}_2j",
                ),
                b.const(2.0),
            ],
            f"{name}_j",
        )
        level = b.op("Sub", [b.op("Mul", [j, b.const(2.0 / n)], f"{name}_jn"), b.const(1.0)], f"{name}_level")
        return b.op("Mul", [level, b.const(float(np.float32(a["clip"])))], name)

    def op_bitplane_conv2d(self, node, a, xs, name):
        from onebit.bits import unpack_signs
        from onebit.engine.bitplanes import PlaneCode

        roles, b = self.roles(node), self.b
        code = PlaneCode(a["weight_kind"], a["weight_bits"])
        g, co, cg = a["groups"], a["out_channels"], a["in_channels"] // a["groups"]
        signs = unpack_signs(roles["weight"], cg).permute(0, 3, 1, 2)  # [G * P_w * Cog, Cg, KH, KW]
        planes = signs.reshape(g, code.planes, co // g, cg, *a["kernel_size"]).transpose(0, 1)
        levels = code.join(planes.reshape(code.planes, co, cg, *a["kernel_size"])).float()
        x = self.integers(xs[0], a["quantizer"], a["act_bits"], a["clip"], name)
        if node.get("linear"):
            w = b.const(levels[:, :, 0, 0].numpy(), np.float32, f"{name}_w")
            return self.divided(self._matmul(x, w, name), a["input_divisor"], node, 2, name)
        w = b.const(levels.numpy(), np.float32, f"{name}_w")
        return self.divided(self.conv(x, w, a, name), a["input_divisor"], node, 4, name)

    def ternary_weight(self, node: dict, attrs: dict, base: str) -> str:
        """The float levels ``[F, Out]`` (transposed for MatMul) of a 2-bit ternary weight, unpacked in the
        graph from the stored uint8 codes (``w + 1`` at bits ``2 (k % 4)`` of byte ``k // 4``)."""
        b = self.b
        codes = self.tensors[node["tensors"]["weight"]].numpy()  # uint8 [Out, ceil(F / 4)]
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
        f32 = b.helper.np_dtype_to_tensor_dtype(np.dtype("float32"))
        levels = b.op("Sub", [b.op("Cast", [used], f"{base}_float", to=f32), b.const(1.0)], f"{base}_levels")
        return b.op("Transpose", [levels], f"{base}_wt", perm=[1, 0])

    def op_ternary_linear(self, node, a, xs, name):
        """BitLinear, op for op as the kernels compute it (docs/engine.md): [RMSNorm,] s = 127 / max(max|x|,
        1e-5), x_int = clip(round(x s)), the exact sum as a float MatMul of integers (|acc| < 2^24),
        then fl(fl(fl(acc / s) * scale) + bias); a token holding a NaN or an infinity gives NaN."""
        b, roles = self.b, self.roles(node)
        f32 = b.helper.np_dtype_to_tensor_dtype(np.dtype("float32"))
        i32 = b.helper.np_dtype_to_tensor_dtype(np.dtype("int32"))
        x = xs[0]
        last = b.const([-1], np.int64)
        if a["norm"]:  # F.rms_norm without weight: x * rsqrt(mean(x^2) + eps)
            mean = b.op("ReduceMean", [b.op("Mul", [x, x], f"{name}_sq"), last], f"{name}_ms", keepdims=1)
            root = b.op("Sqrt", [b.op("Add", [mean, b.const(float(a["eps"]))], f"{name}_mse")], f"{name}_rms")
            x = b.op("Mul", [x, b.op("Reciprocal", [root], f"{name}_rrms")], f"{name}_normed")
        magnitude = b.op("ReduceMax", [b.op("Abs", [x], f"{name}_abs"), last], f"{name}_max", keepdims=1)
        s = b.op("Div", [b.const(127.0), b.op("Max", [magnitude, b.const(1e-5)], f"{name}_clamped")], f"{name}_s")
        q = b.op(
            "Clip",
            [b.op("Round", [b.op("Mul", [x, s], f"{name}_xs")], f"{name}_round"), b.const(-128.0), b.const(127.0)],
            f"{name}_q",
        )
        bad = b.op("Or", [b.op("IsNaN", [x], f"{name}_nan"), b.op("IsInf", [x], f"{name}_inf")], f"{name}_bad")
        bad_token = b.op("ReduceMax", [b.op("Cast", [bad], f"{name}_badf", to=f32), last], f"{name}_badrow", keepdims=1)
        finite = b.op("Equal", [bad_token, b.const(0.0)], f"{name}_finite")
        q = b.op("Where", [finite, q, b.const(0.0)], f"{name}_qfinite")
        acc = b.op("MatMul", [q, self.ternary_weight(node, a, name)], f"{name}_mm")
        # through int32 and back: keeps the division out of the MatMul (a runtime's fusions)
        acc = b.op("Cast", [b.op("Cast", [acc], f"{name}_int", to=i32)], f"{name}_acc", to=f32)
        y = b.op("Div", [acc, s], f"{name}_divided")
        if roles.get("scale") is not None:
            y = b.op("Mul", [y, b.const(roles["scale"].numpy(), np.float32, f"{name}_scale")], f"{name}_scaled")
        if roles.get("bias") is not None:
            y = b.op("Add", [y, b.const(roles["bias"].numpy(), np.float32, f"{name}_bias")], f"{name}_biased")
        return b.op("Where", [finite, y, b.const(float("nan"))], name)

    def op_linear(self, node, a, xs, name):
        roles = self.roles(node)
        w = self.b.const(roles["weight"].numpy(), np.float32, f"{name}_w")
        y = self._matmul(xs[0], w, name)
        if roles.get("bias") is not None:
            y = self.b.op("Add", [y, self.b.const(roles["bias"].numpy(), np.float32, f"{name}_b")], f"{name}_biased")
        return y

    def op_qlinear(self, node, a, xs, name):
        y = self._matmul(xs[0], self.weight(node, a, name), name)
        return self.divided(y, a["input_divisor"], node, 2, name)  # [1, F] constants broadcast over any [..., F]

    def _matmul(self, x, w, name):
        wt = self.b.op("Transpose", [w], f"{name}_wt", perm=[1, 0])
        return self.b.op("MatMul", [x, wt], f"{name}_mm")

    def op_batch_norm(self, node, a, xs, name):
        roles, c = self.roles(node), a["num_features"]
        weight = roles.get("weight") if roles.get("weight") is not None else torch.ones(c)
        bias = roles.get("bias") if roles.get("bias") is not None else torch.zeros(c)
        ins = [xs[0]] + [
            self.b.const(t.numpy(), np.float32, f"{name}_{k}")
            for k, t in (("w", weight), ("b", bias), ("mean", roles["running_mean"]), ("var", roles["running_var"]))
        ]
        return self.b.op("BatchNormalization", ins, name, epsilon=float(a["eps"]))

    def pool(self, op_type: str, x: str, a: dict, size: tuple, out: tuple, base: str, **attrs) -> str:
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
        b, dims = self.b, _pool_geometry(size, a)
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

    def op_max_pool2d(self, node, a, xs, name):
        return self.pool(
            "MaxPool",
            xs[0],
            a,
            self.shape[node["inputs"][0]][2:],
            self.shape[name][2:],
            name,
            dilations=list(a["dilation"]),
        )

    def op_avg_pool2d(self, node, a, xs, name):
        if a["divisor_override"] is not None:
            raise OnnxExportError(f"node {name!r}: AvgPool2d(divisor_override=...) has no ONNX form")
        return self.pool(
            "AveragePool",
            xs[0],
            a,
            self.shape[node["inputs"][0]][2:],
            self.shape[name][2:],
            name,
            count_include_pad=int(a["count_include_pad"]),
        )

    def _adaptive(self, node, a, xs, name, kind):
        h, w = self.shape[node["inputs"][0]][2:]
        oh, ow = a["output_size"]
        if (oh, ow) == (1, 1):
            return self.b.op(f"Global{kind}Pool", xs, name)
        if h % oh or w % ow:
            raise OnnxExportError(f"node {name!r}: adaptive pooling of {h}x{w} to {oh}x{ow} has no ONNX form")
        k = [h // oh, w // ow]
        return self.b.op(f"{kind}Pool", xs, name, kernel_shape=k, strides=k)

    def op_adaptive_avg_pool2d(self, node, a, xs, name):
        return self._adaptive(node, a, xs, name, "Average")

    def op_adaptive_max_pool2d(self, node, a, xs, name):
        return self._adaptive(node, a, xs, name, "Max")

    def _reshape_to(self, x, name, shape):
        return self.b.op("Reshape", [x, self.b.const([0, *shape[1:]], np.int64)], name)

    def op_flatten(self, node, a, xs, name):
        return self._reshape_to(xs[0], name, self.shape[name])

    def op_reshape(self, node, a, xs, name):
        return self._reshape_to(xs[0], name, self.shape[name])

    def op_identity(self, node, a, xs, name):
        return self.b.op("Identity", xs, name)

    def op_add(self, node, a, xs, name):
        if len(xs) == 1:
            return self.b.op("Add", [xs[0], self.b.const(a["other"] * a["alpha"])], name)
        y = xs[1]
        if a["alpha"] != 1.0:
            y = self.b.op("Mul", [y, self.b.const(a["alpha"])], f"{name}_alpha")
        return self.b.op("Add", [xs[0], y], name)

    def op_mul(self, node, a, xs, name):
        other = xs[1] if len(xs) == 2 else self.b.const(a["other"])
        return self.b.op("Mul", [xs[0], other], name)

    def op_div(self, node, a, xs, name):
        return self.b.op("Div", [xs[0], self.b.const(a["other"])], name)

    def op_roll(self, node, a, xs, name):
        shape = self.shape[node["inputs"][0]]
        dim = a["dim"] % len(shape)
        n = shape[dim]
        s = a["shifts"] % n if n else 0
        if s == 0:
            return self.b.op("Identity", xs, name)
        i64 = lambda v: self.b.const([v], np.int64)  # noqa: E731
        tail = self.b.op("Slice", [xs[0], i64(n - s), i64(n), i64(dim)], f"{name}_tail")
        head = self.b.op("Slice", [xs[0], i64(0), i64(n - s), i64(dim)], f"{name}_head")
        return self.b.op("Concat", [tail, head], name, axis=dim)

    def op_twist_mix(self, node, a, xs, name):
        from onebit.nn.twist import coordinate_maps

        cx, cy = coordinate_maps(self.run[node["inputs"][0]])
        gx = self.b.op("Mul", [xs[1], self.b.const(cx.numpy(), np.float32, f"{name}_X")], f"{name}_gx")
        gy = self.b.op("Mul", [xs[2], self.b.const(cy.numpy(), np.float32, f"{name}_Y")], f"{name}_gy")
        return self.b.op("Add", [self.b.op("Add", [xs[0], gx], f"{name}_x"), gy], name)

    def op_cat(self, node, a, xs, name):
        return self.b.op("Concat", xs, name, axis=a["dim"])

    def op_relu(self, node, a, xs, name):
        return self.b.op("Relu", xs, name)

    def op_relu6(self, node, a, xs, name):
        return self.b.op("Clip", [xs[0], self.b.const(0.0), self.b.const(6.0)], name)

    def op_leaky_relu(self, node, a, xs, name):
        return self.b.op("LeakyRelu", xs, name, alpha=float(a["negative_slope"]))

    def op_hardtanh(self, node, a, xs, name):
        return self.b.op("Clip", [xs[0], self.b.const(a["min_val"]), self.b.const(a["max_val"])], name)

    def op_prelu(self, node, a, xs, name):
        slope = self.roles(node)["weight"]
        rank = len(self.shape[node["inputs"][0]])
        if slope.numel() > 1:
            return self.b.op("PRelu", [xs[0], _channel(self.b, slope, rank, f"{name}_slope")], name)
        return self.b.op("PRelu", [xs[0], self.b.const(slope.numpy(), np.float32, f"{name}_slope")], name)

    def op_sigmoid(self, node, a, xs, name):
        return self.b.op("Sigmoid", xs, name)

    def op_tanh(self, node, a, xs, name):
        return self.b.op("Tanh", xs, name)

    def op_softmax(self, node, a, xs, name):
        return self.b.op("Softmax", xs, name, axis=a["dim"])

    def op_sign(self, node, a, xs, name):
        return self.sign(xs[0], name)

    def op_sign_threshold(self, node, a, xs, name):
        return self.threshold(xs[0], node, len(self.shape[node["inputs"][0]]), name)

    def op_dorefa(self, node, a, xs, name):
        levels = float(2 ** a["bits"] - 1)
        clipped = self.b.op("Clip", [xs[0], self.b.const(0.0), self.b.const(1.0)], f"{name}_clip")
        scaled = self.b.op("Mul", [clipped, self.b.const(levels)], f"{name}_scaled")
        return self.b.op("Div", [self.b.op("Round", [scaled], f"{name}_round"), self.b.const(levels)], name)


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    strict: bool = False,
) -> Any:
    """Write ``model`` (an eval-mode onebit/torch model, or a :class:`~onebit.engine.PackedModel`)
    as an ONNX file of standard ops; returns the ``onnx.ModelProto``.

    The model is lowered as :func:`onebit.engine.pack` lowers it (``strict`` as there), so
    binary layers give bit-identical outputs in onnxruntime and float layers equal ones up to
    float rounding. The file takes any batch size, 0 included; ``example_input`` may be an empty
    batch (its other dimensions fix the graph). Written atomically. Raises :class:`OnnxExportError`
    for an op with no standard-ONNX form at ``opset`` (>= 18).
    """
    onnx, helper, _ = _onnx()
    from onebit.engine.packed import PackedModel, pack

    if not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise OnnxExportError(f"export_onnx: opset must be an integer >= {DEFAULT_OPSET}, got {opset!r}")
    if isinstance(example_input, torch.Tensor) and example_input.dim() >= 1 and example_input.shape[0] == 0:
        # an empty batch: the graph is built on one zero sample (only the other dimensions fix it; the
        # batch dimension of the file is free, so it runs batch 0 as any other)
        example_input = torch.zeros((1, *example_input.shape[1:]), dtype=example_input.dtype)
    packed = model if isinstance(model, PackedModel) else pack(model, example_input, strict=strict)
    packed._check_input(example_input)
    exporter = _Exporter(packed, example_input)
    with torch.no_grad():
        outputs, run = exporter.export()
    in_shape = ["batch", *list(example_input.shape[1:])]
    float32 = helper.np_dtype_to_tensor_dtype(np.dtype("float32"))
    graph_outputs = []
    for k, (value, out) in enumerate(zip(packed.graph["outputs"], outputs)):
        name = "output" if len(outputs) == 1 else f"output_{k}"
        exporter.b.nodes.append(helper.make_node("Identity", [out], [name], name=f"{name}_identity"))
        shape = ["batch", *list(run[value].shape[1:])]
        graph_outputs.append(helper.make_tensor_value_info(name, float32, shape))
    graph = helper.make_graph(
        exporter.b.nodes,
        "onebit",
        [helper.make_tensor_value_info("input", float32, in_shape)],
        graph_outputs,
        initializer=exporter.b.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onebit")
    proto.ir_version = min(proto.ir_version, 9)  # readable by current onnxruntime releases
    onnx.checker.check_model(proto, full_check=True)
    io.atomic_write_bytes(path, proto.SerializeToString())
    return proto


class OnnxModel:
    """An ONNX file run by onnxruntime's CPU provider, called like a model: ``y = m(x)``
    (a float32 ``torch.Tensor`` in, ``torch.Tensor`` out, or a tuple for several outputs).

    An input the file cannot take raises :class:`onebit.engine.InputError` (a ``TypeError`` and a
    ``ValueError``) in one line naming the file: the shape it expects against the one it got, or
    onnxruntime's own message, on one line."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as error:  # pragma: no cover - exercised only without the extra
            raise ImportError("running ONNX files needs 'onnxruntime': pip install 'onebit[onnx]'") from error
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.path = os.fspath(path)
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: not a runnable ONNX model: {error}") from None
        first = self.session.get_inputs()[0]
        self.input = first.name
        #: the input's shape as the file declares it: an int, or a name (e.g. "batch") for a free dimension
        self.input_shape = list(first.shape)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: torch.Tensor):
        from onebit.engine.packed import InputError

        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            raise InputError(f"{self.path}: expected a float32 torch.Tensor input")
        got, expected = list(x.shape), "[" + ", ".join(str(d) for d in self.input_shape) + "]"
        if len(got) != len(self.input_shape) or any(
            isinstance(d, int) and d != n for d, n in zip(self.input_shape, got)
        ):
            raise InputError(f"{self.path}: expected an input of shape {expected}, got {got}")
        try:
            outs = self.session.run(self.outputs, {self.input: x.detach().contiguous().numpy()})
        except MemoryError:
            raise
        except Exception as error:  # onnxruntime raises its own exception types, with multi-line messages
            message = " ".join(str(error).split())
            raise InputError(
                f"{self.path}: onnxruntime cannot run the input of shape {got} (the file expects {expected}): {message}"
            ) from error
        tensors = tuple(torch.from_numpy(o) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    def __repr__(self) -> str:
        return f"OnnxModel({self.path!r})"


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> OnnxModel:
    """Load an ONNX file for onnxruntime's CPU provider (see :class:`OnnxModel`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(path)}: no such ONNX file")
    return OnnxModel(path, threads)
