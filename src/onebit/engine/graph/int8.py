"""int8 ops: layers whose input is ``int8`` (:class:`onebit.quant.Int8`) and whose weights are
``int8_weight`` levels, as :func:`onebit.nn.functional.qconv` / ``qlinear`` compute them.

With the input quantizer's divisor ``s`` (float32) and int8 weights ``w`` (levels -127 .. 127)::

    x_int = clamp(round(x * s), -127, 127)                (round half to even, x * s rounded first)
    y     = fl(fl(fl(sum x_int * w) / s) * scale[c]) + bias[c])

The sum is of integers, exact in float32 while ``taps * 127^2 < 2^24`` (the layers refuse more),
so it is the same in every summation order, layout and ISA. For other layers with an ``int8`` input,
``int8_integers`` gives ``x_int`` (the layer divides its sum by ``s``) and ``int8_quantize`` gives
``x_int / s`` (a conv with a nonzero ``pad_value``). A BatchNorm read only by an ``int8_conv2d`` is
applied in its epilogue (:class:`onebit.engine.steps.Epilogue`, rounded as torch rounds it), and a
``max_pool2d`` that alone reads it (or its BatchNorm) pools the integer sums before the epilogue
(:func:`integer_max_pool`): the float epilogue then runs on the pooled pixels only.
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
from onebit.engine.steps import Epilogue, IntegerPool, Step
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
    panels made once per write of the weight), else ``fn`` (then the fused BatchNorm and max pool as
    their float ops)."""

    def bind(step: Step) -> Callable:
        t, a, derived, panels = step.tensors, step.attrs, DerivedWeights(), DerivedWeights()
        epilogue, pool = step.epilogue, step.pool

        def run(x):
            if x.dtype == torch.float32 and ops.backend_is_native() and ops.native_available():
                y = native(x, t, a, panels, epilogue, pool)
                if y is not None:
                    return y
            y = fn(t, a, x, derived)
            y = y if epilogue is None else _batch_norm_epilogue(y, epilogue)
            return y if pool is None else _max_pool2d(y, pool.attrs)

        return run

    return bind


def _max_pool2d(y: torch.Tensor, a: dict) -> torch.Tensor:
    return reference.max_pool2d(y, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])


def _epilogue_of_sums(acc: torch.Tensor, t: dict, a: dict, e: Epilogue | None) -> torch.Tensor:
    """The float epilogue of int32 sums ``acc [C_out, K]``, as the kernels round it."""
    y = reference._int8_epilogue(acc[None].to(torch.float32), a["divisor"], t.get("scale"), t.get("bias"), 1)
    return y[0] if e is None else _batch_norm_epilogue(y, e)[0]


#: a fused pool's check evaluates the epilogue on at most this many sums a channel where it is zero
_ZERO_RUN_LIMIT = 1 << 12


def integer_max_pool(t: dict, a: dict, epilogue: Epilogue | None, pool_attrs: dict) -> IntegerPool | None:
    """The ``max_pool2d`` (``pool_attrs``) of an ``int8_conv2d`` (tensors ``t``, attributes ``a``) and its
    fused BatchNorm as a pool of the integer sums, or None where that would not give torch's pool of
    the floats bit for bit.

    Each channel's epilogue ``e(acc)`` (a division by ``s > 0``, products by ``scale`` and the
    BatchNorm's ``bn_scale``, sums with biases, each correctly rounded) is monotone in ``acc``:
    increasing where the product of the factors' signs is +1, decreasing where it is -1, so the max of
    the floats is ``e`` of the max (or min) of the sums. It holds where every factor is finite and
    nonzero and ``e`` is finite over the sums' whole range ``|acc| <= taps * 127^2`` (no intermediate
    overflows, so no NaN). One more case would differ: torch's pool keeps the first of equal values,
    and ``-0.0 == 0.0``; so where ``e`` is zero for some sums, it must be zeros of one sign."""
    channels = a["out_channels"]
    factors = [t.get("scale"), None if epilogue is None else epilogue.bn_scale]
    sign = torch.ones(channels, dtype=torch.float32)
    for f in factors:
        if f is not None:
            if not bool(torch.isfinite(f).all()) or bool((f == 0).any()):
                return None
            sign = sign * torch.sign(f.float())
    for shift in (t.get("bias"), None if epilogue is None else epilogue.bn_shift):
        if shift is not None and not bool(torch.isfinite(shift).all()):
            return None
    taps = a["in_channels"] // a["groups"] * a["kernel_size"][0] * a["kernel_size"][1]
    bound = taps * INT8_MAX * INT8_MAX

    def g(acc: torch.Tensor) -> torch.Tensor:  # sign * e(acc), non-decreasing in acc; acc [C_out, K]
        return sign[:, None] * _epilogue_of_sums(acc, t, a, epilogue)

    ends = g(torch.tensor([[-bound, bound]]).expand(channels, 2))
    if not bool(torch.isfinite(ends).all()) or bool((ends[:, 0] > ends[:, 1]).any()):
        return None
    # the zeros of e: sums [first >= 0, last <= 0], found by bisection (g is monotone)
    first = _bisect(g, channels, bound, lambda v: v >= 0)
    last = _bisect(g, channels, bound, lambda v: v > 0) - 1
    for c in torch.nonzero(first <= last).flatten().tolist():
        if int(last[c] - first[c]) >= _ZERO_RUN_LIMIT:
            return None
        sums = torch.arange(int(first[c]), int(last[c]) + 1)
        row = torch.zeros(channels, len(sums), dtype=torch.int64)
        row[c] = sums
        signs = torch.signbit(_epilogue_of_sums(row, t, a, epilogue)[c])
        if bool(signs.any()) and not bool(signs.all()):
            return None
    return IntegerPool(dict(pool_attrs), sign.to(torch.int32))


def _bisect(g: Callable, channels: int, bound: int, holds: Callable) -> torch.Tensor:
    """Per channel, the least sum in ``[-bound, bound]`` where ``holds(g(sum))`` (``bound + 1`` if none),
    for a ``holds`` that stays true once true."""
    lo = torch.full((channels,), -bound, dtype=torch.int64)
    hi = torch.full((channels,), bound + 1, dtype=torch.int64)
    while bool((active := lo < hi).any()):
        mid = torch.div(lo + hi, 2, rounding_mode="floor").clamp(max=bound)  # a settled channel's mid is unused
        ok = holds(g(mid[:, None])[:, 0])
        hi = torch.where(active & ok, mid, hi)
        lo = torch.where(active & ~ok, mid + 1, lo)
    return lo


def _batch_norm_epilogue(y: torch.Tensor, e: Epilogue) -> torch.Tensor:
    """A fused BatchNorm as the kernels round it."""
    return reference.batch_norm_epilogue(y, e.bn_scale, e.bn_shift, e.bn_fma)


def _native_conv(x, t, a, panels: DerivedWeights, epilogue: Epilogue | None, pool: IntegerPool | None):
    from onebit.engine.kernels import int8 as kernels  # noqa: PLC0415 (the native module loads lazily)

    w = t["weight"]
    prepared = panels.get(w, lambda w: kernels.int8_panels(w, a["groups"])) if kernels.direct(x, w) else None
    bn = None if epilogue is None else (epilogue.bn_scale, epilogue.bn_shift, epilogue.bn_fma)
    pool = None if pool is None else (pool.window(), pool.sign)
    return kernels.int8_conv2d(x, w, t.get("scale"), t.get("bias"), a, prepared, bn, OUT_CHANNELS_LAST, pool)


def _native_linear(x, t, a, panels: DerivedWeights, epilogue: Epilogue | None, pool: None):
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
