"""The attributes and tensors of graph nodes: pairs as lists, conv geometry, float32 copies of parameters."""

from __future__ import annotations

import torch
from torch import nn

from onebit.nn import functional as QF


def pair(v) -> list[int]:
    """An int or a pair as a list of two ints."""
    if isinstance(v, int):
        return [v, v]
    return [int(x) for x in v]


def float_copy(x: torch.Tensor | None) -> torch.Tensor | None:
    """A contiguous float32 copy of a parameter or buffer, detached from the model (None stays None)."""
    return None if x is None else x.detach().to(torch.float32).contiguous().clone()


def conv_attrs(m: nn.Module, kernel_size, stride, padding, dilation, pad_value: float) -> dict:
    """The attributes of a 2-d conv node (``binary_conv2d``; ``conv2d`` / ``qconv2d`` add their padding
    mode) of layer ``m`` (its channels and groups) with this geometry: pairs as lists."""
    return {
        "in_channels": int(m.in_channels),
        "out_channels": int(m.out_channels),
        "kernel_size": pair(kernel_size),
        "stride": pair(stride),
        "padding": padding if isinstance(padding, str) else pair(padding),
        "dilation": pair(dilation),
        "groups": int(m.groups),
        "pad_value": float(pad_value),
    }


def float_conv_attrs(m: nn.Conv2d, pad_value: float) -> dict:
    """The attributes of a ``conv2d`` / ``qconv2d`` node: the layer's geometry, its explicit
    ``[left, right, top, bottom]`` padding and its padding mode."""
    return {
        **conv_attrs(m, m.kernel_size, m.stride, m.padding, m.dilation, pad_value),
        "explicit_padding": list(QF.explicit_padding(m.padding, m.kernel_size, m.dilation)),
        "padding_mode": m.padding_mode,
    }
