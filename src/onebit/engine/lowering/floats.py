"""Float modules, functions and tensor methods as graph ops, run as the model runs them on
copies of its parameters.

:data:`EMITTERS` maps a float module's exact type to ``emitter(low, node, m, x) -> value``;
:data:`FUNCTIONS` and :data:`METHODS` map an fx ``call_function`` target and a ``call_method``
name to ``emitter(low, node) -> value`` (None when the node computes no tensor).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from onebit import quant
from onebit.engine.lowering.attrs import conv_attrs, float_conv_attrs, float_copy, pair
from onebit.engine.lowering.operands import quantize
from onebit.engine.lowering.state import Lowering
from onebit.math import sign as onebit_sign
from onebit.nn import functional as QF
from onebit.nn.layers import QActivation
from onebit.tracing import is_sign_threshold

# -- 1-d convs ----------------------------------------------------------------


def conv1d_as_2d(low: Lowering, node: fx.Node, m: nn.Conv1d, x: str, pad_value: float) -> tuple[str, dict]:
    """``x`` reshaped to ``[N, C, 1, L]`` and the attributes of the ``1 x k`` 2-d conv a 1-d conv is
    (its padding is ``[0, before]``: callers check that ``before == after`` or say otherwise)."""
    pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
    x2d = low.emit(f"{node.name}_2d", "reshape", [x], {"shape": [int(m.in_channels), 1, -1]})
    return x2d, conv_attrs(m, (1, m.kernel_size[0]), (1, m.stride[0]), (0, pad[0]), (1, m.dilation[0]), pad_value)


def conv1d_float_attrs(low: Lowering, node: fx.Node, m: nn.Conv1d, x: str, pad_value: float) -> tuple[str, dict]:
    """:func:`conv1d_as_2d` with the explicit padding and padding mode of a ``conv2d`` / ``qconv2d``."""
    pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
    x2d, conv = conv1d_as_2d(low, node, m, x, pad_value)
    return x2d, {
        **conv,
        "padding": conv["padding"] if pad[0] == pad[1] else "same",
        "explicit_padding": [int(pad[0]), int(pad[1]), 0, 0],
        "padding_mode": m.padding_mode,
    }


def to_1d(low: Lowering, node: fx.Node, m: nn.Module, y: str) -> str:
    """The 2-d conv node just emitted as a 1-d conv: its output in the layout torch's conv1d
    gives, reshaped to ``[N, C_out, L]``."""
    low.nodes[-1]["conv1d"] = True  # its output takes the layout torch's conv1d gives
    return low.emit(f"{node.name}_1d", "reshape", [y], {"shape": [int(m.out_channels), -1]})


# -- float modules: emitter(lowering, node, module, input value) -> value -----


def _op(op: str, attrs=lambda m: {}):
    """The emitter of a module that is one graph op with attributes ``attrs(m)`` and no tensors."""

    def emitter(low: Lowering, node: fx.Node, m: nn.Module, x: str) -> str:
        return low.emit(node.name, op, [x], attrs(m), module=node.target)

    return emitter


def _emit_max_pool(low: Lowering, node: fx.Node, m: nn.MaxPool2d, x: str) -> str:
    if m.return_indices:
        raise low.unsupported(node, "return_indices=True")
    stride = m.stride if m.stride is not None else m.kernel_size
    attrs = {
        "kernel_size": pair(m.kernel_size),
        "stride": pair(stride),
        "padding": pair(m.padding),
        "dilation": pair(m.dilation),
        "ceil_mode": bool(m.ceil_mode),
    }
    return low.emit(node.name, "max_pool2d", [x], attrs, module=node.target)


def _emit_avg_pool(low: Lowering, node: fx.Node, m: nn.AvgPool2d, x: str) -> str:
    stride = m.stride if m.stride is not None else m.kernel_size
    attrs = {
        "kernel_size": pair(m.kernel_size),
        "stride": pair(stride),
        "padding": pair(m.padding),
        "ceil_mode": bool(m.ceil_mode),
        "count_include_pad": bool(m.count_include_pad),
        "divisor_override": m.divisor_override,
    }
    return low.emit(node.name, "avg_pool2d", [x], attrs, module=node.target)


def _emit_adaptive_pool(low: Lowering, node: fx.Node, m: nn.Module, x: str) -> str:
    out = low.shape(node)
    if out is None or len(out) != 4:
        raise low.unsupported(node, "expected a 4-D output")
    if isinstance(m, nn.AdaptiveMaxPool2d) and m.return_indices:
        raise low.unsupported(node, "return_indices=True")
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
    if any(s is None for s in size):
        size = tuple(out[2 + i] if s is None else s for i, s in enumerate(size))
    op = "adaptive_avg_pool2d" if isinstance(m, nn.AdaptiveAvgPool2d) else "adaptive_max_pool2d"
    return low.emit(node.name, op, [x], {"output_size": pair(size)}, module=node.target)


def _emit_batch_norm(low: Lowering, node: fx.Node, m: nn.Module, x: str) -> str:
    if m.running_mean is None or m.running_var is None:
        raise low.unsupported(node, "BatchNorm without running statistics (track_running_stats=False)")
    return low.emit(
        node.name,
        "batch_norm",
        [x],
        {"num_features": int(m.num_features), "eps": float(m.eps)},
        {
            "running_mean": float_copy(m.running_mean),
            "running_var": float_copy(m.running_var),
            "weight": float_copy(m.weight),
            "bias": float_copy(m.bias),
        },
        node.target,
    )


def _emit_softmax(low: Lowering, node: fx.Node, m: nn.Softmax, x: str) -> str:
    if m.dim is None:
        raise low.unsupported(node, "Softmax needs an explicit dim")
    return low.emit(node.name, "softmax", [x], {"dim": int(m.dim)}, module=node.target)


def _emit_prelu(low: Lowering, node: fx.Node, m: nn.PReLU, x: str) -> str:
    return low.emit(node.name, "prelu", [x], {}, {"weight": float_copy(m.weight)}, node.target)


def _emit_conv2d(low: Lowering, node: fx.Node, m: nn.Conv2d, x: str) -> str:
    attrs = float_conv_attrs(m, 0.0)
    return low.emit(
        node.name, "conv2d", [x], attrs, {"weight": float_copy(m.weight), "bias": float_copy(m.bias)}, node.target
    )


def _emit_conv1d(low: Lowering, node: fx.Node, m: nn.Conv1d, x: str) -> str:
    """A 1-d conv as torch computes it: a 2-d conv of ``[N, C, 1, L]`` with a ``1 x k`` kernel."""
    weight = float_copy(m.weight)
    x2d, attrs = conv1d_float_attrs(low, node, m, x, 0.0)
    tensors = {"weight": weight.unsqueeze(2).contiguous(), "bias": float_copy(m.bias)}
    return to_1d(low, node, m, low.emit(node.name, "conv2d", [x2d], attrs, tensors, node.target))


def _emit_linear(low: Lowering, node: fx.Node, m: nn.Linear, x: str) -> str:
    attrs = {"in_features": int(m.in_features), "out_features": int(m.out_features)}
    return low.emit(
        node.name, "linear", [x], attrs, {"weight": float_copy(m.weight), "bias": float_copy(m.bias)}, node.target
    )


#: the float modules the engine runs as graph ops, by exact type
EMITTERS = {
    nn.MaxPool2d: _emit_max_pool,
    nn.AvgPool2d: _emit_avg_pool,
    nn.AdaptiveAvgPool2d: _emit_adaptive_pool,
    nn.AdaptiveMaxPool2d: _emit_adaptive_pool,
    nn.Flatten: _op("flatten", lambda m: {"start_dim": int(m.start_dim), "end_dim": int(m.end_dim)}),
    nn.BatchNorm1d: _emit_batch_norm,
    nn.BatchNorm2d: _emit_batch_norm,
    nn.ReLU: _op("relu"),
    nn.ReLU6: _op("relu6"),
    nn.LeakyReLU: _op("leaky_relu", lambda m: {"negative_slope": float(m.negative_slope)}),
    nn.Hardtanh: _op("hardtanh", lambda m: {"min_val": float(m.min_val), "max_val": float(m.max_val)}),
    nn.PReLU: _emit_prelu,
    nn.Sigmoid: _op("sigmoid"),
    nn.Tanh: _op("tanh"),
    nn.Softmax: _emit_softmax,
    nn.Conv2d: _emit_conv2d,
    nn.Conv1d: _emit_conv1d,
    nn.Linear: _emit_linear,
}


def emit_module(low: Lowering, node: fx.Node, m: nn.Module, x: str) -> str:
    """Emit the float op of a parameter-free or simple module (:data:`EMITTERS`), a canonized
    SignThreshold, or a quantizer (alone or in a ``QActivation``); returns the value name."""
    emitter = EMITTERS.get(type(m))
    if emitter is not None:
        return emitter(low, node, m, x)
    if is_sign_threshold(m):
        return low.emit(
            node.name,
            "sign_threshold",
            [x],
            {"channels": int(m.threshold.numel())},
            {
                "thresholds": m.threshold.detach()
                .to(torch.int64)
                .clamp(-(2**31), 2**31 - 1)
                .to(torch.int32)
                .contiguous(),
                "direction": m.direction.detach().to(torch.int8).contiguous(),
            },
            node.target,
        )
    if isinstance(m, QActivation):
        return quantize(low, node, m.quantizer, x)
    if isinstance(m, quant.Quantizer):
        return quantize(low, node, m, x)
    raise low.unsupported(node)


# -- functions: emitter(lowering, node) -> value --------------------------------


def _arithmetic(op: str, neutral: float, alpha: bool):
    """``add`` / ``mul`` of two tensors, or of a tensor and a number (``other``); ``alpha`` for add."""

    def emitter(low: Lowering, node: fx.Node) -> str:
        extra = {"alpha": float(node.kwargs.get("alpha", 1.0))} if alpha else {}
        a, b = node.args[0], node.args[1]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return low.emit(node.name, op, [low.arg(node, a), low.arg(node, b)], {"other": neutral, **extra})
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            return low.emit(node.name, op, [low.arg(node, a)], {"other": float(b), **extra})
        if isinstance(b, fx.Node) and isinstance(a, (int, float)) and extra.get("alpha", 1.0) == 1.0:
            return low.emit(node.name, op, [low.arg(node, b)], {"other": float(a), **extra})
        raise low.unsupported(node)

    return emitter


def _unary(op: str):
    """The emitter of a function or method that is one graph op of its first argument, no attributes."""

    def emitter(low: Lowering, node: fx.Node) -> str:
        return low.emit(node.name, op, [low.arg(node, node.args[0])])

    return emitter


def _option(node: fx.Node, key: str, position: int, default):
    """Argument ``key`` of a call: by keyword, else at ``position``, else ``default``."""
    return node.kwargs.get(key, node.args[position] if len(node.args) > position else default)


def _cat(low: Lowering, node: fx.Node) -> str:
    dim = _option(node, "dim", 1, 0)
    return low.emit(node.name, "cat", [low.arg(node, t) for t in node.args[0]], {"dim": int(dim)})


def _flatten(low: Lowering, node: fx.Node) -> str:
    start, end = _option(node, "start_dim", 1, 0), _option(node, "end_dim", 2, -1)
    return low.emit(node.name, "flatten", [low.arg(node, node.args[0])], {"start_dim": int(start), "end_dim": int(end)})


def _hardtanh(low: Lowering, node: fx.Node) -> str:
    lo, hi = float(_option(node, "min_val", 1, -1.0)), float(_option(node, "max_val", 2, 1.0))
    return low.emit(node.name, "hardtanh", [low.arg(node, node.args[0])], {"min_val": lo, "max_val": hi})


def _adaptive_avg_pool(low: Lowering, node: fx.Node) -> str:
    size = _option(node, "output_size", 1, None)
    return low.emit(node.name, "adaptive_avg_pool2d", [low.arg(node, node.args[0])], {"output_size": pair(size)})


_add, _mul = _arithmetic("add", 0.0, alpha=True), _arithmetic("mul", 1.0, alpha=False)

#: the functions the engine runs as graph ops, by fx ``call_function`` target
FUNCTIONS = {
    operator.add: _add,
    torch.add: _add,
    operator.iadd: _add,
    operator.mul: _mul,
    torch.mul: _mul,
    operator.imul: _mul,
    torch.cat: _cat,
    torch.flatten: _flatten,
    F.relu: _unary("relu"),
    torch.relu: _unary("relu"),
    torch.sigmoid: _unary("sigmoid"),
    F.sigmoid: _unary("sigmoid"),
    torch.tanh: _unary("tanh"),
    F.tanh: _unary("tanh"),
    onebit_sign: _unary("sign"),
    F.hardtanh: _hardtanh,
    F.adaptive_avg_pool2d: _adaptive_avg_pool,
}


# -- tensor methods: emitter(lowering, node) -> value | None ---------------------


def _size(low: Lowering, node: fx.Node) -> None:
    if not all(u.op == "call_method" and u.target in ("view", "reshape") for u in node.users):
        raise low.unsupported(node, "tensor sizes are only supported as arguments of view/reshape")


def _reshape(low: Lowering, node: fx.Node) -> str:
    x = node.args[0]
    shape, in_shape = low.shape(node), low.shape(x) if isinstance(x, fx.Node) else None
    if shape is None or in_shape is None or not shape or shape[0] != in_shape[0]:
        raise low.unsupported(node, "only reshapes that keep the batch dimension are supported")
    return low.emit(node.name, "reshape", [low.arg(node, x)], {"shape": list(shape[1:])})


def _add_method(low: Lowering, node: fx.Node) -> str:
    if len(node.args) != 2 or not isinstance(node.args[1], fx.Node) or node.kwargs:
        raise low.unsupported(node)
    inputs = [low.arg(node, node.args[0]), low.arg(node, node.args[1])]
    return low.emit(node.name, "add", inputs, {"other": 0.0, "alpha": 1.0})


#: the tensor methods the engine runs as graph ops (or passes through), by name
METHODS = {
    "size": _size,
    "view": _reshape,
    "reshape": _reshape,
    "flatten": _flatten,
    "relu": _unary("relu"),
    "add": _add_method,
    "__add__": _add_method,
    "contiguous": lambda low, node: low.arg(node, node.args[0]),
}
