"""Float32 convolutions summed as torch's conv kernels sum them: a 1x1 conv in input-channel order and a
stem's fused multiply-add chains (``csrc/kernels/ordered_conv.h``), a depthwise 1x1 conv as one product and
its bias.

torch's NCHW conv runs some small maps (a 2x2 map with hundreds of channels, as in a BinaryDenseNet's
last transitions) through its reference GEMM, which sums each output in channel order: one rounding per
product, one per sum, from the bias (or +0.0). :class:`OrderedConv1x1` makes the same sums, vectorized
across output channels, so it gives torch's bits wherever torch sums so; whether it does for a shape is
asked of torch (:mod:`onebit.engine.sum_order`).
"""

from __future__ import annotations

import torch

from onebit import _C
from onebit.engine.kernels.operands import empty_nchw_channels_last
from onebit.engine.kernels.registry import direct

__all__ = ["ChannelwiseConv1x1", "OrderedConv1x1", "ORDERED_CONV_BLOCK", "TapOrderedConv", "TAP_CONV_BLOCK"]

_F32 = torch.float32
_Tensor = torch.Tensor
#: the transposed weight's rows are padded to a multiple of this many output channels (the kernels' block)
ORDERED_CONV_BLOCK = 32


class OrderedConv1x1:
    """``conv(x)``: ``F.conv2d(x, weight, bias)`` of a 1x1 float32 ``weight [Co, C, 1, 1]`` (stride 1, no
    padding, one group) with each output summed as ``((b + x[0] w[0]) + x[1] w[1]) + ...`` in channel order,
    every product and sum rounded to float32 (``b`` the bias, or +0.0). ``x``: float32 ``[N, C, H, W]`` in
    NCHW memory (:meth:`takes`); the output is NCHW.

    The weight is kept transposed, prepared at the first call and again when the weight or bias is written
    (their ``_version``).
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
        self._wt = self._bias = self._versions = None  # prepared at the first call (most convs never make one)

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
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The call for an ``x`` that :meth:`takes` (a caller that asked first: not asked again)."""
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


#: the tap-ordered conv's weight rows are padded to a multiple of this many output channels
TAP_CONV_BLOCK = 64


