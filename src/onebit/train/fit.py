"""``onebit.fit``: onebit's trainer for a user's own model and data.

::

    history = onebit.fit(model, train_set, valid_set, epochs=10, optimizer="bop", out="runs/mine")

``model`` is any ``nn.Module`` mapping a batch ``[N, ...]`` to class logits ``[N, classes]``;
``train_data`` / ``valid_data`` are map-style datasets of ``(x, y)`` pairs (``y`` an integer
class), ``TensorDataset`` s or ``DataLoader`` s. They are gathered once into tensors, as
``onebit train`` holds its data, so that the epoch order is a permutation drawn from the
seed and the epoch alone (exact resume). The run is the same as ``onebit train``'s: progress
bar, epoch table, Bop and Adam, weight clipping, flip ratio, atomic checkpoints under
``out``, SIGINT/SIGTERM finishing the step and saving, ``resume=True`` continuing a run
stopped in ``out``, and ``tensorboard=True``. Returns one dict per epoch (``epoch``,
``train_loss``, ``valid_loss``, ``accuracy``, ``top_k_accuracy``, ``flip_ratio``, ``time``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from onebit.data import DataBundle
from onebit.train.config import TrainConfig
from onebit.train.trainer import Trainer

__all__ = ["fit"]


def _tensors(data: Any, what: str) -> TensorDataset:
    """A ``TensorDataset`` (float inputs, int64 labels) of every ``(x, y)`` pair in ``data``."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    elif isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(f"fit: {what} must yield (x, y) batches")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError(f"fit: {what} is empty")
        x, y = torch.cat(xs), torch.cat(ys)
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError(f"fit: {what} is empty")
        pairs = [data[i] for i in range(len(data))]
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise ValueError(f"fit: {what} must hold (x, y) pairs")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.as_tensor([int(p[1]) for p in pairs])
    else:
        raise TypeError(f"fit: {what} must be a dataset of (x, y) pairs or a DataLoader, got {type(data).__name__}")
    if len(x) == 0:
        raise ValueError(f"fit: {what} is empty")
    if len(x) != len(y):
        raise ValueError(f"fit: {what} has {len(x)} inputs and {len(y)} labels")
    if not x.is_floating_point():
        x = x.float()
    if y.dim() != 1 or y.is_floating_point() or bool((y < 0).any()):
        raise ValueError(f"fit: {what}'s labels must be non-negative integer classes, one per example")
    return TensorDataset(x.float(), y.long())


def fit(
    model: nn.Module,
    train_data: Any,
    valid_data: Any,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-2,
    optimizer: str = "adam",
    out: str | os.PathLike | None = None,
    tensorboard: bool = False,
    resume: bool = False,
    num_classes: int | None = None,
    console=None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``train_data``, evaluating on ``valid_data`` after every epoch.

    ``optimizer``: ``"adam"``, ``"sgd"`` or ``"bop"`` (Bop for the binary latent weights,
    Adam for the rest). Other keyword options are :class:`~onebit.train.TrainConfig` fields
    (``schedule``, ``weight_decay``, ``seed``, ``mixup``, ``topk``, ``weight_clip``,
    ``bop_threshold``, ``bop_gamma``, ``augment`` (default ``"none"``), ``memory_format``).
    ``num_classes`` defaults to the largest label + 1. The model is trained in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model must be a torch.nn.Module, got {type(model).__name__}")
    train, valid = _tensors(train_data, "train_data"), _tensors(valid_data, "valid_data")
    if train.tensors[0].shape[1:] != valid.tensors[0].shape[1:]:
        raise ValueError(
            f"fit: train inputs {list(train.tensors[0].shape[1:])} and valid inputs "
            f"{list(valid.tensors[0].shape[1:])} differ in shape"
        )
    classes = num_classes or int(max(train.tensors[1].max(), valid.tensors[1].max())) + 1
    data = DataBundle(name="user data", train=train, test=valid, num_classes=classes,
                      classes=[str(c) for c in range(classes)])
    unknown = sorted(set(options) - {f for f in TrainConfig.__dataclass_fields__} - {"model", "data", "out"})
    if unknown:
        raise TypeError(f"fit: unknown option(s) {', '.join(unknown)}")
    options.setdefault("augment", "none")
    config = TrainConfig(model=f"<{type(model).__name__}>", data="<user data>", epochs=epochs,
                         batch_size=batch_size, lr=lr, optimizer=optimizer,
                         out=None if out is None else os.fspath(out), tensorboard=tensorboard, **options)
    trainer = Trainer(config, console, model=model, data=data)
    if resume:
        if out is None:
            raise ValueError("fit: resume=True continues the run saved in out: give out")
        trainer.load_checkpoint(os.fspath(out))
    return trainer.fit()
