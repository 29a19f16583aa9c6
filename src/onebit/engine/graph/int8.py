"""int8 ops: layers whose input is ``int8`` (:class:`onebit.quant.Int8`) and whose weights are
``int8_weight`` levels, as :func:`onebit.nn.functional.qconv` / ``qlinear`` compute them.

With the input quantizer's divisor ``s`` (float32) and int8 weights ``w`` (levels -127 .. 127)::

    x_int = clamp(round(x * s), -127, 127)                (round half to even, x * s rounded first)
    y     = fl(fl(fl(sum x_int * w) / s) * scale[c]) + bias[c])

The sum is of integers, exact in float32 while ``taps * 127^2 < 2^24`` (the layers refuse more),
so it is the same in every summation order, layout and ISA. For other layers with an ``int8`` input,
``int8_integers`` gives ``x_int`` (the layer divides its sum by ``s``) and ``int8_quantize`` gives
``x_int / s`` (a conv with a nonzero ``pad_value``). A BatchNorm read only by an ``int8_conv2d`` is
applied in its epilogue (:class:`onebit.engine.steps.Epilogue`, rounded as torch rounds it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from onebit.engine import ops, reference
from onebit.engine.graph.quantized import DerivedWeights
from onebit.engine.graph.schema import (
    F32,
    FLOAT,
    GraphError,
    OpSpec,
    TensorSpec,
    check_groups,
    integer,
    pair,
    per_out_channel,
    per_out_feature,
    positive,
)
from onebit.engine.reference import INT8_MAX, int8_integers
from onebit.engine.steps import Epilogue, Step
from onebit.nn.functional import EXACT_SUM

#: native int8 convs write channels_last maps whatever their input's layout (as binary convs do)
OUT_CHANNELS_LAST = True


def _int8_quantize(t, a, x):
    """``int8``'s forward: ``x_int / s``."""
    return reference.int8_quantize(x, a["divisor"])


def _int8_integers(t, a, x):
    """``int8``'s integers ``x_int``, for a layer that divides its sum by ``s`` itself."""
    return int8_integers(x, a["divisor"])


def _float_levels(t, derived: DerivedWeights | None, dtype: torch.dtype) -> torch.Tensor:
    """The int8 weight as float levels (once per write of the weight, with ``derived``)."""
    return (derived or DerivedWeights()).get(t["weight"], lambda w: w.to(dtype)).to(dtype)


def _int8_conv2d(t, a, x, derived=None):
    """``conv(x_int, w) / s * scale + bias`` in float: the integer conv is exact (see the module)."""
    levels = _float_levels(t, derived, x.dtype)
    args = (a["stride"], a["padding"], a["dilation"], a["groups"])
    return reference.int8_conv2d(x, levels, a["divisor"], t.get("scale"), t.get("bias"), *args)


def _int8_linear(t, a, x, derived=None):
    """``(x_int @ w.T) / s * scale + bias`` over the last dimension."""
    if x.shape[-1] != a["in_features"]:
        raise ValueError(f"int8_linear: expected {a['in_features']} input features, got shape {list(x.shape)}")
    return reference.int8_linear(x, _float_levels(t, derived, x.dtype), a["divisor"], t.get("scale"), t.get("bias"))


def _bind(fn: Callable, native: Callable) -> Callable:
    """A runner that calls the native int8 kernel on the native backend (float32 input; its weight
    panels made once per write of the weight), else ``fn``."""

    def bind(step: Step) -> Callable:
        t, a, derived, panels = step.tensors, step.attrs, DerivedWeights(), DerivedWeights()
        epilogue = step.epilogue

        def run(x):
            if x.dtype == torch.float32 and ops.backend_is_native() and ops.native_available():
                y = native(x, t, a, panels, epilogue)
                if y is not None:
                    return y
            y = fn(t, a, x, derived)
            return y if epilogue is None else _batch_norm_epilogue(y, epilogue)

        return run

    return bind


