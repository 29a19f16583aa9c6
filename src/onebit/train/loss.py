"""A training step's loss: cross-entropy, with mixup and distillation from a teacher when a run uses them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onebit.train.config import TrainConfig

__all__ = ["distillation_loss", "training_loss"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    the mean over the batch of ``T^2 * sum_k p_k (log p_k - log q_k)`` with ``p`` the teacher's and
    ``q`` the student's softmax at temperature ``T``; no gradient reaches ``teacher``.
    ReActNet (Liu et al. 2020) trains binary networks with it (T = 1) from a float network."""
    t = temperature
    log_q = F.log_softmax(student / t, dim=1)
    log_p = F.log_softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


def training_loss(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    mixup_rng: np.random.Generator,
    generator: torch.Generator,
    teacher: nn.Module | None = None,
) -> torch.Tensor:
    """``CE(net(x), y)``; with ``config.mixup = a > 0``, ``x' = lam x + (1 - lam) x[p]`` and
    ``lam CE(net(x'), y) + (1 - lam) CE(net(x'), y[p])``, ``lam ~ Beta(a, a)`` from ``mixup_rng`` and the
    permutation ``p`` from ``generator``; with a ``teacher`` (seeing the same ``x'``, no gradient),
    ``(1 - w) * that + w * distillation_loss(net(x'), teacher(x'), T)``, ``w = config.distill_weight``
    and ``T = config.distill_temperature``."""
    alpha = config.mixup
    if alpha > 0:
        lam = float(mixup_rng.beta(alpha, alpha))
        perm = torch.randperm(len(y), generator=generator).to(y.device)
        x = lam * x + (1 - lam) * x[perm]
        logits = net(x)
        loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    else:
        logits = net(x)
        loss = F.cross_entropy(logits, y)
    if teacher is None:
        return loss
    with torch.no_grad():
        target = teacher(x)  # sees the same (augmented, mixed) images as the student
    w = config.distill_weight
    return (1 - w) * loss + w * distillation_loss(logits, target, config.distill_temperature)
