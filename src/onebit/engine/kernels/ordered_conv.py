"""A float32 1x1 convolution summed in input-channel order (``csrc/kernels/ordered_conv.h``).

torch's NCHW conv runs some small maps (a 2x2 map with hundreds of channels, as in a BinaryDenseNet's
last transitions) through its reference GEMM, which sums each output in channel order: one rounding per
product, one per sum, from the bias (or +0.0). :class:`OrderedConv1x1` makes the same sums, vectorized
across output channels, so it gives torch's bits wherever torch sums so; whether it does for a shape is
asked of torch (:mod:`onebit.engine.sum_order`).
"""

from __future__ import annotations

import torch

from onebit import _C
from onebit.engine.kernels.registry import direct

__all__ = ["OrderedConv1x1", "ORDERED_CONV_BLOCK"]

_F32 = torch.float32
_Tensor = torch.Tensor
#: the transposed weight's rows are padded to a multiple of this many output channels (the kernels' block)
ORDERED_CONV_BLOCK = 32


class OrderedConv1x1:
    """``conv(x)``: ``F.conv2d(x, weight, bias)`` of a 1x1 float32 ``weight [Co, C, 1, 1]`` (stride 1, no
    padding, one group) with each output summed as ``((b + x[0] w[0]) + x[1] w[1]) + ...`` in channel order,
    every product and sum rounded to float32 (``b`` the bias, or +0.0). ``x``: float32 ``[N, C, H, W]`` in
    NCHW memory (:meth:`takes`); the output is NCHW.

    The weight is kept transposed, prepared again when the weight or bias is written (their ``_version``).
    """

    __slots__ = ("weight", "bias", "in_channels", "out_channels", "_wt", "_bias", "_versions")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if not (
            isinstance(weight, torch.Tensor)
            and weight.dtype == _F32
            and weight.dim() == 4
            and weight.shape[2:] == (1, 1)
            and weight.numel() > 0
        ):
            got = f"{weight.dtype} of shape {list(weight.shape)}" if isinstance(weight, torch.Tensor) else weight
            raise ValueError(f"ordered_conv1x1: weight must be float32 [Co, C, 1, 1], got {got}")
        self.weight, self.bias = weight, bias
        self.out_channels, self.in_channels = weight.shape[0], weight.shape[1]
        if bias is not None and not (
            isinstance(bias, torch.Tensor) and bias.dtype == _F32 and tuple(bias.shape) == (self.out_channels,)
        ):
            got = f"{bias.dtype} of shape {list(bias.shape)}" if isinstance(bias, torch.Tensor) else bias
            raise ValueError(f"ordered_conv1x1: bias must be float32 [{self.out_channels}], got {got}")
        self._versions = None
        self._prepare()

    def _prepare(self) -> None:
        co, c = self.out_channels, self.in_channels
        ld = -(-co // ORDERED_CONV_BLOCK) * ORDERED_CONV_BLOCK
        wt = torch.zeros(c, ld, dtype=_F32)
        wt[:, :co] = self.weight.detach().reshape(co, c).t()
        self._wt = wt
        self._bias = None
        if self.bias is not None:  # padded as the weight's rows (the kernels load whole blocks)
            self._bias = torch.zeros(ld, dtype=_F32)
            self._bias[:co] = self.bias.detach()
        self._versions = self._state()

    def _state(self) -> tuple[int, int]:
        return (self.weight._version, self.bias._version if self.bias is not None else 0)

    def takes(self, x) -> bool:
        """Whether ``x`` is what the kernel reads: a plain float32 CPU ``[N, C, H, W]`` with the strides of a
        new NCHW tensor (torch chooses its conv's path by the strides too), outside any tracing."""
        if not (type(x) is _Tensor and x.dtype is _F32 and x.is_cpu and x.dim() == 4):
            return False
        n, c, h, w = x.shape
        return c == self.in_channels and x.stride() == (c * h * w, h * w, w, 1) and direct()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes(x):
            raise ValueError(
                f"ordered_conv1x1: expected a float32 CPU tensor [N, {self.in_channels}, H, W] in NCHW memory, "
                f"got {x.dtype} of shape {list(x.shape)} and strides {list(x.stride())}"
            )
        if self._state() != self._versions:
            self._prepare()
        n, c, h, w = x.shape
        out = torch.empty((n, self.out_channels, h, w), dtype=_F32)
        if out.numel():
            bias = self._bias.data_ptr() if self._bias is not None else 0
            _C.ordered_conv1x1_raw(
                x.data_ptr(),
                n,
                c,
                h * w,
                self._wt.data_ptr(),
                self._wt.shape[1],
                self.out_channels,
                bias,
                out.data_ptr(),
                torch.get_num_threads(),
            )
        return out
