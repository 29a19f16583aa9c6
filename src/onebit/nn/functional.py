"""Stateless arithmetic of onebit's quantized layers.

The layers in :mod:`onebit.nn.layers`, the converter and the packed engine's
reference all compute with these functions, so training, conversion and
deployment share one definition of every layer.

A quantized convolution is::

    y = conv(pad(q_in(x), value=pad_value), levels(W)) * scale + bias

where ``q_w(W) = levels(W) * scale`` is the weight quantizer's factorization
(:meth:`onebit.quant.Quantizer.factor`: +-1 signs and a per-output-channel
magnitude for ``magnitude_aware_sign``, ``scale = 1`` for the others). The
convolution itself sums products of quantized values only: for a binary layer
an integer, exact in float32 in any summation order (layout, CPU, ISA). The
scale and the bias are applied afterwards, once each, as two float roundings
(``fl(fl(acc * scale) + bias)``) -- the arithmetic the packed engine's kernels
reproduce bit for bit. A layer without quantizers is torch's own float layer.

Padding is applied *after* input quantization, so ``pad_value`` is the value
the padded positions have in the binary domain: 0.0 (zero padding, the
default), +1.0 or -1.0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from onebit import quant
from onebit.math import sign

__all__ = [
    "sign",
    "explicit_padding",
    "qconv",
    "qlinear",
    "weight_factors",
    "scale_and_bias",
    "EXACT_SUM",
    "exact_sum_taps",
]

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

    ``y = conv(pad(q_in(x), pad_value), levels(W)) * scale + bias`` (see the module
    docstring; equal to ``conv(pad(q_in(x)), q_w(W)) + bias`` up to float rounding). An input
    quantizer with ``integer_factor(x) = (x_int, s)`` and one divisor ``s`` (``dorefa``,
    ``dorefa_sym``) gives ``y = conv(pad(x_int), levels) / s * scale + bias`` with zero padding:
    the sum of integer products is exact (in any order), then three roundings. With ``padding_mode``
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
    quantized = input_quantizer is not None or weight_quantizer is not None
    divisor = None
    if input_quantizer is not None:
        x, divisor = _integer_input(x, input_quantizer, pad_value)
    w, scale = weight_factors(weight, weight_quantizer)
    inner_bias = None if quantized else bias
    if padding_mode == "zeros" and pad_value == 0.0:
        y = conv(x, w, inner_bias, stride, padding, dilation, groups)
    else:
        pad = explicit_padding(padding, kernel_size, dilation)
        if padding_mode == "zeros":
            x = F.pad(x, pad, mode="constant", value=float(pad_value))
        else:
            x = F.pad(x, pad, mode=padding_mode)
        y = conv(x, w, inner_bias, stride, 0, dilation, groups)
    if not quantized:
        return y
    if divisor is not None:
        y = y / divisor
    return scale_and_bias(y, scale, bias, spatial_dims=ndim)


def _integer_input(x: torch.Tensor, quantizer: Callable, pad_value: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x_int, s)`` when the quantizer factors its output into integers and ONE divisor
    (``integer_factor``: ``dorefa``, ``dorefa_sym``) and the padding is zero, else ``(q(x), None)``."""
    integer_factor = quant.current_method(quantizer, "integer_factor")
    if integer_factor is None or pad_value != 0.0:
        return quantizer(x), None
    x_int, s = integer_factor(x)
    if isinstance(s, torch.Tensor) and s.numel() != 1:  # a per-token divisor (absmax8): not a conv's
        return x_int / s, None
    return x_int, s


def qlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    input_quantizer: Callable | None = None,
    weight_quantizer: Callable | None = None,
) -> torch.Tensor:
    """Quantized linear map: ``y = (q_in(x) @ levels(W).T) * scale + bias`` (see :func:`qconv`).

    An input quantizer with an ``integer_factor`` method (``absmax8``: ``q_in(x) = x_int / s`` per
    token) is applied as ``y = (x_int @ levels(W).T) / s * scale + bias``: the integer sum first
    (exact in float32 for integer levels while ``|sum| < 2^24``), then three float roundings in
    this order, as the packed engine's int8 kernels compute it.
    """
    if input_quantizer is None and weight_quantizer is None:
        return F.linear(x, weight, bias)
    integer_factor = quant.current_method(input_quantizer, "integer_factor")
    if integer_factor is not None:
        x_int, s = integer_factor(x)
        w, scale = weight_factors(weight, weight_quantizer)
        return scale_and_bias(F.linear(x_int, w) / s, scale, bias, spatial_dims=0)
    if input_quantizer is not None:
        x = input_quantizer(x)
    w, scale = weight_factors(weight, weight_quantizer)
    return scale_and_bias(F.linear(x, w), scale, bias, spatial_dims=0)


def weight_factors(weight: torch.Tensor, weight_quantizer: Callable | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(levels, scale)`` with ``q_w(W) = levels * scale``; ``scale`` is ``[C_out]`` or None (1).

    Quantizers with a :meth:`~onebit.quant.Quantizer.factor` method provide both (the
    levels carry the straight-through gradient, the scale is a constant); any other
    quantizer (or callable) gives ``(q_w(W), None)``, and so does a subclass that overrides
    ``forward`` below the class defining ``factor`` (its ``factor`` no longer describes its
    forward: :func:`onebit.quant.current_method`).
    """
    if weight_quantizer is None:
        return weight, None
    factor = quant.current_method(weight_quantizer, "factor")
    if factor is None:
        return weight_quantizer(weight), None
    return factor(weight)


def scale_and_bias(
    y: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, spatial_dims: int
) -> torch.Tensor:
    """``fl(fl(y * scale) + bias)`` per channel: two roundings, in this order.

    The channel dimension is the one before the last ``spatial_dims`` (any batch rank).
    """
    if scale is None and bias is None:
        return y
    shape = [-1] + [1] * spatial_dims
    if scale is not None:
        y = y * scale.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


#: float32 holds every integer of magnitude up to 2^24: a sum whose partial sums stay below it is exact
EXACT_SUM = 2**24


def exact_sum_taps(input_quantizer: Callable | None, weight_quantizer: Callable | None) -> int | None:
    """The most taps (products summed per output: ``C_in / groups * prod(kernel)``, or ``in_features``)
    whose integer sum stays exact in float32, for a layer with a ``signed`` (int8) input or weight code:
    the largest ``t`` with ``t * largest(x_int) * largest(level) < 2^24`` (1040 for int8 x int8: every
    partial sum of such products is at most that bound, in any order). None when the layer sums no
    integers of a signed code (no bound is checked)."""
    input_code = quant.integer_code_of(input_quantizer)
    weight_code = quant.factor_code_of(weight_quantizer)
    if input_code is None or weight_code is None or "signed" not in (input_code.kind, weight_code.kind):
        return None
    return (EXACT_SUM - 1) // (input_code.largest * weight_code.largest)


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(value)
