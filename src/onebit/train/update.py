"""A training step's update after its loss: backward (through the fp16 loss scaler when there is one),
every optimizer's step, the learning-rate schedule's, then the binary latent weights clipped to ``[-c, c]``."""

from __future__ import annotations

import torch
from torch import nn

from onebit.optim import clip_weights

__all__ = ["apply_update"]


def apply_update(
    loss: torch.Tensor,
    optimizers: list[torch.optim.Optimizer],
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    binary_params: list[nn.Parameter],
    weight_clip: float | None,
) -> None:
    """Gradients of ``loss`` (scaled by ``scaler``, which then skips the steps of an overflow), one step
    of each optimizer and of ``scheduler``, and ``w <- clamp(w, -weight_clip, weight_clip)`` for every
    binary latent weight ``w`` when ``weight_clip`` is set."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        for opt in optimizers:
            opt.step()
    if scheduler is not None:
        scheduler.step()
    if weight_clip is not None:
        clip_weights(binary_params, weight_clip)
