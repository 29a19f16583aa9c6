"""``TwistConv2d``: the "convolution with a twist", drop-in for a 3x3, padding-1 conv.

From the fast.ai Imagenette/Imagewoof experiments (ConvTwist), made binary-ready.
Three parts, each of which can be switched off:

(a) **Permuted groups.** A grouped 3x3 convolution with ``groups`` groups whose
    output group ``i`` reads input group ``i - 1 (mod groups)``: the full kernel
    is cyclic block-off-diagonal, so information crosses groups at the cost of a
    grouped conv (a channel shuffle). Implemented as a cyclic roll of the input
    channels by one group before the grouped conv (``permute=False``: group ``i``
    reads group ``i``).

(b) **The twist.** Two extra grouped convs whose 3x3 kernels are a fixed
    derivative (Sobel) kernel ``Kx`` and its 90-degree rotation ``Ky``, scaled by
    learned per-(output, input) coefficients ``a`` and ``b``. Their outputs are
    multiplied by the normalized x and y coordinate maps ``X``, ``Y`` of the
    output (pixel centres in (-1, 1)) and added::

        f(x) = conv(P x, q_w(W)) + X * conv(P x, q_w(a) Kx) + Y * conv(P x, q_w(b) Ky)

    where ``P`` is the group permutation and ``x`` is already ``q_in(x)``.

(c) **Iterations.** When input and output shapes agree (``in_channels ==
    out_channels`` and ``stride == 1``), ``iters = n > 1`` applies ``f`` as ``n``
    small residual steps ``y <- y + f(y) / n`` starting from ``y = x``;
    ``iters = 1`` is one plain application ``y = f(x)``.

Binary use: ``input_quantizer`` quantizes the input of every step (padding stays 0
after quantization), ``weight_quantizer`` quantizes ``W`` and the twist
coefficients ``a`` and ``b`` (the fixed derivative kernels stay as they are).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from onebit import quant
from onebit.nn.layers import QuantizedLayer

__all__ = ["TwistConv2d", "coordinate_maps", "sobel_kernels"]


def sobel_kernels(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed 3x3 derivative kernels ``(Kx, Ky)``: Sobel's x-derivative divided by 8,
    and the same kernel rotated by 90 degrees."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=dtype) / 8.0
    return kx, torch.rot90(kx, 1, dims=(0, 1)).contiguous()


def coordinate_maps(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized coordinate maps ``(X, Y)`` of shape ``[1, 1, H, W]`` for a ``[N, C, H, W]`` tensor:
    pixel centres ``(2 i + 1) / W - 1`` in (-1, 1), built from tensor ops only (fx-traceable)."""
    ones = torch.ones_like(like[:1, :1])
    width = ones.sum(dim=3, keepdim=True)
    height = ones.sum(dim=2, keepdim=True)
    xs = (2.0 * ones.cumsum(dim=3) - 1.0) / width - 1.0
    ys = (2.0 * ones.cumsum(dim=2) - 1.0) / height - 1.0
    return xs, ys