class TapOrderedConv:
    """``conv(x)``: ``F.conv2d(x, weight, None, stride, padding)`` of a float32 ``weight [Co, C, KH, KW]`` (one
    group, no dilation, no bias) with each output one chain of fused multiply-adds over the taps in
    ``(kh, kw, c)`` order, from +0.0, the taps in the padding skipped: the sums torch's direct conv makes for a
    network's stem (asked of torch: :mod:`onebit.engine.sum_order`). ``x``: float32 ``[N, C, H, W]``, NCHW or
    channels_last; the output is in channels_last memory.

    The weight is kept with its output channels last, prepared at the first call and again when it is written
    (its ``_version``).
    """

    __slots__ = ("weight", "stride", "padding", "_wt", "_version")

    def __init__(self, weight: torch.Tensor, stride, padding):
        if not (isinstance(weight, torch.Tensor) and weight.dtype == _F32 and weight.dim() == 4 and weight.numel()):
            got = f"{weight.dtype} of shape {list(weight.shape)}" if isinstance(weight, torch.Tensor) else weight
            raise ValueError(f"tap_ordered_conv: weight must be float32 [Co, C, KH, KW], got {got}")
        self.weight = weight
        self.stride, self.padding = tuple(stride), tuple(padding)
        self._wt = self._version = None  # prepared at the first call

    def _prepare(self) -> None:
        """The weight with its output channels last."""
        co, c, kh, kw = self.weight.shape
        ld = -(-co // TAP_CONV_BLOCK) * TAP_CONV_BLOCK
        wt = torch.zeros(kh, kw, c, ld, dtype=_F32)
        wt[..., :co] = self.weight.detach().permute(2, 3, 1, 0)
        self._wt = wt
        self._version = self.weight._version

    def takes(self, x) -> bool:
        """Whether ``x`` is what the kernel reads: a plain float32 CPU ``[N, C, H, W]`` the kernel fits, in NCHW
        or channels_last memory (the layouts the probe compares torch's conv in), outside any tracing."""
        if not (type(x) is _Tensor and x.dtype is _F32 and x.is_cpu and x.dim() == 4):
            return False
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            return False
        _, c, h, w = x.shape
        _, _, kh, kw = self.weight.shape
        ph, pw = self.padding
        return c == self.weight.shape[1] and h + 2 * ph >= kh and w + 2 * pw >= kw and direct()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes(x):
            raise ValueError(
                f"tap_ordered_conv: expected a float32 CPU tensor [N, {self.weight.shape[1]}, H, W] in NCHW or "
                f"channels_last memory at least as large as the kernel, got {x.dtype} of shape {list(x.shape)}"
            )
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The call for an ``x`` that :meth:`takes` (a caller that asked first: not asked again)."""
        if self.weight._version != self._version:
            self._prepare()
        n, c, h, w = x.shape
        co, _, kh, kw = self.weight.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        out = empty_nchw_channels_last(n, co, oh, ow, _F32)
        if out.numel():
            _C.tap_ordered_conv_raw(
                x.data_ptr(),
                n,
                c,
                h,
                w,
                *x.stride(),
                self._wt.data_ptr(),
                self._wt.shape[3],
                co,
                kh,
                kw,
                sh,
                sw,
                ph,
                pw,
                out.data_ptr(),
                torch.get_num_threads(),
            )
        return out


class ChannelwiseConv1x1:
    """``conv(x)``: ``F.conv2d(x, weight, bias, groups=C)`` of a depthwise 1x1 float32 ``weight [C, 1, 1, 1]``
    (stride 1, no padding), each output one product and then its channel's bias (``+0.0`` without one):
    ``x[c] * w[c] + b[c]`` rounded twice (a multiply, then an add), or with ``fma`` rounded once, as torch's
    kernels round it (``csrc/kernels/channel_affine.h``). ``x``: float32 ``[N, C, H, W]`` in NCHW or
    channels_last memory; the output is in the same layout, as torch's conv returns it.

    A ReActNet-style block's learnable shift before its sign is such a conv; torch runs it as a grouped
    convolution, 20-100x slower than this one pass. Which rounding torch makes for a shape (if either) is asked
    of torch (:class:`~onebit.engine.sum_order.RoundingProbe`). The weight and bias are read on every call.
    """

    __slots__ = ("weight", "bias", "channels", "fma")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fma: bool = False):
        if not (
            isinstance(weight, torch.Tensor)
            and weight.dtype == _F32
            and weight.dim() == 4
            and weight.shape[1:] == (1, 1, 1)
            and weight.numel() > 0
            and weight.is_contiguous()
        ):
            got = f"{weight.dtype} of shape {list(weight.shape)}" if isinstance(weight, torch.Tensor) else weight
            raise ValueError(f"channelwise_conv1x1: weight must be contiguous float32 [C, 1, 1, 1], got {got}")
        self.weight, self.bias, self.channels, self.fma = weight, bias, weight.shape[0], bool(fma)
        if bias is not None and not (
            isinstance(bias, torch.Tensor)
            and bias.dtype == _F32
            and tuple(bias.shape) == (self.channels,)
            and bias.is_contiguous()
        ):
            got = f"{bias.dtype} of shape {list(bias.shape)}" if isinstance(bias, torch.Tensor) else bias
            raise ValueError(f"channelwise_conv1x1: bias must be contiguous float32 [{self.channels}], got {got}")

    def takes(self, x) -> bool:
        """Whether ``x`` is what the kernel reads: a plain float32 CPU ``[N, C, H, W]`` in NCHW or channels_last
        memory, outside any tracing."""
        if not (type(x) is _Tensor and x.dtype is _F32 and x.is_cpu and x.dim() == 4 and x.shape[1] == self.channels):
            return False
        return (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) and direct()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes(x):
            raise ValueError(
                f"channelwise_conv1x1: expected a float32 CPU tensor [N, {self.channels}, H, W] in NCHW or "
                f"channels_last memory, got {x.dtype} of shape {list(x.shape)} and strides {list(x.stride())}"
            )
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The call for an ``x`` that :meth:`takes` (a caller that asked first: not asked again)."""
        n, c, h, w = x.shape
        out = torch.empty_like(x)  # x's layout
        if out.numel():
            bias = self.bias.data_ptr() if self.bias is not None else 0
            channels_last = not x.is_contiguous()
            _C.channel_affine_raw(
                x.data_ptr(),
                n,
                c,
                h * w,
                channels_last,
                self.weight.data_ptr(),
                bias,
                self.fma,
                out.data_ptr(),
                torch.get_num_threads(),
            )
        return out
