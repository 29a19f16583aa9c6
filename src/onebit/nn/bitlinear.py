"""BitNet b1.58's ``BitLinear``: ternary weights, 8-bit per-token activations, RMSNorm in front.

::

    x_n   = x / sqrt(mean(x^2) + eps)                  (over the features; no learnable gain)
    s     = 127 / max(max|x_n|, 1e-5)                  (per token)
    x_int = clamp(round(x_n * s), -128, 127)
    gamma = mean|W|,  levels = clamp(round(W / gamma), -1, 1)    (onebit.quant.Ternary)
    y     = (x_int @ levels.T) / s * gamma + bias

The integer sum is exact (``|x_int| <= 128``, levels in {-1, 0, +1}); the three float32
roundings after it happen in this order in the layer and in the packed engine's kernels
(``ternary_linear``), so a packed ``BitLinear`` is bit-identical to the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onebit.nn import functional as QF
from onebit.nn.layers import QLinear
from onebit.quant import Absmax8, Ternary

__all__ = ["BitLinear"]


class BitLinear(QLinear):
    """A :class:`~onebit.nn.QLinear` with ``ternary`` weights and ``absmax8`` inputs, after an RMSNorm.

    ``norm=True`` normalizes each token with a parameter-free RMSNorm (``F.rms_norm`` without
    weight, ``eps``) before the activation quantizer, as the BitLinear of BitNet b1.58's
    published training code applies ``RMSNorm(x)`` as a function; a learnable gain, where a
    model wants one, belongs to the layer before. ``per_channel=True`` gives one ``gamma`` per
    output feature instead of one per tensor. Parameters and ``state_dict`` keys are those of
    ``nn.Linear`` (``bias=False`` by default, as in BitNet).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        norm: bool = True,
        device=None,
        dtype=None,
        *,
        eps: float = 1e-5,
        per_channel: bool = False,
    ):
        super().__init__(
            in_features,
            out_features,
            bias,
            device,
            dtype,
            input_quantizer=Absmax8(),
            weight_quantizer=Ternary(per_channel=per_channel),
        )
        if not eps > 0:
            raise ValueError(f"BitLinear: eps must be positive, got {eps!r}")
        self.norm = bool(norm)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, 1, self.in_features, tuple(range(1, 9)), f"[*, {self.in_features}]")
        if self.norm:
            x = F.rms_norm(x, (self.in_features,), eps=self.eps)
        return QF.qlinear(
            x, self.weight, self.bias, input_quantizer=self.input_quantizer, weight_quantizer=self.weight_quantizer
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm={self.norm}, eps={self.eps}"