class TwistConv2d(QuantizedLayer, nn.Module):
    """Grouped, permuted 3x3 convolution with a twist; drop-in for ``nn.Conv2d(c_in, c_out, 3, stride, 1)``.

    Args:
        in_channels, out_channels: channel counts, both divisible by ``groups``.
        kernel_size, padding: must be 3 and 1 (the layer replaces 3x3 "same" convs).
        stride: 1 or 2 (the coordinate maps follow the output size).
        groups: number of channel groups of all three convs.
        iters: number of residual steps; more than 1 needs equal input and output shapes.
        twist: add the two coordinate-weighted derivative convs.
        permute: output group i reads input group i - 1 (mod groups).
        input_quantizer, weight_quantizer: as in :class:`onebit.nn.QConv2d`.

    Parameters: ``weight`` ``[out, in / groups, 3, 3]``; with ``twist``, ``twist_x`` and
    ``twist_y`` ``[out, in / groups, 1, 1]``, the per-(output, input) coefficients.
    No bias (follow it with BatchNorm).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        groups: int = 2,
        iters: int = 1,
        twist: bool = True,
        permute: bool = True,
        *,
        input_quantizer: quant.QuantizerLike = None,
        weight_quantizer: quant.QuantizerLike = None,
    ):
        super().__init__()
        if kernel_size not in (3, (3, 3)) or padding not in (1, (1, 1)):
            raise ValueError(f"TwistConv2d replaces 3x3 convs with padding 1, got kernel_size={kernel_size}, padding={padding}")
        if isinstance(stride, tuple):
            if stride[0] != stride[1]:
                raise ValueError(f"TwistConv2d: stride must be the same in both dimensions, got {stride}")
            stride = stride[0]
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"TwistConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if iters < 1:
            raise ValueError(f"TwistConv2d: iters must be at least 1, got {iters}")
        if iters > 1 and (in_channels != out_channels or stride != 1):
            raise ValueError(
                "TwistConv2d: iters > 1 needs equal input and output shapes "
                f"(in_channels == out_channels and stride 1), got {in_channels} -> {out_channels}, stride {stride}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding, self.stride = (3, 3), (1, 1), (int(stride), int(stride))
        self.groups, self.iters, self.twist, self.permute = groups, iters, bool(twist), bool(permute) and groups > 1
        per_group = in_channels // groups
        self.weight = nn.Parameter(torch.empty(out_channels, per_group, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.twist:
            std = float(self.weight.detach().std())
            self.twist_x = nn.Parameter(torch.randn(out_channels, per_group, 1, 1) * std)
            self.twist_y = nn.Parameter(torch.randn(out_channels, per_group, 1, 1) * std)
            kx, ky = sobel_kernels()
            self.register_buffer("kernel_x", kx.view(1, 1, 3, 3), persistent=False)
            self.register_buffer("kernel_y", ky.view(1, 1, 3, 3), persistent=False)
        self._init_quantizers(input_quantizer, weight_quantizer)

    # -- the three parts -------------------------------------------------------------------
    def _q_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def quantized_weight(self) -> torch.Tensor:
        return self._q_weight(self.weight)

    def twist_kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two twist kernels ``q_w(a) * Kx`` and ``q_w(b) * Ky``, each ``[out, in / groups, 3, 3]``."""
        return self._q_weight(self.twist_x) * self.kernel_x, self._q_weight(self.twist_y) * self.kernel_y

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One application ``f(x)`` (parts (a) and (b))."""
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.permute:
            # output group i reads input group i - 1: roll the channels forward by one group
            x = torch.roll(x, shifts=self.in_channels // self.groups, dims=1)
        y = F.conv2d(x, self.quantized_weight(), None, self.stride, 1, 1, self.groups)
        if self.twist:
            kx, ky = self.twist_kernels()
            gx = F.conv2d(x, kx, None, self.stride, 1, 1, self.groups)
            gy = F.conv2d(x, ky, None, self.stride, 1, 1, self.groups)
            xs, ys = coordinate_maps(y)
            y = y + xs * gx + ys * gy
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):
            self._check_input(x, 3, self.in_channels, (4,), f"[N, {self.in_channels}, H, W]")
        if self.iters == 1:
            return self.step(x)
        y = x
        for _ in range(self.iters):
            y = y + self.step(y) / self.iters
        return y

    def _torch_extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), stride={self.stride}, padding=(1, 1)"

    def extra_repr(self) -> str:
        parts = [self._torch_extra_repr(), f"groups={self.groups}"]
        if self.iters != 1:
            parts.append(f"iters={self.iters}")
        parts.append(f"twist={self.twist}, permute={self.permute}")
        q = self._quant_repr()
        return ", ".join(parts + ([q] if q else []))

    def dense_weight(self) -> torch.Tensor:
        """The equivalent full (ungrouped, unpermuted) ``[out, in, 3, 3]`` kernel of part (a):
        the cyclic block-off-diagonal matrix of ``q_w(W)`` (for tests and the engine)."""
        w = self.quantized_weight()
        g, cin, cout = self.groups, self.in_channels // self.groups, self.out_channels // self.groups
        dense = w.new_zeros(self.out_channels, self.in_channels, 3, 3)
        for i in range(g):
            j = (i - 1) % g if self.permute else i
            dense[i * cout : (i + 1) * cout, j * cin : (j + 1) * cin] = w[i * cout : (i + 1) * cout]
        return dense
