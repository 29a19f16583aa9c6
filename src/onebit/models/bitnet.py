"""A small BitNet b1.58 network: BitLinear layers (ternary weights, 8-bit tokens) in an MLP."""

from __future__ import annotations

from torch import nn

from onebit.models.registry import register_model
from onebit.nn import BitLinear


@register_model
def bitnet_mlp(
    num_classes: int = 10, in_channels: int = 1, hidden: int = 256, depth: int = 2, grid: int = 8
) -> nn.Module:
    """An MLP of ``depth`` BitLinear layers (``hidden`` units, ReLU) and a float classifier.

    The image is average-pooled to ``grid x grid`` (the identity on 8x8 digits) and flattened;
    every hidden layer is a :class:`~onebit.nn.BitLinear` (RMSNorm, ``absmax8`` tokens, ``ternary``
    weights); the classifier stays float, as BitNet keeps its embedding and output head. The packed
    engine runs the BitLinear layers on its ternary x int8 kernels, bit-identical to the model.
    """
    if depth < 1 or hidden < 1 or grid < 1:
        raise ValueError(f"bitnet_mlp: depth, hidden and grid must be >= 1, got {depth}, {hidden}, {grid}")
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(grid), nn.Flatten()]
    features = in_channels * grid * grid
    for _ in range(depth):
        layers += [BitLinear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)
