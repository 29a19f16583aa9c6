r"""A BatchNorm in eval mode as a per-channel affine map, in float64.

With running statistics, ``bn(y) = gamma (y - mean) / sqrt(var + eps) + beta`` is affine in
``y``; after an affine map ``y = x * scale + bias`` of its own it still is:

    g = gamma / sqrt(var + eps)                    (gamma = 1 when the BatchNorm has none)
    bn(x * scale + bias) = x * s + t,    s = scale * g,    t = (bias - mean) * g + beta

Without ``scale`` and ``bias``, ``s = g`` and ``t = beta - mean * g`` (``beta = 0`` when absent).
The canonizers merge ``s`` and ``t`` into a neighbouring layer (:mod:`onebit.canonize.merge`);
the packed engine folds them into a binary conv's scale and bias (``pack(fold_batchnorm=True)``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["batchnorm_affine"]


def batchnorm_affine(
    bn: nn.Module,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    reciprocal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(s, t)`` in float64 with ``bn(x * scale + bias) = x * s + t`` for ``bn`` in eval mode.

    ``scale`` and ``bias`` are optional per-channel vectors (any float dtype, computed with in
    float64). Each value is rounded once per operation, in this order:

    - ``g = gamma / sqrt(var + eps)``, or ``gamma * (1 / sqrt(var + eps))`` with ``reciprocal=True``
      (``g = 1 / sqrt(var + eps)`` either way when ``bn`` has no ``gamma``);
    - ``s = scale * g`` (``g`` without ``scale``);
    - with ``bias``: ``t = (bias - mean) * g + beta`` (``beta = 0`` when absent);
      without: ``t = -mean * g``, ``+ beta`` when ``bn`` has one.
    """
    std = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    mean = bn.running_mean.detach().double()
    beta = bn.bias.detach().double() if bn.bias is not None else None
    if bn.weight is None:
        g = 1.0 / std
    elif reciprocal:
        g = bn.weight.detach().double() * (1.0 / std)
    else:
        g = bn.weight.detach().double() / std
    s = g if scale is None else scale.double() * g
    if bias is None:
        t = -mean * g
        if beta is not None:
            t = t + beta
    else:
        t = (bias.double() - mean) * g + (beta if beta is not None else torch.zeros_like(g))
    return s, t
