"""A model constructor whose convolution, activation, normalization and block are arguments.

In the spirit of model_constructor: a network is a stem, a list of stages of
blocks, and a head; every 3x3 convolution inside the blocks is built by
``conv_layer``, every activation by ``act_fn`` and every normalization by
``norm_layer``, so any zoo model can be rebuilt with float convolutions, binary
convolutions or :class:`onebit.nn.twist.TwistConv2d`::

    from onebit.models import ModelConstructor, create
    net = create("birealnet18", conv_layer="twist")          # Bi-Real Net with binary twist convs
    net = create("birealnet18", conv_layer="float", act_fn="relu")  # its float twin
    net = ModelConstructor(block="basic", layers=(2, 2, 2, 2), conv_layer="binary")()

``conv_layer`` is an alias (``"float"``: ``nn.Conv2d``; ``"binary"``:
``onebit.nn.QConv2d``; ``"twist"``: ``TwistConv2d``) or any callable. The contract:
the constructor calls ``conv_layer(in_channels, out_channels, 3, stride=s, padding=1)``
and adds ``bias=False`` when the callable accepts ``bias`` (or ``**kwargs``), so a
``functools.partial(TwistConv2d, groups="auto")`` or an ``nn.Conv2d`` subclass works as is.
The constructor's ``input_quantizer`` and ``weight_quantizer`` are passed to
``conv_layer`` when it accepts them (so ``nn.Conv2d`` drops them; a float twin of a
binary model also needs ``act_fn="relu"``, since its only nonlinearity was the sign);
``"binary"`` uses ``ste_sign`` for a quantizer left at ``None``.

The stem's first convolution, the real-valued downsampling shortcuts (average
pooling and a 1x1 conv, or the 1x1 transition of DenseNets) and the classifier
stay float, as the binary-network papers keep them; ``float_layers="int8"`` makes them
int8 ``QConv2d`` / ``QLinear`` layers instead (:mod:`onebit.nn.float_layers`).

Every block class takes ``(in_channels, out_channels, stride, *, conv, act_fn,
norm_layer)`` where ``conv(c_in, c_out, stride)`` builds a 3x3 convolution and
exposes ``out_channels``; forward passes contain no data-dependent Python
control flow (the networks are fx-traceable with onebit layers as leaves).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onebit import quant
from onebit.nn import QConv2d
from onebit.nn import float_layers as kept
from onebit.nn.twist import TwistConv2d

__all__ = [
    "ModelConstructor",
    "Net",
    "BasicBlock",
    "BiRealBlock",
    "DenseLayer",
    "Transition",
    "CONV_LAYERS",
    "BLOCKS",
    "make_act",
    "make_conv_factory",
]

CONV_LAYERS: dict[str, Callable[..., nn.Module]] = {"float": nn.Conv2d, "binary": QConv2d, "twist": TwistConv2d}
ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda c: nn.ReLU(),
    "prelu": lambda c: nn.PReLU(c),
    "hardtanh": lambda c: nn.Hardtanh(),
    "identity": lambda c: nn.Identity(),
    "none": lambda c: nn.Identity(),
}
NORMS: dict[str, Callable[[int], nn.Module]] = {"batchnorm": nn.BatchNorm2d, "identity": lambda c: nn.Identity()}


def channel_affine(channels: int) -> nn.Conv2d:
    """A learnable per-channel scale and shift ``y_c = a_c * x_c + b_c`` (a = 1, b = 0 at start).

    In front of a sign it learns where each channel is cut (ReActNet's RSign, Liu et al. 2020,
    learns the shift; the scale moves the straight-through window). It is a depthwise 1x1
    ``nn.Conv2d`` with a bias, so every tool that knows a float convolution (the packed engine,
    BatchNorm merging, summaries) handles it."""
    m = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.zero_()
    return m


PRE_SIGN: dict[str, Callable[[int], nn.Module]] = {
    "affine": channel_affine,
    "batchnorm": nn.BatchNorm2d,
    "identity": lambda c: nn.Identity(),
    "none": lambda c: nn.Identity(),
}

ActLike = str | type | nn.Module | Callable[[int], nn.Module] | None


def _from_alias(option: str, value, table: dict[str, Callable[[int], nn.Module]], channels: int) -> nn.Module:
    """``table[value](channels)`` for an alias, ``value(channels)`` for a factory, Identity for None."""
    if value is None:
        return nn.Identity()
    if isinstance(value, str):
        factory = table.get(value.lower())
        if factory is None:
            raise ValueError(f"unknown {option} {value!r}; known: {', '.join(table)}")
        return factory(channels)
    return value(channels)


def make_act(act_fn: ActLike, channels: int) -> nn.Module:
    """An activation module for ``channels`` channels from an alias (relu, prelu, hardtanh, identity),
    a module class (``nn.PReLU`` gets one slope per channel), an instance (copied) or a factory."""
    if isinstance(act_fn, nn.Module):
        return copy.deepcopy(act_fn)
    if isinstance(act_fn, type) and issubclass(act_fn, nn.Module):
        return act_fn(channels) if issubclass(act_fn, nn.PReLU) else act_fn()
    return _from_alias("act_fn", act_fn, ACTIVATIONS, channels)


def make_pre_sign(pre_sign: str | Callable[[int], nn.Module] | None, channels: int) -> nn.Module:
    """The module in front of a binary conv's sign from an alias (affine, batchnorm, identity) or a factory."""
    return _from_alias("pre_sign", pre_sign, PRE_SIGN, channels)


