"""Ops on bit-packed values: packing, binary convolutions and linear layers (float or thresholded
outputs), thresholds and OR pooling on bits.

A binary convolution computes ``acc = sum over taps and channels of sign(x) * sign(w)`` exactly
(padded taps worth ``pad_value``), then ``acc * scale + bias`` (float output) or the packed
bits of ``acc < thresholds`` / ``acc > thresholds`` by channel direction (thresholded output).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from onebit.engine import ops
from onebit.engine.geometry import words_for
from onebit.engine.graph.schema import (
    BINARY_CONV_ATTRS,
    F32,
    FLOAT,
    PACKED,
    THRESHOLD_ATTRS,
    OpSpec,
    TensorSpec,
    binary_weight_shape,
    boolean,
    check_binary_conv,
    check_out_groups,
    integer,
    padding_value,
    pair,
    per_out_channel,
    per_out_feature,
)
from onebit.engine.steps import Epilogue, Step


def conv_args(a: dict) -> dict:
    """The convolution's keyword arguments from a node's attributes, pairs as tuples (hashable: the
    kernels' plan cache takes them as they are)."""
    return {k: tuple(a[k]) if isinstance(a[k], list) else a[k] for k in BINARY_CONV_ATTRS}


def _pack(t, a, x):
    return ops.pack_activations(x, a["padding"], a["pad_value"], a["groups"])


def _pack_features(t, a, x):
    if x.shape[-1] != a["features"]:
        raise ValueError(f"expected {a['features']} input features, got shape {list(x.shape)}")
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return ops.pack_features(x.float() if x.dtype != torch.float32 else x)


def _binary_conv2d(t, a, xp, residual=None):
    return ops.binary_conv2d(
        xp, t["weight"], scale=t.get("scale"), bias=t.get("bias"), residual=residual, **conv_args(a)
    )


def _bind_binary_conv2d(step: Step) -> Callable:
    """A fused binary conv: ``(acc * scale + bias) [* bn_scale + bn_shift] [+ residual]``, by the step's
    bound native layer on the native backend, else by the op with the step's weight cache."""
    t, conv, cache, layer = step.tensors, conv_args(step.attrs), step.cache, step.layer
    bn = step.epilogue or Epilogue()
    weight, scale, bias = t["weight"], t.get("scale"), t.get("bias")

    def run(xp, residual=None, memory_format=torch.channels_last):
        if layer is not None and ops.backend_is_native():
            return layer(xp, residual, memory_format)
        return ops.binary_conv2d(  # channels_last: a reader that takes another layout converts it
            xp,
            weight,
            scale=scale,
            bias=bias,
            residual=residual,
            cache=cache,
            bn_scale=bn.bn_scale,
            bn_shift=bn.bn_shift,
            bn_fma=bn.bn_fma,
            **conv,
        )

    return run


def _binary_conv2d_threshold(t, a, xp, cache=None):
    return ops.binary_conv2d_threshold(
        xp,
        t["weight"],
        thresholds=t["thresholds"],
        direction=t["direction"],
        out_padding=a["out_padding"],
        out_pad_value=a["out_pad_value"],
        out_groups=a["out_groups"],
        cache=cache,
        **conv_args(a),
    )


def _bind_binary_conv2d_threshold(step: Step) -> Callable:
    """A thresholded binary conv: the step's bound native layer on the native backend, else the op with the
    step's weight cache."""
    t, a, cache, layer = step.tensors, step.attrs, step.cache, step.layer

    def run(xp):
        if layer is not None and ops.backend_is_native():
            return layer(xp)
        return _binary_conv2d_threshold(t, a, xp, cache)

    return run


def _bind_max_pool_bits(step: Step) -> Callable:
    """A max pool on bits: the step's bound native layer on the native backend, else the op."""
    t, a, layer = step.tensors, step.attrs, step.layer
    return lambda xp: layer(xp) if layer is not None and ops.backend_is_native() else _max_pool_bits(t, a, xp)


#: the binary linear layers: a ``pack_features`` before one is fused into it (it takes the float features)
LINEAR_OPS = ("binary_linear", "binary_linear_threshold")


def _bind_binary_linear(step: Step) -> Callable:
    """A binary linear layer (float or thresholded output) on packed ``[N, Wg]`` words or, where its
    ``pack_features`` was fused into it, on the float features ``[N, F]`` (packed in the same native call):
    the step's bound native 1x1 conv on a plain input on the native backend, else the ops (which also name
    what is wrong with an input)."""
    t, a, layer = step.tensors, step.attrs, step.layer
    op = _binary_linear if step.op == "binary_linear" else _binary_linear_threshold
    features, (out, words) = a["in_features"], t["weight"].shape
    if step.op != "binary_linear":
        out = words_for(out)  # packed output words

    def run(x):
        if layer is not None and type(x) is torch.Tensor and x.dim() == 2 and x.is_contiguous():
            n = x.shape[0]
            if x.dtype is torch.int64 and x.shape[1] == words and ops.backend_is_native():
                return layer(x.view(n, 1, 1, 1, words)).view(n, out)
            if x.dtype is torch.float32 and x.shape[1] == features and ops.backend_is_native():
                return layer(x.view(n, features, 1, 1)).view(n, out)  # [N, F] as an NCHW map of 1 x 1 pixels
        if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:  # the fused pack_features
            x = _pack_features(t, {"features": features}, x)
        return op(t, a, x)

    return run


def _max_pool_bits(t, a, xp):
    return ops.max_pool_bits(
        xp,
        t["or_mask"],
        t["pad_words"],
        kernel_size=a["kernel_size"],
        stride=a["stride"],
        padding=a["padding"],
        dilation=a["dilation"],
        ceil_mode=a["ceil_mode"],
        out_padding=a["out_padding"],
        channels=a["channels"],
    )


def _threshold_pack(t, a, acc):
    return ops.threshold_pack(
        acc,
        t["thresholds"],
        t["direction"],
        out_padding=a["out_padding"],
        out_pad_value=a["out_pad_value"],
        out_groups=a["out_groups"],
    )


def _binary_linear(t, a, xp):
    return ops.binary_linear(xp, t["weight"], in_features=a["in_features"], scale=t.get("scale"), bias=t.get("bias"))


def _binary_linear_threshold(t, a, xp):
    return ops.binary_linear_threshold(
        xp, t["weight"], in_features=a["in_features"], thresholds=t["thresholds"], direction=t["direction"]
    )


def group_words(a):
    return (a["out_groups"], words_for(a["channels"] // a["out_groups"]))


BINARY_OPS: dict[str, OpSpec] = {
    "pack": OpSpec(
        _pack,
        (FLOAT,),
        PACKED,
        {"padding": pair(0, 1 << 10), "pad_value": padding_value, "groups": integer(1)},
        layout_free=True,
    ),
    "pack_features": OpSpec(_pack_features, (FLOAT,), PACKED, {"features": integer(1)}, layout_free=True),
    "binary_conv2d": OpSpec(
        _binary_conv2d,
        (PACKED,),
        FLOAT,
        dict(BINARY_CONV_ATTRS),
        {
            "weight": TensorSpec(torch.int64, binary_weight_shape, binary=True),
            "scale": TensorSpec(F32, per_out_channel, required=False),
            "bias": TensorSpec(F32, per_out_channel, required=False),
        },
        check_binary_conv,
        bind=_bind_binary_conv2d,
        weight_cache=True,
        packs_input=True,
        layout_free=True,
    ),
    "binary_conv2d_threshold": OpSpec(
        _binary_conv2d_threshold,
        (PACKED,),
        PACKED,
        {**BINARY_CONV_ATTRS, **THRESHOLD_ATTRS},
        {
            "weight": TensorSpec(torch.int64, binary_weight_shape, binary=True),
            "thresholds": TensorSpec(torch.int32, per_out_channel),
            "direction": TensorSpec(torch.int8, per_out_channel),
        },
        lambda a: (check_binary_conv(a), check_out_groups(a)),
        bind=_bind_binary_conv2d_threshold,
        weight_cache=True,
        packs_input=True,
        layout_free=True,
    ),
    "threshold_pack": OpSpec(
        _threshold_pack,
        (FLOAT,),
        PACKED,
        {"out_channels": integer(1), **THRESHOLD_ATTRS},
        {"thresholds": TensorSpec(torch.int32, per_out_channel), "direction": TensorSpec(torch.int8, per_out_channel)},
        lambda a: check_out_groups(a),
        layout_free=True,
    ),
    "max_pool_bits": OpSpec(
        _max_pool_bits,
        (PACKED,),
        PACKED,
        {
            "channels": integer(1),
            "kernel_size": pair(1, 1 << 10),
            "stride": pair(1, 1 << 10),
            "padding": pair(0, 1 << 10),
            "dilation": pair(1, 1 << 10),
            "ceil_mode": boolean,
            **THRESHOLD_ATTRS,
        },
        {
            "or_mask": TensorSpec(torch.int64, group_words),
            "pad_words": TensorSpec(torch.int64, group_words),
        },
        lambda a: check_out_groups({**a, "out_channels": a["channels"]}),
        bind=_bind_max_pool_bits,
        layout_free=True,
    ),
    "binary_linear": OpSpec(
        _binary_linear,
        (PACKED,),
        FLOAT,
        {"in_features": integer(1), "out_features": integer(1)},
        {
            "weight": TensorSpec(
                torch.int64, lambda a: (a["out_features"], (a["in_features"] + 63) // 64), binary=True
            ),
            "scale": TensorSpec(F32, per_out_feature, required=False),
            "bias": TensorSpec(F32, per_out_feature, required=False),
        },
        bind=_bind_binary_linear,
        weight_cache=True,
        layout_free=True,
    ),
    "binary_linear_threshold": OpSpec(
        _binary_linear_threshold,
        (PACKED,),
        PACKED,
        {"in_features": integer(1), "out_features": integer(1)},
        {
            "weight": TensorSpec(
                torch.int64, lambda a: (a["out_features"], (a["in_features"] + 63) // 64), binary=True
            ),
            "thresholds": TensorSpec(torch.int32, per_out_feature),
            "direction": TensorSpec(torch.int8, per_out_feature),
        },
        bind=_bind_binary_linear,
        weight_cache=True,
        layout_free=True,
    ),
}
