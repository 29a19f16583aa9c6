"""onebit: binary (1-bit) and low-bit neural networks for PyTorch."""
