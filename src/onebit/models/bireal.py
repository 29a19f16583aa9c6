"""Bi-Real Net (Liu et al. 2018): a real-valued shortcut around every binary convolution."""

from __future__ import annotations

from torch import nn

from onebit.models.constructor import ModelConstructor
from onebit.models.registry import register_model
from onebit.models.resnet import _build

__all__ = [
    "BIREALNET18",
    "BIREALNET_SMALL",
    "BIREALNET_SMALL_REACT",
    "BIREALNET_SMALL_REACT_WIDE",
    "birealnet18",
    "birealnet_small",
    "birealnet_small_react",
    "birealnet_small_react_wide",
]

#: Bi-Real Net 18: float 7x7 stem with BN and max pooling (no ReLU), 16 binary 3x3 convs, each
#: ``bn(conv(sign(x))) + shortcut(x)`` with ApproxSign activations and magnitude-aware binary
#: weights (sign(W) times the mean |W| per output channel), real-valued downsampling shortcuts
#: (2x2 average pooling, float 1x1 conv, BN), global pooling and a float classifier.
BIREALNET18 = ModelConstructor(
    block="bireal",
    layers=(4, 4, 4, 4),
    widths=(64, 128, 256, 512),
    stem_act=None,
    conv_layer="binary",
    input_quantizer="approx_sign",
    weight_quantizer="magnitude_aware_sign",
    act_fn=None,
)

#: A small Bi-Real-style network for 28-32 px images (Fashion-MNIST, CIFAR): float 3x3 stem,
#: three stages of two Bi-Real units (32, 64, 128 channels, each stage halving the resolution),
#: the same quantizers and real-valued shortcuts as Bi-Real Net 18.
BIREALNET_SMALL = BIREALNET18.replace(
    stem="small", stem_width=32, layers=(2, 2, 2), widths=(32, 64, 128), strides=(2, 2, 2)
)


@register_model
def birealnet18(num_classes: int = 10, in_channels: int = 3, **overrides) -> nn.Module:
    """Bi-Real Net 18 (Liu et al. 2018); ``stem="small"`` for 28-32 px images; any
    :class:`~onebit.models.ModelConstructor` field can be overridden (``conv_layer="float", act_fn="relu"``
    gives its float twin: without the sign, a Bi-Real network has no nonlinearity, so the twin needs an
    activation)."""
    return _build(BIREALNET18, num_classes, in_channels, overrides)


@register_model
def birealnet_small(num_classes: int = 10, in_channels: int = 1, **overrides) -> nn.Module:
    """A small Bi-Real-style network for 28-32 px images (see ``BIREALNET_SMALL``)."""
    return _build(BIREALNET_SMALL, num_classes, in_channels, overrides)


#: ``BIREALNET_SMALL`` with two ReActNet (Liu et al. 2020) changes: a learnable per-channel scale and
#: shift in front of every sign (``pre_sign="affine"``, a depthwise 1x1 float conv: RSign's learned
#: threshold) and a PReLU after every residual add (RPReLU's slope; its two shifts are absorbed by
#: the BatchNorm before the add and the next block's affine). Float twin: ``conv_layer="float"``
#: (the PReLUs keep it nonlinear).
BIREALNET_SMALL_REACT = BIREALNET_SMALL.replace(pre_sign="affine", act_fn="prelu")


@register_model
def birealnet_small_react(num_classes: int = 10, in_channels: int = 1, **overrides) -> nn.Module:
    """``birealnet_small`` with learnable sign thresholds and PReLUs (see ``BIREALNET_SMALL_REACT``)."""
    return _build(BIREALNET_SMALL_REACT, num_classes, in_channels, overrides)


#: ``BIREALNET_SMALL_REACT`` with its second and third stages widened to 96 and 192 channels
#: and its first to 48 (the stem stays 32): 2.2x the parameters (687k, 6 binary convs) for
#: 1.6x the training step; the small Bi-Real network that reaches 92 % on Fashion-MNIST in 15
#: epochs (docs/training.md). Float twin: ``conv_layer="float"``.
BIREALNET_SMALL_REACT_WIDE = BIREALNET_SMALL_REACT.replace(widths=(48, 96, 192))


@register_model
def birealnet_small_react_wide(num_classes: int = 10, in_channels: int = 1, **overrides) -> nn.Module:
    """``birealnet_small_react`` with widths 48, 96, 192 (see ``BIREALNET_SMALL_REACT_WIDE``)."""
    return _build(BIREALNET_SMALL_REACT_WIDE, num_classes, in_channels, overrides)
