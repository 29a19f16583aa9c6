"""The teacher of a distilled run: the model of a finished run, frozen, checked to share this run's data."""

from __future__ import annotations

import torch
from torch import nn

from onebit.data import DataBundle
from onebit.train.checkpoint import load_run

__all__ = ["load_teacher"]


def load_teacher(
    directory: str, data: DataBundle, device: torch.device, memory_format: torch.memory_format
) -> nn.Module:
    """The model of the run in ``directory``: eval mode, no gradients, on ``device`` in ``memory_format``;
    ``ValueError`` when it was trained on data of another shape or normalization than ``data``."""
    teacher, meta = load_run(directory)
    mine = {"num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": list(data.image_size)}
    if meta.get("std") is not None:  # runs written before the statistics were saved have none
        mine.update(mean=data.mean, std=data.std)
    theirs = {k: meta.get(k) for k in mine}
    if theirs != mine:
        raise ValueError(f"teacher {directory!r} was trained on data of another shape: {theirs}, this run {mine}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device, memory_format=memory_format)
