"""Training tools for binary networks: the Bop optimizer, latent-weight clipping, flip counting.

A *binary weight* is a parameter that a 1-bit weight quantizer binarizes in the
forward pass: the ``weight`` of every onebit layer whose ``weight_quantizer``
has precision 1 (and the twist coefficients of a binary ``TwistConv2d``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from onebit import quant
from onebit.math import sign

__all__ = ["Bop", "binary_parameters", "clip_weights", "FlipCounter"]


def binary_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that a 1-bit weight quantizer binarizes (each once, in module order)."""
    found: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        q = getattr(module, "weight_quantizer", None)
        if not quant.is_binary(q):
            continue
        for name, p in module.named_parameters(recurse=False):
            if name != "bias" and id(p) not in seen:
                seen.add(id(p))
                found.append(p)
    return found


@torch.no_grad()
def clip_weights(params: Iterable[torch.Tensor], clip: float = 1.0) -> None:
    """Clip latent weights to ``[-clip, clip]`` in place (larq's ``weight_clip`` constraint).

    Apply it after each optimizer step, never inside forward: the latent weights
    then stay where the straight-through estimator passes gradients (|w| <= 1).
    """
    for p in params:
        p.clamp_(-clip, clip)


class FlipCounter:
    """Counts the binary weights whose sign changed since :meth:`snapshot`.

    ``params`` are tensors (latent weights: their sign is what a 1-bit quantizer keeps) or
    functions that return one when called (``layer.quantized_weight``: the weight as used
    in forward). Signs follow onebit's convention, sign(0) = +1.
    """

    def __init__(self, params: Iterable[torch.Tensor | Callable[[], torch.Tensor]]):
        self.params = list(params)
        self.signs: list[torch.Tensor] = []
        self.snapshot()

    @torch.no_grad()
    def _current(self) -> list[torch.Tensor]:
        return [sign((p() if callable(p) else p).detach()) > 0 for p in self.params]

    @torch.no_grad()
    def snapshot(self) -> None:
        self.signs = self._current()

    @torch.no_grad()
    def flipped(self, snapshot: bool = False) -> list[torch.Tensor]:
        """Per tensor, where its sign differs from the snapshot (boolean, of its shape);
        ``snapshot=True`` then takes the current signs as the new snapshot."""
        now = self._current()
        changed = [a != b for a, b in zip(now, self.signs)]
        if snapshot:
            self.signs = now
        return changed

    @torch.no_grad()
    def ratio(self) -> float:
        """Fraction of binary weights that flipped since the snapshot (0.0 when there are none)."""
        total = sum(s.numel() for s in self.signs)
        if total == 0:
            return 0.0
        flipped = sum(int(changed.sum()) for changed in self.flipped())
        return flipped / total


class Bop(torch.optim.Optimizer):
    """Bop, the latent-free binary optimizer of Helwegen et al. (2019), "Latent Weights Do Not Exist".

    Per binary weight ``w`` with gradient ``g``, an exponential moving average of the gradient::

        m <- (1 - gamma) * m + gamma * g
        w <- -w   where |m| > threshold and sign(m) == sign(w)     (otherwise w is kept)

    A weight flips when the gradient has consistently pushed against its sign
    strongly enough; ``threshold`` sets how strongly, ``gamma`` how long the
    memory is (about ``1 / gamma`` steps). Only signs change, so use Bop for the
    binary weights (:func:`binary_parameters`) and a float optimizer (Adam) for
    the rest; ``onebit train --optimizer bop`` wires this up. ``sign`` follows
    onebit's convention, sign(0) = +1.

    Args:
        params: the binary weights (or parameter groups with their own ``threshold``/``gamma``).
        threshold: flip threshold tau (larq's default 1e-8).
        gamma: adaptivity rate of the moving average (larq's default 1e-4).
    """

    def __init__(self, params, threshold: float = 1e-8, gamma: float = 1e-4):
        if not threshold >= 0:
            raise ValueError(f"Bop: threshold must be non-negative, got {threshold}")
        if not 0 < gamma <= 1:
            raise ValueError(f"Bop: gamma must be in (0, 1], got {gamma}")
        super().__init__(params, {"threshold": threshold, "gamma": gamma})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            gamma, threshold = group["gamma"], group["threshold"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                m.mul_(1 - gamma).add_(p.grad, alpha=gamma)
                flip = (m.abs() > threshold) & (sign(m) == sign(p))
                p.copy_(torch.where(flip, -p, p))
        return loss
