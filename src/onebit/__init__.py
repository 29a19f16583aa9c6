"""onebit: binary (1-bit) and low-bit neural networks for PyTorch.

Layers, from the bottom up:

- ``onebit.math``: the one sign convention (sign(0) = +1);
- ``onebit.quant``: quantizers with straight-through gradients, by alias;
- ``onebit.nn``: quantized layers, drop-in for torch.nn (``onebit.nn.functional`` holds the arithmetic);
- ``onebit.binarize``: float -> binary model conversion;
- ``onebit.models``, ``onebit.data``, ``onebit.train``: the zoo, datasets and trainer;
- ``onebit.engine``: the bit-packed CPU inference engine.
"""

from onebit import math, nn, quant
from onebit.convert import binarize

__version__ = "0.1.0"

__all__ = ["binarize", "math", "nn", "quant", "__version__"]
