"""The layers a binary network keeps out of its binary blocks (the stem conv, the downsampling
shortcut convs, the classifier), built float or int8: the ``float_layers`` option of
:func:`onebit.binarize` and of the zoo's constructors.

- ``"float"``: ``nn.Conv2d`` / ``nn.Linear``, as the binary-network papers keep them;
- ``"int8"``: ``QConv2d`` / ``QLinear`` with ``int8`` inputs (per tensor, a learned step) and
  ``int8_weight`` weights (per output channel): ``conv(x_int, levels) / s * scale + bias``, an exact
  integer sum while ``taps * 127^2 < 2^24`` (a layer past it is refused when built).
"""

from __future__ import annotations

from torch import nn

from onebit.nn.layers import QConv2d, QLinear

__all__ = ["FLOAT_LAYERS", "check_float_layers", "quantizers", "conv2d", "linear"]

#: what ``float_layers`` may be
FLOAT_LAYERS = ("float", "int8")


def check_float_layers(value: object, option: str = "float_layers") -> str:
    """``value`` when it is one of :data:`FLOAT_LAYERS`, else a ``ValueError`` naming ``option``."""
    if not isinstance(value, str) or value not in FLOAT_LAYERS:
        allowed = ", ".join(repr(v) for v in FLOAT_LAYERS)
        raise ValueError(f"{option} must be one of {allowed}, got {value!r}")
    return value


def quantizers(float_layers: str) -> dict[str, str | None]:
    """The ``input_quantizer`` / ``weight_quantizer`` of a kept layer (None, None for ``"float"``)."""
    if check_float_layers(float_layers) == "int8":
        return {"input_quantizer": "int8", "weight_quantizer": "int8_weight"}
    return {"input_quantizer": None, "weight_quantizer": None}


def conv2d(float_layers: str, *args, **kwargs) -> nn.Module:
    """``nn.Conv2d(*args, **kwargs)``, or its int8 ``QConv2d`` for ``float_layers="int8"``."""
    if check_float_layers(float_layers) == "float":
        return nn.Conv2d(*args, **kwargs)
    return QConv2d(*args, **kwargs, **quantizers(float_layers))


def linear(float_layers: str, *args, **kwargs) -> nn.Module:
    """``nn.Linear(*args, **kwargs)``, or its int8 ``QLinear`` for ``float_layers="int8"``."""
    if check_float_layers(float_layers) == "float":
        return nn.Linear(*args, **kwargs)
    return QLinear(*args, **kwargs, **quantizers(float_layers))
