"""Training loop behind ``onebit train``: progress bar, epoch table, history.csv, checkpoints.

The trainer is deliberately plain: one :class:`TrainConfig`, one :class:`Trainer`
whose ``fit()`` runs epochs of ``train_epoch()`` and ``evaluate()``, and an
:class:`EpochTable` that prints fastai-style rows and writes ``history.csv``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader

from onebit import data as datasets
from onebit import io, models

__all__ = ["TrainConfig", "Trainer", "EpochTable", "train", "load_run"]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("one-cycle", "cosine", "constant")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.json`` in the run directory)."""

    model: str = "lenet_binary"
    data: str = "digits"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-2
    optimizer: str = "adam"
    schedule: str = "one-cycle"
    weight_decay: float = 0.0
    seed: int = 0
    out: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.model not in models.names():
            raise ValueError(f"unknown model {self.model!r}; known models: {', '.join(models.names())}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


class EpochTable:
    """Prints one aligned row per epoch (fastai style) and keeps them for ``history.csv``."""

    def __init__(self, columns: list[str], console: Console):
        self.columns = columns
        self.console = console
        self.rows: list[list[Any]] = []
        self.widths = [max(len(c), 5 if c == "epoch" else 10) for c in columns]

    def print_header(self) -> None:
        self.console.print("  ".join(c.ljust(w) for c, w in zip(self.columns, self.widths)), style="bold", highlight=False)

    def add(self, row: dict[str, Any]) -> None:
        values = [row[c] for c in self.columns]
        self.rows.append(values)
        self.console.print("  ".join(_fmt(v).ljust(w) for v, w in zip(values, self.widths)), highlight=False)

    def save(self, path: str) -> None:
        io.save_csv(path, self.columns, ([_fmt(v) for v in row] for row in self.rows))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes:02d}:{secs:02d}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Trains ``config.model`` on ``config.data``; ``fit()`` returns the epoch rows."""

    columns = ["epoch", "train_loss", "valid_loss", "accuracy", "time"]

    def __init__(self, config: TrainConfig, console: Console | None = None):
        config.validate()
        self.config = config
        self.console = console or Console()
        seed_everything(config.seed)
        self.data = datasets.load(config.data)
        self.model = models.create(
            config.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels, **config.model_kwargs
        )
        generator = torch.Generator().manual_seed(config.seed)
        self.train_loader = DataLoader(self.data.train, batch_size=config.batch_size, shuffle=True, generator=generator)
        self.test_loader = DataLoader(self.data.test, batch_size=256)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.table = EpochTable(self.columns, self.console)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = self.model.parameters()
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=0.9, nesterov=True, weight_decay=c.weight_decay)

    def _make_scheduler(self):
        c = self.config
        steps = c.epochs * len(self.train_loader)
        if c.schedule == "one-cycle":
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=c.lr, total_steps=steps)
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        return None

    def train_epoch(self, epoch: int, progress: Progress) -> float:
        self.model.train()
        task = progress.add_task(f"epoch {epoch}", total=len(self.train_loader), loss=math.nan)
        total, count = 0.0, 0
        for x, y in self.train_loader:
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
            progress.update(task, advance=1, loss=total / count)
        progress.remove_task(task)
        return total / count

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> tuple[float, float]:
        """Test-set (loss, accuracy)."""
        model = model or self.model
        model.eval()
        total, correct, count = 0.0, 0, 0
        for x, y in self.test_loader:
            logits = model(x)
            total += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            count += len(y)
        return total / count, correct / count

    def fit(self) -> list[dict[str, Any]]:
        c = self.config
        d = self.data
        shape = "x".join(map(str, (d.in_channels, *d.image_size)))
        self.console.print(
            f"[bold]onebit train[/]: {c.model} on {d.name} ({len(d.train)} train / {len(d.test)} test, {shape}, "
            f"{d.num_classes} classes)\n{c.epochs} epochs, {c.optimizer} lr={c.lr} {c.schedule}, "
            f"batch {c.batch_size}, seed {c.seed}",
            highlight=False,
        )
        history: list[dict[str, Any]] = []
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.table.print_header()
        with progress:
            for epoch in range(c.epochs):
                start = time.perf_counter()
                train_loss = self.train_epoch(epoch, progress)
                valid_loss, accuracy = self.evaluate()
                row = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "valid_loss": valid_loss,
                    "accuracy": accuracy,
                    "time": _clock(time.perf_counter() - start),
                }
                history.append(row)
                self.table.add(row)
                if c.out:
                    self.save(c.out)
        return history

    def save(self, directory: str) -> None:
        """Write the run: ``model.safetensors``, ``config.json``, ``history.csv`` (each atomically)."""
        os.makedirs(directory, exist_ok=True)
        io.save_tensors(os.path.join(directory, "model.safetensors"), self.model.state_dict())
        io.save_json(
            os.path.join(directory, "config.json"),
            {
                "config": dataclasses.asdict(self.config),
                "num_classes": self.data.num_classes,
                "in_channels": self.data.in_channels,
                "image_size": list(self.data.image_size),
            },
        )
        self.table.save(os.path.join(directory, "history.csv"))


def train(config: TrainConfig, console: Console | None = None) -> Trainer:
    """Build a :class:`Trainer` for ``config``, fit it and return it."""
    trainer = Trainer(config, console)
    trainer.fit()
    return trainer


def load_run(directory: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a saved run directory (eval mode) and return it with the run's metadata."""
    config_path = os.path.join(directory, "config.json")
    weights_path = os.path.join(directory, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {directory!r} is not a onebit run directory")
    meta = io.load_json(config_path)
    cfg = meta["config"]
    model = models.create(cfg["model"], num_classes=meta["num_classes"], in_channels=meta["in_channels"], **cfg.get("model_kwargs", {}))
    model.load_state_dict(io.load_tensors(weights_path))
    return model.eval(), meta
