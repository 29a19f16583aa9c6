"""``TwistConv2d``: the "convolution with a twist" (ConvTwist), drop-in for a 3x3, padding-1 conv.

From Liu Yao's ConvTwist (fast.ai Imagenette/Imagewoof experiments), computed as the
post defines it and made binary-ready. With ``W`` the ``[out, in / g, 3, 3]`` weight and
``a``, ``b`` the ``[out, in / g]`` twist coefficients:

(a) **Permuted groups.** A grouped 3x3 convolution with ``g`` groups whose output group
    ``i`` reads input group ``i - 1 (mod g)``: the full kernel is cyclic
    block-off-diagonal, so information crosses groups at the cost of a grouped conv.
    Implemented as a cyclic roll ``P`` of the input channels by one group before the
    grouped conv (``permute=False``: group ``i`` reads group ``i``). All three convs below
    are permuted the same way.

(b) **The twist.** One derivative kernel per (output, input) pair and its 90-degree
    rotation, both from the same coefficients::

        D_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]     D_y = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
        K_x = a * D_x + b * D_y                        K_y = rot90(K_x) = K_x.transpose(2, 3).flip(3)
                                                           = b * D_x - a * D_y
        f(x) = conv(P x, W) + X * conv(P x, K_x) + Y * conv(P x, K_y)

    where ``X[h, w] = 2 w / W_out - 1`` and ``Y[h, w] = 2 h / H_out - 1`` are the
    coordinate maps of the output grid (in [-1, 1)).

(c) **Iterations.** With the twist on, ``iters = n > 1`` and equal shapes
    (``in_channels == out_channels``, stride 1), ``f`` is integrated in ``n`` Euler steps
    and the input subtracted::

        z = x + f(x) / n;   n - 1 times: z = z + f(z) / n;   return z - x

    Otherwise (``iters == 1``, no twist, or different shapes) the layer is one pass ``f(x)``.

Binary use: ``input_quantizer`` quantizes the input of every pass (padding stays 0
after quantization); ``weight_quantizer`` quantizes ``W`` (computed as
``conv(P q_in(x), levels(W)) * scale``, as every onebit layer) and the coefficients
``a`` and ``b`` (the derivative kernels ``D_x``, ``D_y`` stay fixed). With sign weights
``K_x`` and ``K_y`` hold small integers, so the twist terms of a +-1 input are exact.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from onebit import quant
from onebit.nn import functional as QF
from onebit.nn.layers import QuantizedLayer

__all__ = ["TwistConv2d", "auto_groups", "coordinate_maps", "derivative_kernels"]


def derivative_kernels(dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed 3x3 Sobel derivative kernels ``(D_x, D_y)`` (unscaled)."""
    dx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=dtype, device=device)
    dy = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]], dtype=dtype, device=device)
    return dx, dy


