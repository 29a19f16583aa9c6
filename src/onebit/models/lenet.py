"""LeNet-style networks for small images (8x8 digits and up): a float reference and its binary twin."""

from __future__ import annotations

from torch import nn

from onebit.models.registry import register_model
from onebit.nn import QConv2d, QLinear


def _lenet(num_classes: int, in_channels: int, width: int, binary: bool) -> nn.Sequential:
    q = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"} if binary else {}
    conv = QConv2d if binary else nn.Conv2d
    linear = QLinear if binary else nn.Linear
    act = (lambda: nn.Identity()) if binary else (lambda: nn.ReLU(inplace=False))
    w1, w2, hidden = width, 2 * width, 4 * width
    return nn.Sequential(
        # float first layer (binary networks keep their stem real-valued)
        nn.Conv2d(in_channels, w1, 3, padding=1, bias=False),
        nn.BatchNorm2d(w1),
        act(),
        conv(w1, w2, 3, padding=1, bias=False, **q),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.BatchNorm2d(w2),
        act(),
        conv(w2, w2, 3, padding=1, bias=False, **q),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.BatchNorm2d(w2),
        act(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        linear(4 * w2, hidden, bias=False, **q),
        nn.BatchNorm1d(hidden),
        act(),
        # float classifier
        nn.Linear(hidden, num_classes),
    )


@register_model
def lenet(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """Float LeNet-style CNN: conv-BN-ReLU stem, two conv-pool-BN-ReLU stages, an MLP head."""
    return _lenet(num_classes, in_channels, width, binary=False)


@register_model
def lenet_binary(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """Binary LeNet (BinaryNet layout): float stem and classifier, binary (ste_sign) convs and
    hidden linear layer in between, each binary layer followed by pooling and BatchNorm,
    whose output the next layer's sign quantizes."""
    return _lenet(num_classes, in_channels, width, binary=True)


@register_model
def lenet_larq(
    num_classes: int = 10,
    in_channels: int = 1,
    binary: bool = True,
    input_quantizer: str | None = "ste_sign",
    weight_quantizer: str | None = "ste_sign",
) -> nn.Module:
    """The small binary CNN of larq's introduction, for 28x28 images (Fashion-MNIST, MNIST).

    Binary 3x3 "valid" convs of 32, 64 and 64 channels (the first one has float inputs and binary
    weights), 2x2 max pooling after the first two, BatchNorm after each; a binary dense layer of 64
    units with BatchNorm, and a binary dense classifier followed by BatchNorm, as in larq's example
    (~93k binary weights). 28x28 inputs give 3x3 maps before flattening; an adaptive max pooling
    to 3x3 lets larger inputs through unchanged in structure.

    ``binary=False`` is its float twin (float layers, ReLU after each BatchNorm but the last);
    ``input_quantizer="approx_sign"`` is the Bi-Real gradient variant.
    """
    if binary:
        qi = {"input_quantizer": input_quantizer, "weight_quantizer": weight_quantizer}
        qw = {"input_quantizer": None, "weight_quantizer": weight_quantizer}
        conv, linear = QConv2d, QLinear
        act = nn.Identity
    else:
        qi = qw = {}
        conv, linear = nn.Conv2d, nn.Linear
        act = nn.ReLU
    return nn.Sequential(
        conv(in_channels, 32, 3, bias=False, **qw),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(32),
        act(),
        conv(32, 64, 3, bias=False, **qi),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(64),
        act(),
        conv(64, 64, 3, bias=False, **qi),
        nn.BatchNorm2d(64),
        act(),
        nn.AdaptiveMaxPool2d(3),
        nn.Flatten(),
        linear(64 * 9, 64, bias=False, **qi),
        nn.BatchNorm1d(64),
        act(),
        linear(64, num_classes, bias=False, **qi),
        nn.BatchNorm1d(num_classes),
    )
