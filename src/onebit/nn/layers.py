"""Quantized layers, drop-in for their ``torch.nn`` counterparts.

``QConv1d/2d/3d`` and ``QLinear`` subclass the torch layers: same positional
arguments and defaults, same ``state_dict`` keys, ``deepcopy``, ``extra_repr``
and ``torch.compile`` behaviour, plus keyword-only ``input_quantizer``,
``weight_quantizer`` and (for convolutions) ``pad_value``::

    y = conv(pad(q_in(x), value=pad_value), q_w(W)) + bias

``input_quantizer=None`` keeps the input float (the "NoAct" variant: float input,
binary weights). Forward never writes to a parameter or buffer, in train or
eval mode: the quantized weight is recomputed from the latent float weight at
every call (one exception: an ``int8`` input quantizer sets its step from its first
training batch, once). A layer whose integer sum could pass 2^24 (an int8 layer of more
than 1040 taps) is refused when built. Any input layout (contiguous, permuted, channels_last, strided)
gives the same result.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from onebit import quant
from onebit.nn import functional as QF

__all__ = ["QActivation", "QLinear", "QConv1d", "QConv2d", "QConv3d", "QuantizedLayer"]

_PAD_VALUES = (0.0, 1.0, -1.0)


class QuantizedLayer:
    """Mixin of onebit's weight layers: quantizers, precision and input checks."""

    input_quantizer: nn.Module | None
    weight_quantizer: nn.Module | None

    def _init_quantizers(self, input_quantizer, weight_quantizer) -> None:
        self.input_quantizer = quant.get(input_quantizer)
        self.weight_quantizer = quant.get(weight_quantizer)
        self._check_exact_sum()

    def taps(self) -> int | None:
        """Products summed per output value (``C_in / groups * prod(kernel)``, ``in_features``); None: unknown."""
        return None

    def _check_exact_sum(self) -> None:
        """Refuse an int8 layer whose integer sum could pass 2^24 (:func:`onebit.nn.functional.exact_sum_taps`)."""
        limit = QF.exact_sum_taps(self.input_quantizer, self.weight_quantizer)
        taps = self.taps()
        if limit is not None and taps is not None and taps > limit:
            raise ValueError(
                f"{self._layer_name()}: {taps} taps per output, over the {limit} whose integer sum of "
                f"{self.input_precision}-bit inputs and {self.weight_precision}-bit weights stays exact in float32 "
                f"(taps * largest input * largest level < 2^24); use fewer input channels per group or a smaller kernel"
            )

    @property
    def input_precision(self) -> int:
        return quant.precision_of(self.input_quantizer)

    @property
    def weight_precision(self) -> int:
        return quant.precision_of(self.weight_quantizer)

    def quantized_weight(self) -> torch.Tensor:
        """``q_w(W)``: the weight this layer computes with (a new tensor; W is untouched)."""
        w = self.weight
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def _layer_name(self) -> str:
        name = getattr(self, "_onebit_name", None)
        described = f"{type(self).__name__}({self._torch_extra_repr()})"
        return f"layer '{name}' {described}" if name else described

    def _torch_extra_repr(self) -> str:
        raise NotImplementedError

    def _check_input(
        self, x: torch.Tensor, channel_dim_from_end: int, channels: int, ranks: tuple[int, ...], shape_hint: str
    ) -> None:
        if isinstance(x, torch.fx.Proxy):
            return  # symbolic tracing: nothing to check yet
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._layer_name()}: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() not in ranks:
            raise ValueError(
                f"{self._layer_name()}: expected input of shape {shape_hint} "
                f"(rank {' or '.join(map(str, ranks))}), got shape {list(x.shape)}"
            )
        if x.shape[-channel_dim_from_end] != channels:
            raise ValueError(
                f"{self._layer_name()}: expected input of shape {shape_hint} with {channels} channels, "
                f"got shape {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{self._layer_name()}: expected a floating-point input, got dtype {x.dtype}")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts both
            raise TypeError(
                f"{self._layer_name()}: input dtype {x.dtype} does not match the layer's dtype "
                f"{self.weight.dtype}; convert one of them (e.g. model.to({x.dtype}))"
            )

    def _quant_repr(self) -> str:
        # Module quantizers are children and print as such; plain callables are named here.
        parts = []
        for field in ("input_quantizer", "weight_quantizer"):
            q = getattr(self, field)
            if q is not None and not isinstance(q, nn.Module):
                parts.append(f"{field}={getattr(q, '__name__', repr(q))}")
        return ", ".join(parts)


