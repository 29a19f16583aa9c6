"""onebit.nn: quantized layers, drop-in for torch.nn (arithmetic in onebit.nn.functional)."""

from onebit.nn import functional
from onebit.nn.bitlinear import BitLinear
from onebit.nn.layers import QActivation, QConv1d, QConv2d, QConv3d, QLinear, QuantizedLayer
from onebit.nn.twist import TwistConv2d

__all__ = [
    "functional",
    "BitLinear",
    "QActivation",
    "QLinear",
    "QConv1d",
    "QConv2d",
    "QConv3d",
    "QuantizedLayer",
    "TwistConv2d",
]
