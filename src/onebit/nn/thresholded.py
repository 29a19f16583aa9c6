r"""The modules a canonized model contains in place of a ReLU or a BatchNorm + sign.

* :class:`ThresholdedReLU`, ``y_c = relu(d_c (x_c - theta_c))``: a ReLU after a BatchNorm
  ``s x + t`` once ``|s|`` has moved into the next layer (``theta = -t / s``, ``d = sign(s)``),
  put there by :func:`onebit.canonize.merge_batchnorm`.
* :class:`SignThreshold`, ``sign(bn(acc))`` from one integer comparison per channel on a binary
  layer's accumulator, put there by :func:`onebit.canonize.fold_thresholds`.

They are layers like the others in :mod:`onebit.nn`, below the tools that put them in a model
(the canonizers) and read them back (the packed engine); :mod:`onebit.canonize` re-exports both.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ThresholdedReLU", "SignThreshold"]


class ThresholdedReLU(nn.Module):
    r"""Per-channel thresholded ReLU: ``y_c = max(d_c (x_c - theta_c), 0)``.

    ``theta`` (threshold) and ``d`` (direction, +1 or -1) are float buffers of length C;
    channels are dimension 1 (``[N, C, *]``) or the only dimension of an unbatched
    ``[C]`` input. With ``d = +1`` it passes ``x - theta`` above ``theta``; with ``d = -1``
    it passes ``theta - x`` below ``theta``. :func:`merge_batchnorm` puts it in place of a
    ReLU that follows a BatchNorm ``s x + t``, with ``theta = -t / s`` and ``d = sign(s)``.
    """

    def __init__(self, threshold: torch.Tensor, direction: torch.Tensor) -> None:
        super().__init__()
        if threshold.shape != direction.shape or threshold.dim() != 1:
            raise ValueError("ThresholdedReLU: threshold and direction must be 1-D tensors of one length")
        self.register_buffer("threshold", threshold.detach().clone())
        self.register_buffer("direction", direction.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.threshold.numel()
        shape = [c] if x.dim() == 1 else [1, c] + [1] * (x.dim() - 2)
        theta = self.threshold.to(x.dtype).view(shape)
        d = self.direction.to(x.dtype).view(shape)
        return torch.relu(d * (x - theta))

    def extra_repr(self) -> str:
        return f"channels={self.threshold.numel()}"


class SignThreshold(nn.Module):
    r"""``sign(bn(acc))`` as integer comparisons: ``y = -1`` where ``acc`` is past the threshold, else ``+1``.

    ``acc`` is the exact integer accumulator of a binary layer (as float). Per channel
    ``c``: direction +1 gives ``-1`` for ``acc < threshold``; direction -1 gives ``-1`` for
    ``acc > threshold`` (:class:`onebit.thresholds.Thresholds`). Channels are dimension 1.
    """

    def __init__(self, thresholds) -> None:
        super().__init__()
        self.register_buffer("threshold", thresholds.threshold.clone())
        self.register_buffer("direction", thresholds.direction.clone())

    @property
    def thresholds(self):
        from onebit.thresholds import Thresholds

        return Thresholds(self.threshold, self.direction)

    def forward(self, acc: torch.Tensor) -> torch.Tensor:
        negative = self.thresholds.negative(acc, channel_dim=1)
        one = torch.ones((), dtype=acc.dtype, device=acc.device)
        return torch.where(negative, -one, one)

    def extra_repr(self) -> str:
        return f"channels={self.threshold.numel()}"