def make_norm(norm_layer: str | Callable[[int], nn.Module] | None, channels: int) -> nn.Module:
    """A normalization module from an alias (batchnorm, identity) or a factory."""
    return _from_alias("norm_layer", norm_layer, NORMS, channels)


@functools.cache
def _accepted(fn: Callable) -> frozenset[str] | None:
    """Keyword names ``fn`` accepts (None: any)."""
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def make_conv_factory(
    conv_layer: str | Callable[..., nn.Module], input_quantizer=None, weight_quantizer=None
) -> Callable[[int, int, int], nn.Module]:
    """``conv(c_in, c_out, stride)`` building a 3x3, padding-1, bias-free convolution with ``conv_layer``."""
    if isinstance(conv_layer, str):
        try:
            layer = CONV_LAYERS[conv_layer.lower()]
        except KeyError:
            raise ValueError(
                f"unknown conv_layer {conv_layer!r}; known: {', '.join(CONV_LAYERS)} or a callable"
            ) from None
        if conv_layer.lower() == "binary":
            input_quantizer = "ste_sign" if input_quantizer is None else input_quantizer
            weight_quantizer = "ste_sign" if weight_quantizer is None else weight_quantizer
    else:
        layer = conv_layer
    # "float" keeps that operand in float: binary activations with float weights (the first stage
    # of two-stage training, Martinez et al. 2020 and ReActNet), or float inputs (NoAct)
    input_quantizer = None if input_quantizer == "float" else input_quantizer
    weight_quantizer = None if weight_quantizer == "float" else weight_quantizer
    accepted = _accepted(layer.func if isinstance(layer, functools.partial) else layer)
    extra: dict[str, Any] = {}
    if accepted is None or "bias" in accepted:
        extra["bias"] = False
    if accepted is None or "input_quantizer" in accepted:
        extra["input_quantizer"] = input_quantizer
        extra["weight_quantizer"] = weight_quantizer

    def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Module:
        kwargs = dict(extra)
        for name in ("input_quantizer", "weight_quantizer"):
            if name in kwargs:  # each layer owns its quantizer modules
                kwargs[name] = copy.deepcopy(quant.get(kwargs[name]))
        return layer(c_in, c_out, 3, stride=stride, padding=1, **kwargs)

    return conv


def downsample_shortcut(
    c_in: int, c_out: int, stride: int, norm_layer, mode: str = "avgpool", float_layers: str = "float"
) -> nn.Module:
    """Real-valued shortcut: identity when shapes agree, else (average pooling then) a 1x1 conv (float,
    or int8 for ``float_layers="int8"``) and norm."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    layers: list[nn.Module] = []
    if mode == "avgpool":
        if stride > 1:
            layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
        layers.append(kept.conv2d(float_layers, c_in, c_out, 1, bias=False))
    elif mode == "conv":
        layers.append(kept.conv2d(float_layers, c_in, c_out, 1, stride=stride, bias=False))
    else:
        raise ValueError(f"unknown shortcut mode {mode!r}; known: avgpool, conv")
    layers.append(make_norm(norm_layer, c_out))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): ``act(bn(conv(act(bn(conv(x))))) + shortcut(x))``;
    downsampling shortcut: a strided 1x1 conv (float, or int8 for ``float_layers="int8"``) and norm."""

    shortcut_mode = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        conv,
        act_fn,
        norm_layer,
        float_layers: str = "float",
    ):
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = conv(in_channels, out_channels, stride)
        self.bn1 = make_norm(norm_layer, out_channels)
        self.act1 = make_act(act_fn, out_channels)
        self.conv2 = conv(out_channels, out_channels, 1)
        self.bn2 = make_norm(norm_layer, out_channels)
        self.shortcut = downsample_shortcut(
            in_channels, out_channels, stride, norm_layer, self.shortcut_mode, float_layers
        )
        self.act = make_act(act_fn, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act(y + self.shortcut(x))


class BiRealBlock(nn.Module):
    """Bi-Real Net's unit (Liu et al. 2018), also ResNetE's (Bethge et al. 2019): one binary conv with
    its own real-valued shortcut, ``act(bn(conv(pre(x))) + shortcut(x))``. The sign is the conv's input
    quantizer; ``act`` is the identity in both papers (ReActNet, Liu et al. 2020: a PReLU-like
    RPReLU); ``pre`` is the identity unless ``pre_sign`` names a module for the sign path only
    (``"affine"``: a learnable per-channel scale and shift, ReActNet's RSign). Downsampling
    shortcut: 2x2 average pooling, a 1x1 conv (float, or int8 for ``float_layers="int8"``) and norm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        conv,
        act_fn,
        norm_layer,
        pre_sign=None,
        float_layers: str = "float",
    ):
        super().__init__()
        self.out_channels = out_channels
        if pre_sign is not None:  # only then, so the state_dict keys of plain Bi-Real nets stay as they were
            self.pre = make_pre_sign(pre_sign, in_channels)
        self.conv = conv(in_channels, out_channels, stride)
        self.bn = make_norm(norm_layer, out_channels)
        self.shortcut = downsample_shortcut(in_channels, out_channels, stride, norm_layer, "avgpool", float_layers)
        self.act = make_act(act_fn, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pre(x) if hasattr(self, "pre") else x
        return self.act(self.bn(self.conv(y)) + self.shortcut(x))


class DenseLayer(nn.Module):
    """BinaryDenseNet's layer (Bethge et al. 2019): ``cat([x, conv(norm(x))])``, growing the
    channels by ``out_channels`` (the growth rate); ``stride`` must be 1 (transitions downsample)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, conv, act_fn, norm_layer):
        super().__init__()
        if stride != 1:
            raise ValueError("DenseLayer: downsampling happens in the transitions; stride must be 1")
        self.out_channels = in_channels + out_channels
        self.bn = make_norm(norm_layer, in_channels)
        self.conv = conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.bn(x))], dim=1)


