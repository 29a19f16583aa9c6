"""The graph's vocabulary: value kinds, attribute checkers, tensor and op specs.

An op is an :class:`OpSpec`: its float semantics ``fn(tensors, attrs, *inputs)``, the kinds of
its inputs and output, a checker per attribute, a :class:`TensorSpec` per tensor role and an
optional ``bind`` that makes the runner of a fused step (see :mod:`onebit.engine.fuse`).
Each checker returns the attribute's normalised value or raises :class:`GraphError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from onebit.engine.geometry import ConvSpec, words_for


def fresh_name(names: set[str], base: str) -> str:
    """A value name from ``base`` that is not in ``names`` (dots become underscores; ``_1``, ``_2``...
    when taken), added to ``names``."""
    base = base.replace(".", "_") or "v"
    name, k = base, 1
    while name in names:
        name, k = f"{base}_{k}", k + 1
    names.add(name)
    return name


class GraphError(ValueError):
    """A graph (or its tensors) is malformed."""


#: the two kinds of values: float tensors and bit-packed tensors
FLOAT, PACKED = "float", "packed"


# ---------------------------------------------------------------------------
# attribute checkers


def integer(lo: int = 0, hi: int = 1 << 30):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise GraphError(f"expected an integer in [{lo}, {hi}], got {v!r}")
        return v

    return check


def pair(lo: int = 0, hi: int = 1 << 16):
    item = integer(lo, hi)

    def check(v):
        if not isinstance(v, list) or len(v) != 2:
            raise GraphError(f"expected a pair of integers, got {v!r}")
        return [item(x) for x in v]

    return check


def number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GraphError(f"expected a finite number, got {v!r}")
    return float(v)


def non_negative(v):
    v = number(v)
    if v < 0:
        raise GraphError(f"expected a non-negative number, got {v!r}")
    return v


def boolean(v):
    if not isinstance(v, bool):
        raise GraphError(f"expected true or false, got {v!r}")
    return v


def positive(v):
    v = number(v)
    if not v > 0:
        raise GraphError(f"expected a positive number, got {v!r}")
    return v


def optional_positive(v):
    return None if v is None else positive(v)


def padding_value(v):
    v = number(v)
    if v not in (0.0, 1.0, -1.0):
        raise GraphError(f"pad_value must be 0, 1 or -1, got {v!r}")
    return v


def choice(*options):
    def check(v):
        if v not in options:
            raise GraphError(f"expected one of {list(options)}, got {v!r}")
        return v

    return check


def optional(check):
    return lambda v: None if v is None else check(v)


def int_list(v):
    if not isinstance(v, list) or not 1 <= len(v) <= 8:
        raise GraphError(f"expected a list of integers, got {v!r}")
    return [integer(-1, 1 << 30)(x) for x in v]


def conv_padding(v):
    if v in ("same", "valid"):
        return v
    return pair()(v)


def fail(v):
    raise GraphError(f"unexpected value {v!r}")


# ---------------------------------------------------------------------------
# tensor shapes, from a node's attributes


def binary_weight_shape(a: dict) -> tuple[int, ...]:
    """In-memory packed conv weight: ``[C_out, KH, KW, ceil((C_in/G)/64)]`` int64."""
    return (a["out_channels"], *a["kernel_size"], words_for(a["in_channels"] // a["groups"]))


def compact_shape(a: dict) -> tuple[int, ...]:
    """In-file binary weight: ``[C_out, ceil(C_in/G * KH * KW / 8)]`` uint8 (the bits of sign(w) < 0)."""
    if "kernel_size" in a:
        k = a["in_channels"] // a["groups"] * a["kernel_size"][0] * a["kernel_size"][1]
    else:
        k = a["in_features"]
    return (a["out_channels"] if "out_channels" in a else a["out_features"], (k + 7) // 8)


def per_out_channel(a):
    return (a["out_channels"],)


def per_out_feature(a):
    return (a["out_features"],)


def per_feature(a):
    return (a["num_features"],)


F32 = torch.float32
any_length = lambda a: None  # noqa: E731


# ---------------------------------------------------------------------------
# specs


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: Callable[[dict], tuple[int, ...] | None]  # None: any 1-D length is checked by the op
    required: bool = True
    binary: bool = False  # a binary weight: stored compact in files
    check: Callable[[torch.Tensor, dict], str | None] | None = None  # content check: a problem, or None


@dataclass(frozen=True)
class OpSpec:
    """An op: ``fn(tensors, attrs, *inputs)`` is its float semantics (what a node computes), the
    rest what a node of it may hold. ``bind(step)`` makes the runner of a step of it that carries
    a weight cache, a bound native layer or an epilogue (:class:`onebit.engine.steps.Step`);
    without it a step runs ``fn`` with its tensors and attributes."""

    fn: Callable
    inputs: tuple[str, ...]  # kinds of the inputs; ("float", "...") = one or more floats
    output: str
    attrs: dict[str, Callable] = field(default_factory=dict)
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    check: Callable[[dict], None] | None = None  # cross-attribute checks
    defaults: dict[str, Any] = field(default_factory=dict)  # optional attributes and their values
    bind: Callable | None = None  # step -> the step's runner (see above)
    weight_cache: bool = False  # its native kernels keep the prepared weights between calls (a WeightCache)
    packs_input: bool = False  # a binary conv that takes the float input and packs it itself
    #: its values do not depend on the memory format of its inputs (exact, or computed element by element
    #: in the same order in both): a packed model runs it in the layout its input comes in; other ops
    #: get their inputs in the model's own layout, where they round as the model's op rounds
    layout_free: bool = False
    #: a layout-free op that torch runs several times faster on channels_last maps than on NCHW ones: a
    #: packed model gives it its 4-d inputs in channels_last
    prefers_channels_last: bool = False
    #: a layout-bound op that may round the same in both layouts for some shapes (a float conv): a packed
    #: model with an NCHW input asks torch per input shape (:mod:`onebit.engine.layout_probe`)
    probes_layout: bool = False


# ---------------------------------------------------------------------------
# attribute sets and cross-attribute checks shared by several ops

BINARY_CONV_ATTRS = {
    "in_channels": integer(1),
    "out_channels": integer(1),
    "kernel_size": pair(1, 64),
    "stride": pair(1, 1 << 10),
    "padding": pair(0, 1 << 10),
    "dilation": pair(1, 1 << 10),
    "groups": integer(1),
    "pad_value": padding_value,
}
#: the attributes of a binary convolution that are the kernels' convolution arguments
CONV_ATTRS = tuple(BINARY_CONV_ATTRS)

FLOAT_CONV_ATTRS = {
    "in_channels": integer(1),
    "out_channels": integer(1),
    "kernel_size": pair(1, 1 << 10),
    "stride": pair(1, 1 << 10),
    "padding": conv_padding,
    "explicit_padding": lambda v: (
        [integer(0, 1 << 10)(x) for x in v] if isinstance(v, list) and len(v) == 4 else fail(v)
    ),
    "dilation": pair(1, 1 << 10),
    "groups": integer(1),
    "pad_value": padding_value,
    "padding_mode": choice("zeros", "reflect", "replicate", "circular"),
}

THRESHOLD_ATTRS = {"out_padding": pair(0, 1 << 10), "out_pad_value": padding_value, "out_groups": integer(1)}


def check_groups(a):
    if a["in_channels"] % a["groups"] or a["out_channels"] % a["groups"]:
        raise GraphError(
            f"{a['in_channels']} -> {a['out_channels']} channels are not divisible by groups={a['groups']}"
        )


def check_binary_conv(a):
    """A binary convolution's attributes make a convolution the kernels run (geometry's one check)."""
    check_groups(a)
    try:
        ConvSpec.check(**{k: a[k] for k in BINARY_CONV_ATTRS})
    except ValueError as error:
        raise GraphError(str(error)) from None


def check_out_groups(a):
    if a["out_channels"] % a["out_groups"]:
        raise GraphError(f"{a['out_channels']} output channels are not divisible by out_groups={a['out_groups']}")


# ---------------------------------------------------------------------------
# a node's attributes


def checked_attrs(node: dict, spec: OpSpec, where: str) -> dict:
    attrs = node.get("attrs", {})
    if not isinstance(attrs, dict):
        raise GraphError(f"{where}: attrs must be an object")
    out = {}
    for key in attrs:
        if key not in spec.attrs:
            raise GraphError(f"{where}: unknown attribute {key!r} for op {node['op']}")
    for key, check in spec.attrs.items():
        if key not in attrs and key in spec.defaults:
            out[key] = spec.defaults[key]
            continue
        if key not in attrs:
            raise GraphError(f"{where}: missing attribute {key!r}")
        try:
            out[key] = check(attrs[key])
        except GraphError as error:
            raise GraphError(f"{where}: attribute {key!r}: {error}") from None
    if spec.check is not None:
        try:
            spec.check(out)
        except GraphError as error:
            raise GraphError(f"{where}: {error}") from None
    return out