class QActivation(nn.Module):
    """Apply a quantizer as a layer: ``y = q(x)`` (e.g. ``QActivation("ste_sign")``)."""

    def __init__(self, quantizer: quant.QuantizerLike = "ste_sign"):
        super().__init__()
        q = quant.get(quantizer)
        if q is None:
            raise ValueError("QActivation needs a quantizer, got None")
        self.quantizer = q

    @property
    def precision(self) -> int:
        return quant.precision_of(self.quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x)


class QLinear(QuantizedLayer, nn.Linear):
    """``y = q_in(x) @ q_w(W).T + bias``; drop-in for ``nn.Linear``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        input_quantizer: quant.QuantizerLike = None,
        weight_quantizer: quant.QuantizerLike = None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(input_quantizer, weight_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, 1, self.in_features, tuple(range(1, 9)), f"[*, {self.in_features}]")
        return QF.qlinear(
            x, self.weight, self.bias, input_quantizer=self.input_quantizer, weight_quantizer=self.weight_quantizer
        )

    def taps(self) -> int:
        return self.in_features

    def _torch_extra_repr(self) -> str:
        return nn.Linear.extra_repr(self)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        quant_repr = self._quant_repr()
        return f"{base}, {quant_repr}" if quant_repr else base


class _QConvNd(QuantizedLayer):
    _ndim: int

    def taps(self) -> int:
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    def _init_q(self, input_quantizer, weight_quantizer, pad_value) -> None:
        self._init_quantizers(input_quantizer, weight_quantizer)
        if not isinstance(pad_value, (int, float)) or float(pad_value) not in _PAD_VALUES:
            raise ValueError(f"{type(self).__name__}: pad_value must be 0.0, 1.0 or -1.0, got {pad_value!r}")
        if self.padding_mode != "zeros" and float(pad_value) != 0.0:
            raise ValueError(
                f"{type(self).__name__}: pad_value={pad_value} applies to padding_mode='zeros' only, "
                f"got padding_mode={self.padding_mode!r}"
            )
        self.pad_value = float(pad_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self._ndim
        spatial = ", ".join("DHW"[3 - n :])
        self._check_input(
            x,
            n + 1,
            self.in_channels,
            (n + 1, n + 2),
            f"[N, {self.in_channels}, {spatial}] or [{self.in_channels}, {spatial}]",
        )
        return QF.qconv(
            x,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            input_quantizer=self.input_quantizer,
            weight_quantizer=self.weight_quantizer,
            pad_value=self.pad_value,
            padding_mode=self.padding_mode,
            kernel_size=self.kernel_size,
        )

    def _torch_extra_repr(self) -> str:
        return super().extra_repr()

    def extra_repr(self) -> str:
        base = super().extra_repr()
        extra = self._quant_repr()
        if self.pad_value != 0.0:
            extra = f"{extra}, pad_value={self.pad_value}" if extra else f"pad_value={self.pad_value}"
        return f"{base}, {extra}" if extra else base


def _make_conv(torch_cls: type[nn.Module], ndim: int) -> type[nn.Module]:
    letters = "DHW"[3 - ndim :]

    class QConv(_QConvNd, torch_cls):
        _ndim = ndim

        def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size,
            stride=1,
            padding=0,
            dilation=1,
            groups: int = 1,
            bias: bool = True,
            padding_mode: str = "zeros",
            device=None,
            dtype=None,
            *,
            input_quantizer: quant.QuantizerLike = None,
            weight_quantizer: quant.QuantizerLike = None,
            pad_value: float = 0.0,
        ):
            torch_cls.__init__(
                self,
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                groups,
                bias,
                padding_mode,
                device,
                dtype,
            )
            self._init_q(input_quantizer, weight_quantizer, pad_value)

    QConv.__name__ = QConv.__qualname__ = f"QConv{ndim}d"
    QConv.__doc__ = (
        f"Quantized {ndim}-d convolution, drop-in for ``nn.Conv{ndim}d``.\n\n"
        f"    y = conv{ndim}d(pad(q_in(x), value=pad_value), q_w(W)) + bias\n\n"
        f"Input ``[N, C_in, {', '.join(letters)}]`` (or unbatched); ``pad_value`` in {{0, +1, -1}} is the value of "
        "padded positions after input quantization (``padding_mode='zeros'``).\n"
        "Backward: the straight-through estimators of ``input_quantizer`` and ``weight_quantizer``."
    )
    QConv.__module__ = __name__
    return QConv


QConv1d = _make_conv(nn.Conv1d, 1)
QConv2d = _make_conv(nn.Conv2d, 2)
QConv3d = _make_conv(nn.Conv3d, 3)