class Transition(nn.Sequential):
    """DenseNet transition: norm, 2x2 max pooling, activation, 1x1 conv reducing the channels (float,
    or int8 for ``float_layers="int8"``)."""

    def __init__(self, in_channels: int, out_channels: int, *, act_fn, norm_layer, float_layers: str = "float"):
        super().__init__(
            OrderedDict(
                norm=make_norm(norm_layer, in_channels),
                pool=nn.MaxPool2d(2, 2, ceil_mode=True),
                act=make_act(act_fn, in_channels),
                conv=kept.conv2d(float_layers, in_channels, out_channels, 1, bias=False),
            )
        )
        self.out_channels = out_channels


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bireal": BiRealBlock, "dense": DenseLayer}


class Net(nn.Sequential):
    """A constructed network: ``stem``, ``stage1`` ... ``stageN``, ``head`` (an ``nn.Sequential``)."""


@dataclass
class ModelConstructor:
    """Assemble ``stem -> stages of blocks -> head``; call the instance to build the model.

    Fields:
        in_channels, num_classes: input channels and classifier outputs.
        block: ``"basic"`` (ResNet), ``"bireal"`` (one conv per shortcut), ``"dense"`` (BinaryDenseNet
            layer) or a block class.
        layers: blocks per stage.
        widths: output channels per stage (for dense blocks: the growth rate per stage).
        strides: stride of each stage's first block (dense stages: 1; transitions pool instead).
        reduction: dense networks only, the channel reduction of each transition (rounded to a
            multiple of 32 as in the BinaryDenseNet paper; at least 32).
        stem: ``"imagenet"`` (7x7 stride-2 conv and 3x3 stride-2 max pooling) or ``"small"``
            (3x3 stride-1 conv, for 28-32 px images); the stem conv is always float.
        stem_width: stem channels; stem_act: activation after the stem's norm.
        conv_layer: the blocks' 3x3 convolution (see the module docstring).
        input_quantizer, weight_quantizer: passed to ``conv_layer`` when it accepts them; ``"float"``
            keeps that operand in float (e.g. ``weight_quantizer="float"``: binary activations, float weights).
        act_fn: the blocks' activation; norm_layer: their normalization (``nn.BatchNorm2d``).
        pre_sign: Bi-Real blocks only, a module on the sign path in front of each block conv
            (``"affine"``, ``"batchnorm"`` or a factory ``f(channels)``; None: nothing).
        head_norm, head_act: norm / activation before global average pooling.
        dropout: dropout before the classifier.
        float_layers: the stem conv, the downsampling shortcut and transition convs and the classifier:
            ``"float"`` or ``"int8"`` (:mod:`onebit.nn.float_layers`; a block class given as ``block``
            takes it as the keyword ``float_layers`` when it is not ``"float"``).
    """

    in_channels: int = 3
    num_classes: int = 10
    block: str | type = "basic"
    layers: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    strides: Sequence[int] | None = None
    reduction: Sequence[float] = ()
    stem: str = "imagenet"
    stem_width: int = 64
    stem_act: ActLike = "relu"
    conv_layer: Any = "float"
    input_quantizer: Any = None
    weight_quantizer: Any = None
    act_fn: ActLike = "relu"
    norm_layer: Any = nn.BatchNorm2d
    pre_sign: Any = None
    head_norm: bool = False
    head_act: ActLike = None
    dropout: float = 0.0
    float_layers: str = "float"

    def replace(self, **changes) -> ModelConstructor:
        """A copy with ``changes``; unknown names raise ``ValueError`` listing the fields."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown model argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def _block_class(self) -> type[nn.Module]:
        if isinstance(self.block, str):
            try:
                return BLOCKS[self.block]
            except KeyError:
                raise ValueError(f"unknown block {self.block!r}; known: {', '.join(BLOCKS)} or a block class") from None
        return self.block

    def _float_layers_argument(self, block: type[nn.Module], dense: bool) -> dict[str, str]:
        """``{"float_layers": ...}`` for a block that builds shortcuts, when not ``"float"``; checks the value."""
        kept.check_float_layers(self.float_layers)
        if self.float_layers == "float" or dense:  # dense layers hold no shortcut; transitions take it
            return {}
        if "float_layers" not in inspect.signature(block).parameters:
            raise ValueError(
                f"float_layers={self.float_layers!r}: block {block.__name__} takes no float_layers argument "
                "for its shortcut convs"
            )
        return {"float_layers": self.float_layers}

    def make_stem(self) -> nn.Sequential:
        c = self.stem_width
        if self.stem == "imagenet":
            return nn.Sequential(
                OrderedDict(
                    conv=kept.conv2d(self.float_layers, self.in_channels, c, 7, stride=2, padding=3, bias=False),
                    norm=make_norm(self.norm_layer, c),
                    act=make_act(self.stem_act, c),
                    pool=nn.MaxPool2d(3, stride=2, padding=1),
                )
            )
        if self.stem == "small":
            return nn.Sequential(
                OrderedDict(
                    conv=kept.conv2d(self.float_layers, self.in_channels, c, 3, stride=1, padding=1, bias=False),
                    norm=make_norm(self.norm_layer, c),
                    act=make_act(self.stem_act, c),
                )
            )
        raise ValueError(f"unknown stem {self.stem!r}; known: imagenet, small")

    def make_head(self, channels: int) -> nn.Sequential:
        parts: list[tuple[str, nn.Module]] = []
        if self.head_norm:
            parts.append(("norm", make_norm(self.norm_layer, channels)))
        if self.head_act is not None:
            parts.append(("act", make_act(self.head_act, channels)))
        parts += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
        if self.dropout:
            parts.append(("dropout", nn.Dropout(self.dropout)))
        parts.append(("fc", kept.linear(self.float_layers, channels, self.num_classes)))
        return nn.Sequential(OrderedDict(parts))

    def __call__(self) -> Net:
        if len(self.layers) != len(self.widths):
            raise ValueError(f"layers {list(self.layers)} and widths {list(self.widths)} must have the same length")
        block = self._block_class()
        dense = issubclass(block, DenseLayer)
        strides = (
            list(self.strides)
            if self.strides is not None
            else [1 if (i == 0 or dense) else 2 for i in range(len(self.layers))]
        )
        conv = make_conv_factory(self.conv_layer, self.input_quantizer, self.weight_quantizer)
        extra = self._float_layers_argument(block, dense)
        if self.pre_sign is not None and str(self.pre_sign).lower() not in ("none", "identity"):
            if "pre_sign" not in inspect.signature(block).parameters:
                raise ValueError(f"pre_sign={self.pre_sign!r}: block {block.__name__} has no sign path to put it on")
            extra["pre_sign"] = self.pre_sign
        modules: list[tuple[str, nn.Module]] = [("stem", self.make_stem())]
        channels = self.stem_width
        for i, (n, width, stride) in enumerate(zip(self.layers, self.widths, strides)):
            blocks = []
            for j in range(n):
                b = block(
                    channels,
                    width,
                    stride if j == 0 else 1,
                    conv=conv,
                    act_fn=self.act_fn,
                    norm_layer=self.norm_layer,
                    **extra,
                )
                channels = b.out_channels
                blocks.append(b)
            if dense and i < len(self.layers) - 1:
                r = self.reduction[i] if i < len(self.reduction) else 2.0
                reduced = max(32, int(round(channels / r / 32)) * 32)
                t = Transition(
                    channels, reduced, act_fn="relu", norm_layer=self.norm_layer, float_layers=self.float_layers
                )
                channels = t.out_channels
                blocks.append(t)
            modules.append((f"stage{i + 1}", nn.Sequential(*blocks)))
        modules.append(("head", self.make_head(channels)))
        return Net(OrderedDict(modules))
