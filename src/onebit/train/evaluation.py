"""A model's test metrics, summed over the ranks of a run: ``valid_loss`` (mean cross-entropy),
``accuracy`` (top-1) and ``top_k_accuracy`` (the label among the ``k`` largest logits)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from onebit.train.batches import to_device
from onebit.train.collective import all_reduce

__all__ = ["evaluate_model"]


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    device: torch.device,
    memory_format: torch.memory_format,
    world_size: int = 1,
) -> dict[str, float]:
    """``model`` in eval mode (fp32 logits) on ``batches``, this process's share of the test set:
    the sums of loss, top-1 hits, top-``k`` hits and examples, added over the ranks, then divided."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for x, y in batches:
        x, y = to_device(x, device, memory_format), y.to(device)
        logits = model(x).float()
        sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
        sums[1] += (logits.argmax(dim=1) == y).sum().item()
        topk = logits.topk(k, dim=1).indices
        sums[2] += (topk == y[:, None]).any(dim=1).sum().item()
        sums[3] += len(y)
    if world_size > 1:
        sums = all_reduce(sums, device)
    n = float(sums[3])
    return {"valid_loss": float(sums[0]) / n, "accuracy": float(sums[1]) / n, "top_k_accuracy": float(sums[2]) / n}
