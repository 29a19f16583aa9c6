"""ResNet-18 (float reference) and ResNetE-18 / BinaryResNetE18 (Bethge et al. 2019)."""

from __future__ import annotations

from torch import nn

from onebit.models.constructor import ModelConstructor
from onebit.models.registry import register_model

__all__ = ["RESNET18", "RESNETE18", "resnet18", "resnete18"]

#: He et al. (2016), ResNet-18: 7x7 stem, four stages of two basic blocks, strided 1x1 shortcuts.
RESNET18 = ModelConstructor(
    block="basic", layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_act="relu", act_fn="relu"
)

#: Bethge et al. (2019), "Back to Simplicity" (larq zoo's BinaryResNetE18): float 7x7 stem with
#: ReLU and max pooling, 16 binary 3x3 convs (ste_sign inputs and weights, no scaling), each with its
#: own real-valued shortcut (2x2 average pooling + float 1x1 conv + BN when downsampling), ReLU
#: before global pooling, float classifier. Train with latent-weight clipping (``--weight-clip``).
RESNETE18 = ModelConstructor(
    block="bireal",
    layers=(4, 4, 4, 4),
    widths=(64, 128, 256, 512),
    stem_act="relu",
    conv_layer="binary",
    input_quantizer="ste_sign",
    weight_quantizer="ste_sign",
    act_fn=None,
    head_act="relu",
)


def _build(base: ModelConstructor, num_classes: int, in_channels: int, overrides: dict) -> nn.Module:
    return base.replace(num_classes=num_classes, in_channels=in_channels, **overrides)()


@register_model
def resnet18(num_classes: int = 10, in_channels: int = 3, **overrides) -> nn.Module:
    """Float ResNet-18 (He et al. 2016); ``stem="small"`` for 28-32 px images; any
    :class:`~onebit.models.ModelConstructor` field can be overridden (e.g. ``conv_layer="twist"``)."""
    return _build(RESNET18, num_classes, in_channels, overrides)


@register_model
def resnete18(num_classes: int = 10, in_channels: int = 3, **overrides) -> nn.Module:
    """Binary ResNetE-18 (Bethge et al. 2019, larq zoo's BinaryResNetE18)."""
    return _build(RESNETE18, num_classes, in_channels, overrides)