def coordinate_maps(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate maps ``(X, Y)`` of shape ``[1, 1, H, W]`` for a ``[N, C, H, W]`` tensor:
    ``X[h, w] = 2 w / W - 1``, ``Y[h, w] = 2 h / H - 1``, computed in float64 and rounded once
    to ``like``'s dtype; built from tensor ops only (fx-traceable)."""
    ones = torch.ones_like(like[:1, :1], dtype=torch.float64)
    width = ones.sum(dim=3, keepdim=True)
    height = ones.sum(dim=2, keepdim=True)
    xs = (2.0 * (ones.cumsum(dim=3) - 1.0)) / width - 1.0
    ys = (2.0 * (ones.cumsum(dim=2) - 1.0)) / height - 1.0
    return xs.to(like.dtype), ys.to(like.dtype)


def auto_groups(in_channels: int, out_channels: int) -> int:
    """ConvTwist's group rule: ``in_channels // 32`` when ``in_channels`` is a multiple of 64,
    else 1; 1 as well when that count does not divide ``out_channels``."""
    groups = in_channels // 32 if in_channels % 64 == 0 else 1
    return groups if out_channels % groups == 0 else 1


class TwistConv2d(QuantizedLayer, nn.Module):
    """ConvTwist: a permuted grouped 3x3 convolution with a twist; drop-in for
    ``nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)``. See the module docstring for the math.

    Args:
        in_channels, out_channels: channel counts, both divisible by ``groups``.
        kernel_size, padding: must be 3 and 1 (the layer replaces 3x3 "same" convs).
        stride: 1 or 2 (the coordinate maps follow the output size).
        groups: number of channel groups of all three convs, or ``"auto"``
            (:func:`auto_groups`: ``in_channels // 32`` for multiples of 64, else 1).
        iters: Euler steps when the twist is on and the shapes agree (else one pass).
        twist: add the two coordinate-weighted derivative convs.
        permute: output group i reads input group i - 1 (mod groups).
        bias: only ``False`` (follow the layer with BatchNorm); accepted for ``nn.Conv2d``
            compatibility.
        input_quantizer, weight_quantizer: as in :class:`onebit.nn.QConv2d`.

    Parameters: ``weight`` ``[out, in / groups, 3, 3]`` (``nn.Conv2d``'s initialization);
    with ``twist``, ``coeff_x`` and ``coeff_y`` ``[out, in / groups]``, drawn from
    ``N(0, std(weight))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        groups: int | str = 2,
        iters: int = 4,
        twist: bool = True,
        permute: bool = True,
        bias: bool = False,
        *,
        input_quantizer: quant.QuantizerLike = None,
        weight_quantizer: quant.QuantizerLike = None,
    ):
        super().__init__()
        if kernel_size not in (3, (3, 3)) or padding not in (1, (1, 1)):
            raise ValueError(
                f"TwistConv2d replaces 3x3 convs with padding 1, got kernel_size={kernel_size}, padding={padding}"
            )
        if bias:
            raise ValueError("TwistConv2d has no bias (follow it with BatchNorm); pass bias=False")
        if isinstance(stride, tuple):
            if stride[0] != stride[1]:
                raise ValueError(f"TwistConv2d: stride must be the same in both dimensions, got {stride}")
            stride = stride[0]
        if groups == "auto":
            groups = auto_groups(in_channels, out_channels)
        if isinstance(groups, bool) or not isinstance(groups, int):
            raise ValueError(f"TwistConv2d: groups must be a positive integer or 'auto', got {groups!r}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"TwistConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must be divisible by groups ({groups})"
            )
        if not isinstance(iters, int) or iters < 1:
            raise ValueError(f"TwistConv2d: iters must be a positive integer, got {iters!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding, self.stride = (3, 3), (1, 1), (int(stride), int(stride))
        self.groups, self.iters, self.twist, self.permute = groups, iters, bool(twist), bool(permute) and groups > 1
        self.register_parameter("bias", None)
        per_group = in_channels // groups
        self.weight = nn.Parameter(torch.empty(out_channels, per_group, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's initialization
        if self.twist:
            std = float(self.weight.detach().std())
            self.coeff_x = nn.Parameter(torch.empty(out_channels, per_group).normal_(0.0, std))
            self.coeff_y = nn.Parameter(torch.empty(out_channels, per_group).normal_(0.0, std))
        self._init_quantizers(input_quantizer, weight_quantizer)

    @property
    def same_shape(self) -> bool:
        """Input and output shapes agree (``in_channels == out_channels`` and stride 1)."""
        return self.in_channels == self.out_channels and self.stride == (1, 1)

    @property
    def iterates(self) -> bool:
        """The forward runs ``iters`` Euler steps (twist on, ``iters > 1``, equal shapes)."""
        return self.twist and self.iters > 1 and self.same_shape

    # -- the parts -----------------------------------------------------------------------------
    def _q_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def twist_kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K_x, K_y)``, each ``[out, in / groups, 3, 3]``: ``K_x = q_w(a) D_x + q_w(b) D_y`` and its
        90-degree rotation ``K_y = K_x.transpose(2, 3).flip(3)``."""
        a, b = self._q_weight(self.coeff_x), self._q_weight(self.coeff_y)
        dx, dy = derivative_kernels(a.dtype, a.device)
        kx = a[:, :, None, None] * dx + b[:, :, None, None] * dy
        return kx, kx.transpose(2, 3).flip(3)

    def step(self, x: torch.Tensor, kernels: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One pass ``f(x)`` (parts (a) and (b)); ``kernels`` are :meth:`twist_kernels` when given."""
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.permute:
            # output group i reads input group i - 1: roll the channels forward by one group
            x = torch.roll(x, shifts=self.in_channels // self.groups, dims=1)
        y = QF.qconv(
            x,
            self.weight,
            None,
            stride=self.stride,
            padding=1,
            groups=self.groups,
            weight_quantizer=self.weight_quantizer,
            kernel_size=(3, 3),
        )
        if self.twist:
            kx, ky = self.twist_kernels() if kernels is None else kernels
            gx = F.conv2d(x, kx, None, self.stride, 1, 1, self.groups)
            gy = F.conv2d(x, ky, None, self.stride, 1, 1, self.groups)
            xs, ys = coordinate_maps(y)
            y = y + xs * gx + ys * gy
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):
            self._check_input(x, 3, self.in_channels, (4,), f"[N, {self.in_channels}, H, W]")
        kernels = self.twist_kernels() if self.twist else None
        y = self.step(x, kernels)
        if not self.iterates:
            return y
        z = x + y / self.iters
        for _ in range(self.iters - 1):
            z = z + self.step(z, kernels) / self.iters
        return z - x

    def _torch_extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), stride={self.stride}, padding=(1, 1)"

    def extra_repr(self) -> str:
        parts = [self._torch_extra_repr(), f"groups={self.groups}", f"iters={self.iters}"]
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