def _batch_norm_epilogue(y: torch.Tensor, e: Epilogue) -> torch.Tensor:
    """A fused BatchNorm as the kernels round it."""
    return reference.batch_norm_epilogue(y, e.bn_scale, e.bn_shift, e.bn_fma)


def _native_conv(x, t, a, panels: DerivedWeights, epilogue: Epilogue | None):
    from onebit.engine.kernels import int8 as kernels  # noqa: PLC0415 (the native module loads lazily)

    w = t["weight"]
    prepared = panels.get(w, lambda w: kernels.int8_panels(w, a["groups"])) if kernels.direct(x, w) else None
    bn = None if epilogue is None else (epilogue.bn_scale, epilogue.bn_shift, epilogue.bn_fma)
    return kernels.int8_conv2d(x, w, t.get("scale"), t.get("bias"), a, prepared, bn, OUT_CHANNELS_LAST)


def _native_linear(x, t, a, panels: DerivedWeights, epilogue: Epilogue | None):
    from onebit.engine.kernels import int8 as kernels  # noqa: PLC0415

    w = t["weight"]
    prepared = panels.get(w, kernels.int8_panels) if kernels.direct(x, w) else None
    return kernels.int8_linear(x, w, t.get("scale"), t.get("bias"), a, prepared)


def _levels_problem(w: torch.Tensor, a: dict) -> str | None:
    """An int8 weight holds levels in -127 .. 127 (-128 is no level)."""
    return "holds -128, which is no int8 level (levels are -127 .. 127)" if bool((w == -128).any()) else None


def _check_conv(a: dict) -> None:
    check_groups(a)
    taps = a["in_channels"] // a["groups"] * a["kernel_size"][0] * a["kernel_size"][1]
    _check_taps(taps)


def _check_taps(taps: int) -> None:
    if taps * INT8_MAX * INT8_MAX >= EXACT_SUM:
        raise GraphError(f"{taps} taps x 127^2 >= 2^24: the int8 sums would not be exact in float32")


_CONV_ATTRS = {
    "in_channels": integer(1),
    "out_channels": integer(1),
    "kernel_size": pair(1, 1 << 10),
    "stride": pair(1, 1 << 10),
    "padding": pair(0, 1 << 10),
    "dilation": pair(1, 1 << 10),
    "groups": integer(1),
    "divisor": positive,
}

INT8_OPS: dict[str, OpSpec] = {
    "int8_quantize": OpSpec(_int8_quantize, (FLOAT,), FLOAT, {"divisor": positive}, layout_free=True),
    "int8_integers": OpSpec(_int8_integers, (FLOAT,), FLOAT, {"divisor": positive}, layout_free=True),
    "int8_conv2d": OpSpec(
        _int8_conv2d,
        (FLOAT,),
        FLOAT,
        _CONV_ATTRS,
        {
            "weight": TensorSpec(
                torch.int8,
                lambda a: (a["out_channels"], a["in_channels"] // a["groups"], *a["kernel_size"]),
                check=_levels_problem,
            ),
            "scale": TensorSpec(F32, per_out_channel, required=False),
            "bias": TensorSpec(F32, per_out_channel, required=False),
        },
        _check_conv,
        bind=_bind(_int8_conv2d, _native_conv),
        layout_free=True,
    ),
    "int8_linear": OpSpec(
        _int8_linear,
        (FLOAT,),
        FLOAT,
        {"in_features": integer(1), "out_features": integer(1), "divisor": positive},
        {
            "weight": TensorSpec(torch.int8, lambda a: (a["out_features"], a["in_features"]), check=_levels_problem),
            "scale": TensorSpec(F32, per_out_feature, required=False),
            "bias": TensorSpec(F32, per_out_feature, required=False),
        },
        lambda a: _check_taps(a["in_features"]),
        bind=_bind(_int8_linear, _native_linear),
    ),
}
