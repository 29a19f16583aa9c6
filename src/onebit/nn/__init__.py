"""onebit.nn: quantized layers, drop-in for torch.nn (arithmetic in onebit.nn.functional)."""

from onebit.nn import functional
from onebit.nn.layers import QActivation, QConv1d, QConv2d, QConv3d, QLinear, QuantizedLayer

__all__ = ["functional", "QActivation", "QLinear", "QConv1d", "QConv2d", "QConv3d", "QuantizedLayer"]
