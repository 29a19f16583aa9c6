"""Native binary linear layers: 1x1 binary convolutions of 1x1 images (packed ``[N, Wg]`` x ``[Out, Wg]``)."""

from __future__ import annotations

import torch

from onebit.engine.geometry import check_linear, words_for
from onebit.engine.kernels.conv import binary_conv2d, binary_conv2d_int, binary_conv2d_threshold

__all__ = ["binary_linear_int", "binary_linear", "binary_linear_threshold"]


def _conv_views(xp, wp, in_features):
    """``xp`` and ``wp`` as a 1x1 convolution's input and weight, its arguments, ``N`` and ``Out``."""
    n, out, wg = check_linear(xp, wp, in_features)
    conv = dict(in_channels=in_features, out_channels=out, kernel_size=1)
    return xp.view(n, 1, 1, 1, wg), wp.view(out, 1, 1, wg), conv, n, out


def binary_linear_int(xp: torch.Tensor, wp: torch.Tensor, *, in_features: int) -> torch.Tensor:
    """int32 ``[N, Out]``: ``acc = in_features - 2 popcount(x xor w)`` (packed ``[N, Wg]`` x ``[Out, Wg]``)."""
    x4, w4, conv, n, out = _conv_views(xp, wp, in_features)
    return binary_conv2d_int(x4, w4, **conv).reshape(n, out)


def binary_linear(
    xp: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_features: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[N, Out]`` ``= acc * scale + bias`` (see :func:`binary_linear_int`, ``binary_conv2d``)."""
    x4, w4, conv, n, out = _conv_views(xp, wp, in_features)
    return binary_conv2d(x4, w4, scale=scale, bias=bias, **conv).reshape(n, out)


def binary_linear_threshold(
    xp: torch.Tensor, wp: torch.Tensor, *, in_features: int, thresholds: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """Packed int64 ``[N, ceil(Out / 64)]`` of the thresholded accumulators (see ``binary_conv2d_threshold``)."""
    x4, w4, conv, n, out = _conv_views(xp, wp, in_features)
    return binary_conv2d_threshold(x4, w4, thresholds=thresholds, direction=direction, **conv).reshape(
        n, words_for(out)
    )
