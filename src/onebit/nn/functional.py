"""Stateless arithmetic of onebit's quantized layers.

The layers in :mod:`onebit.nn.layers`, the converter and the packed engine's
reference all compute with these functions, so training, conversion and
deployment share one definition of every layer.

A quantized convolution is::

    y = conv(pad(q_in(x), value=pad_value), q_w(W)) + bias

Padding is applied *after* input quantization, so ``pad_value`` is the value
the padded positions have in the binary domain: 0.0 (zero padding, the
default), +1.0 or -1.0.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from onebit.math import sign

__all__ = ["sign", "explicit_padding", "qconv", "qlinear"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def explicit_padding(
    padding: str | int | Sequence[int],
    kernel_size: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    """Per-dimension (before, after) padding, in ``F.pad`` order (last dimension first).

    ``'valid'`` is no padding; ``'same'`` pads ``dilation * (kernel - 1)`` in total per
    dimension, the smaller half before, as ``torch.nn.Conv2d`` does.
    """
    ndim = len(kernel_size)
    pairs: list[tuple[int, int]] = []
    for d in range(ndim):
        if padding == "valid":
            before = after = 0
        elif padding == "same":
            total = dilation[d] * (kernel_size[d] - 1)
            before, after = total // 2, total - total // 2
        else:
            p = padding if isinstance(padding, int) else padding[d]
            before = after = int(p)
        pairs.append((before, after))
    out: list[int] = []
    for before, after in reversed(pairs):
        out += [before, after]
    return tuple(out)


def qconv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: Sequence[int] | int = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    input_quantizer: Callable | None = None,
    weight_quantizer: Callable | None = None,
    pad_value: float = 0.0,
    padding_mode: str = "zeros",
    kernel_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Quantized N-d convolution (N = ``weight.dim() - 2``).

    ``y = conv(pad(q_in(x), pad_value), q_w(W)) + bias``. With ``padding_mode``
    other than ``'zeros'`` the quantized input is padded by that mode
    (reflect, replicate, circular) and ``pad_value`` must be 0.

    Gradients flow through the quantizers' straight-through estimators; padded
    positions receive no gradient. ``kernel_size`` (default: from ``weight``) lets
    symbolic tracers, where ``weight`` has no shape yet, call this function.
    """
    kernel_size = tuple(weight.shape[2:]) if kernel_size is None else tuple(kernel_size)
    ndim = len(kernel_size)
    conv = _CONV[ndim]
    stride = _tuple(stride, ndim)
    dilation = _tuple(dilation, ndim)
    if input_quantizer is not None:
        x = input_quantizer(x)
    w = weight_quantizer(weight) if weight_quantizer is not None else weight
    if padding_mode == "zeros" and pad_value == 0.0:
        return conv(x, w, bias, stride, padding, dilation, groups)
    pad = explicit_padding(padding, kernel_size, dilation)
    if padding_mode == "zeros":
        x = F.pad(x, pad, mode="constant", value=float(pad_value))
    else:
        x = F.pad(x, pad, mode=padding_mode)
    return conv(x, w, bias, stride, 0, dilation, groups)


def qlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    input_quantizer: Callable | None = None,
    weight_quantizer: Callable | None = None,
) -> torch.Tensor:
    """Quantized linear map: ``y = q_in(x) @ q_w(W).T + bias``."""
    if input_quantizer is not None:
        x = input_quantizer(x)
    w = weight_quantizer(weight) if weight_quantizer is not None else weight
    return F.linear(x, w, bias)


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(value)
