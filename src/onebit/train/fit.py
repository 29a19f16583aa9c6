"""``onebit.fit``: onebit's trainer for a user's own model and data.

::

    history = onebit.fit(model, train_set, valid_set, epochs=10, optimizer="bop", out="runs/mine")

``model`` is any ``nn.Module`` mapping a batch ``[N, ...]`` to class logits ``[N, classes]``;
``train_data`` / ``valid_data`` are map-style datasets of ``(x, y)`` pairs (``y`` an integer
class), ``TensorDataset`` s or ``DataLoader`` s. They are gathered once into tensors (or, with
``loader_workers``, read item by item by torch's DataLoader); either way the epoch order is a
permutation drawn from the seed and the epoch alone (exact resume). The run is the same as ``onebit train``'s: progress
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
from onebit.data.bundle import Split, ToUnit
from onebit.data.datasets import ArrayDataset, ImageSource
from onebit.data.transforms import Compose
from onebit.train.config import TrainConfig
from onebit.train.trainer import Trainer

__all__ = ["fit"]


def _labels(y: torch.Tensor, what: str, num_classes: int | None) -> torch.Tensor:
    """``y`` as int64 classes, or a ``ValueError`` naming ``what`` and the first bad label."""
    if y.dim() != 1:
        raise ValueError(f"fit: {what}'s labels must be integer classes, one per example, got shape {list(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        bad = y[y != y.round()] if y.is_floating_point() else y
        first = f" (e.g. {bad[0].item()})" if len(bad) else ""
        raise ValueError(f"fit: {what}'s labels must be integer classes, got dtype {y.dtype}{first}")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"fit: {what}'s labels must be non-negative classes, got {int(y.min())}")
    if num_classes is not None and len(y) and int(y.max()) >= num_classes:
        raise ValueError(
            f"fit: {what} has label {int(y.max())}, but num_classes is {num_classes} (classes 0..{num_classes - 1})"
        )
    return y.long()


def _label_of(item: Any, what: str, index: int) -> int:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"fit: {what} must hold (x, y) pairs; item {index} is a {type(item).__name__}")
    y = item[1]
    if isinstance(y, torch.Tensor):
        if y.numel() != 1:
            raise ValueError(f"fit: {what}'s item {index} has a label of shape {list(y.shape)}, not one integer class")
        y = y.item()
    if isinstance(y, bool) or not float(y).is_integer():
        raise ValueError(f"fit: {what}'s labels must be integer classes; item {index} has {y!r}")
    return int(y)


def _tensors(data: Any, what: str, num_classes: int | None) -> TensorDataset:
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
        y = torch.tensor([_label_of(p, what, i) for i, p in enumerate(pairs)], dtype=torch.int64)
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
    else:
        raise TypeError(f"fit: {what} must be a dataset of (x, y) pairs or a DataLoader, got {type(data).__name__}")
    if len(x) == 0:
        raise ValueError(f"fit: {what} is empty")
    if len(x) != len(y):
        raise ValueError(f"fit: {what} has {len(x)} inputs and {len(y)} labels")
    return TensorDataset(x.float(), _labels(torch.as_tensor(y), what, num_classes))


class UserSource(ImageSource):
    """A user's map-style dataset of ``(x, y)`` pairs, read one item when asked (``x`` as float32)."""

    scale = 1.0

    def __init__(self, data: Any, what: str, num_classes: int | None):
        if len(data) == 0:
            raise ValueError(f"fit: {what} is empty")
        self.data, self.what = data, what
        labels = getattr(data, "targets", None)
        if labels is None:
            labels = [_label_of(data[i], what, i) for i in range(len(data))]
        self.labels = _labels(torch.as_tensor(labels), what, num_classes)
        if len(self.labels) != len(data):
            raise ValueError(f"fit: {what} has {len(data)} items and {len(self.labels)} targets")
        self.shape = tuple(torch.as_tensor(data[0][0]).shape)
        self.channels = self.shape[0] if self.shape else 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, _ = self.data[index]
        return torch.as_tensor(x, dtype=torch.float32), int(self.labels[index])


def _bundle(train: Any, valid: Any, num_classes: int | None, streamed: bool) -> DataBundle:
    """The user's data as a bundle, inputs as they are (no normalization): gathered into tensors,
    or (``streamed``, for loader workers) read item by item."""
    if streamed:
        if isinstance(train, DataLoader) or isinstance(valid, DataLoader):
            raise ValueError("fit: loader_workers serves map-style datasets; pass the datasets, not DataLoaders")
        sources = UserSource(train, "train_data", num_classes), UserSource(valid, "valid_data", num_classes)
        shapes = [s.shape for s in sources]
    else:
        tensors = _tensors(train, "train_data", num_classes), _tensors(valid, "valid_data", num_classes)
        sources = tuple(ArrayDataset(*t.tensors, scale=1.0) for t in tensors)
        shapes = [tuple(t.tensors[0].shape[1:]) for t in tensors]
    if shapes[0] != shapes[1]:
        raise ValueError(f"fit: train inputs {list(shapes[0])} and valid inputs {list(shapes[1])} differ in shape")
    classes = num_classes or int(max(sources[0].labels.max(), sources[1].labels.max())) + 1
    train_split, valid_split = (Split(s, Compose([ToUnit(1.0)])) for s in sources)
    return DataBundle(
        name="user data",
        train=train_split,
        test=valid_split,
        num_classes=classes,
        classes=[str(c) for c in range(classes)],
        augment="none",
        size=tuple(shapes[0][1:]),
    )


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
    loader_workers: int = 0,
    console=None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``train_data``, evaluating on ``valid_data`` after every epoch.

    ``optimizer``: ``"adam"``, ``"sgd"`` or ``"bop"`` (Bop for the binary latent weights,
    Adam for the rest). Other keyword options are :class:`~onebit.train.TrainConfig` fields
    (``schedule``, ``weight_decay``, ``seed``, ``mixup``, ``topk``, ``weight_clip``,
    ``bop_threshold``, ``bop_gamma``, ``augment`` (default ``"none"``), ``memory_format``).
    ``num_classes`` defaults to the largest label + 1; every label must be an integer class below it.
    ``loader_workers=N`` (N >= 1) reads map-style datasets item by item in N worker processes
    (their labels are read once up front, from a ``targets`` attribute when they have one)
    instead of gathering them into tensors. The model is trained in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit: model must be a torch.nn.Module, got {type(model).__name__}")
    data = _bundle(train_data, valid_data, num_classes, streamed=bool(loader_workers))
    unknown = sorted(set(options) - {f for f in TrainConfig.__dataclass_fields__} - {"model", "data", "out"})
    if unknown:
        raise TypeError(f"fit: unknown option(s) {', '.join(unknown)}")
    options.setdefault("augment", "none")
    config = TrainConfig(
        model=f"<{type(model).__name__}>",
        data="<user data>",
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        out=None if out is None else os.fspath(out),
        tensorboard=tensorboard,
        loader_workers=loader_workers,
        **options,
    )
    trainer = Trainer(config, console, model=model, data=data)
    if resume:
        if out is None:
            raise ValueError("fit: resume=True continues the run saved in out: give out")
        trainer.load_checkpoint(os.fspath(out))
    return trainer.fit()
