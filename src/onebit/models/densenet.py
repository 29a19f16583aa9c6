"""BinaryDenseNet (Bethge et al. 2019): dense blocks of binary convs, float transitions."""

from __future__ import annotations

from torch import nn

from onebit.models.constructor import ModelConstructor
from onebit.models.registry import register_model
from onebit.models.resnet import _build

__all__ = ["BINARY_DENSENET", "binary_densenet28", "binary_densenet37", "binary_densenet45"]

#: Shared settings: float 7x7 stem (64 channels, BN, ReLU, max pooling); dense layers
#: ``cat([x, conv(bn(x))])`` with binary 3x3 convs (ste_sign inputs and weights) of growth rate 64;
#: transitions BN, 2x2 max pooling, ReLU and a float 1x1 conv reducing the channels by ``reduction``
#: (rounded to a multiple of 32); BN and ReLU before global pooling; float classifier.
BINARY_DENSENET = ModelConstructor(
    block="dense",
    widths=(64, 64, 64, 64),
    stem_act="relu",
    conv_layer="binary",
    input_quantizer="ste_sign",
    weight_quantizer="ste_sign",
    act_fn=None,
    head_norm=True,
    head_act="relu",
)

_VARIANTS = {
    28: ((6, 6, 6, 5), (2.7, 2.7, 2.2)),
    37: ((6, 8, 12, 6), (3.3, 3.3, 4.0)),
    45: ((6, 12, 14, 8), (2.7, 3.3, 4.0)),
}


def _densenet(depth: int, num_classes: int, in_channels: int, overrides: dict) -> nn.Module:
    layers, reduction = _VARIANTS[depth]
    base = BINARY_DENSENET.replace(layers=layers, reduction=reduction)
    return _build(base, num_classes, in_channels, overrides)


@register_model
def binary_densenet28(num_classes: int = 10, in_channels: int = 3, **overrides) -> nn.Module:
    """BinaryDenseNet28: dense blocks of 6, 6, 6, 5 binary layers, reductions 2.7, 2.7, 2.2."""
    return _densenet(28, num_classes, in_channels, overrides)


@register_model
def binary_densenet37(num_classes: int = 10, in_channels: int = 3, **overrides) -> nn.Module:
    """BinaryDenseNet37: dense blocks of 6, 8, 12, 6 binary layers, reductions 3.3, 3.3, 4."""
    return _densenet(37, num_classes, in_channels, overrides)


@register_model
def binary_densenet45(num_classes: int = 10, in_channels: int = 3, **overrides) -> nn.Module:
    """BinaryDenseNet45: dense blocks of 6, 12, 14, 8 binary layers, reductions 2.7, 3.3, 4."""
    return _densenet(45, num_classes, in_channels, overrides)
