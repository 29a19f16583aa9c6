"""Training loop behind ``onebit train``: progress bar, epoch table, checkpoints, resume, DDP.

One :class:`TrainConfig`, one :class:`Trainer` whose ``fit()`` runs epochs of
``train_epoch()`` and ``evaluate()``, and an :class:`EpochTable` that prints
fastai-style rows (epoch, train_loss, valid_loss, accuracy, top_k_accuracy,
flip_ratio, time) and writes ``history.csv``.

Run directory (written by rank 0 only, every file atomically, no pickle):

- ``config.json``: the :class:`TrainConfig` and the data's shape;
- ``model.safetensors``: the model's ``state_dict`` (what ``load_run`` and ``onebit export`` read);
- ``checkpoint.safetensors``: optimizer tensors, the epoch-start signs for ``flip_ratio`` and the
  torch RNG states, with everything else (position, optimizer hyperparameters, scheduler state,
  numpy and Python RNG states, history rows) as JSON in the file's metadata: one file, so a
  checkpoint is never half written;
- ``history.csv``: the epoch table.

Distillation (``teacher``): the model of a finished run, frozen, sees each training batch too,
and the loss mixes the labels' cross-entropy with :func:`distillation_loss` to its outputs.

Reproducibility: the order of the training examples in epoch ``e`` is a permutation drawn
from ``seed`` and ``e`` alone; augmentation and mixup draw from a generator whose state is
checkpointed. A run stopped at any step (SIGINT/SIGTERM finish the current step and save)
and continued with ``resume`` ends with exactly the weights of an uninterrupted run in a
single process with the same seed.

Multi-process: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) or with ``workers > 1``
(the trainer starts the processes), the model is wrapped in DistributedDataParallel (gloo on
CPU, NCCL on GPUs); each global batch of ``batch_size`` examples is split between the ranks,
evaluation is sharded and summed, and only rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import fcntl
import json
import math
import os
import random
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from onebit import data as datasets
from onebit import io, models
from onebit.data.augment import Augment
from onebit.heap import keep_freed_memory
from onebit.optim import Bop, FlipCounter, binary_parameters, clip_weights

__all__ = [
    "TrainConfig", "Trainer", "EpochTable", "train", "resume", "load_run", "run_distributed", "Interrupted",
    "distillation_loss", "RunDirectoryError", "holds_run", "lock_run_directory", "prepare_run_directory",
    "read_run_config",
]

OPTIMIZERS = ("adam", "sgd", "bop")
SCHEDULES = ("one-cycle", "cosine", "constant")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
CHECKPOINT = "checkpoint.safetensors"
#: the files of a run; a directory holding any of the first three holds a run
RUN_FILES = ("config.json", "model.safetensors", CHECKPOINT, "history.csv")
#: the lock file a trainer holds (flock) while it writes a run directory
LOCK_FILE = ".onebit-train.lock"


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
    #: mixup alpha (0: off): inputs and targets mixed with lambda ~ Beta(alpha, alpha)
    mixup: float = 0.0
    #: k of the top-k accuracy column
    topk: int = 5
    #: processes of data-parallel training started by the trainer (ignored under torchrun)
    workers: int = 1
    #: "auto" (the dataset's own), "none", "crop", "flip" or "crop+flip"
    augment: str = "auto"
    #: resize the images to image_size x image_size (None: as stored)
    image_size: int | None = None
    #: clip binary latent weights to [-c, c] after each step (None: off)
    weight_clip: float | None = None
    bop_threshold: float = 1e-8
    bop_gamma: float = 1e-4
    #: layout of 4-D weights and image batches: "contiguous" (NCHW) or "channels_last" (NHWC, whose
    #: convolutions are faster on CPU); the model computes the same function in either
    memory_format: str = "contiguous"
    #: run directory of a trained teacher (e.g. the float twin) to distill from (None: off); the loss
    #: becomes (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    teacher: str | None = None
    #: w, the weight of the distillation term
    distill_weight: float = 1.0
    #: T, the softmax temperature of the distillation term
    distill_temperature: float = 1.0
    #: write TensorBoard event files (scalars, weight histograms) under out/tensorboard
    tensorboard: bool = False

    def validate(self) -> None:
        """Check every option (type, finite, in range) before anything starts: ``ValueError``
        (``TypeError`` for a wrong type) naming the option."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.default)
        if self.model not in models.names() and not models.is_file_model(self.model) and not self.model.startswith("<"):
            raise ValueError(
                f"unknown model {self.model!r}; known models: {', '.join(models.names())} "
                "(or a file's model as path/to/file.py:NAME)"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "topk", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        _in_range("epochs", self.epochs, 1, 10**6)
        _in_range("batch_size", self.batch_size, 1, 2**31 - 1)
        _in_range("topk", self.topk, 1, 2**31 - 1)
        _in_range("workers", self.workers, 1, 1024)
        _in_range("seed", self.seed, 0, 2**32 - 1)
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        _in_range("lr", self.lr, 0, math.inf, low_open=True)
        _in_range("weight_decay", self.weight_decay, 0, math.inf)
        if self.mixup < 0:
            raise ValueError(f"--mixup must be non-negative, got {self.mixup}")
        _in_range("mixup", self.mixup, 0, math.inf)
        if self.weight_clip is not None and not self.weight_clip > 0:
            raise ValueError(f"--weight-clip must be positive, got {self.weight_clip}")
        if self.weight_clip is not None:
            _in_range("weight_clip", self.weight_clip, 0, math.inf, low_open=True)
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image-size must be positive, got {self.image_size}")
        if self.image_size is not None:
            _in_range("image_size", self.image_size, 1, 4096)
        _in_range("bop_threshold", self.bop_threshold, 0, math.inf)
        _in_range("bop_gamma", self.bop_gamma, 0, 1, low_open=True)
        if self.augment != "auto":
            Augment.parse(self.augment, (32, 32))
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ValueError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        _in_range("distill_temperature", self.distill_temperature, 0, math.inf, low_open=True)
        if self.tensorboard and not self.out:
            raise ValueError("--tensorboard writes under the run directory: give --out")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory format {self.memory_format!r}; choose one of {', '.join(MEMORY_FORMATS)}")
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {self.model_kwargs!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_type(name: str, value: Any, default: Any) -> None:
    """``value`` has the kind of the field's default (an int for an int, a number for a float, ...)."""
    if value is None and name in ("out", "image_size", "weight_clip", "teacher"):
        return
    if isinstance(default, bool) or default is dataclasses.MISSING:
        return
    if isinstance(default, int) or name == "image_size":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float) or name == "weight_clip":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str) or name in ("out", "teacher"):
        ok = isinstance(value, str)
    else:
        ok = name != "model_kwargs" or isinstance(value, dict)
    if not ok:
        raise TypeError(f"{_option(name)} must be {type(default).__name__ if default is not None else 'a value'}, got {value!r}")


def _in_range(name: str, value: float, lo: float, hi: float, low_open: bool = False) -> None:
    """``value`` is a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``low_open``)."""
    finite = isinstance(value, int) or math.isfinite(value)
    inside = finite and (value > lo if low_open else value >= lo) and value <= hi
    if not inside:
        low = "(" if low_open else "["
        high = "inf)" if hi == math.inf else f"{hi}]"
        raise ValueError(f"{_option(name)} must be a finite number in {low}{lo}, {high}, got {value}")


class Interrupted(KeyboardInterrupt):
    """Raised by :meth:`Trainer.fit` after a stop request (signal) once the checkpoint is saved.

    A ``KeyboardInterrupt`` so that code catching ``Exception`` does not swallow a stop request
    and callers that only handle Ctrl-C still stop cleanly."""

    def __init__(self, signum: int, epoch: int, step: int, directory: str | None):
        self.signum, self.epoch, self.step, self.directory = signum, epoch, step, directory
        where = f"epoch {epoch} step {step}"
        saved = f"; checkpoint saved, continue with `onebit train --resume {directory}`" if directory else ""
        super().__init__(f"stopped by {signal.Signals(signum).name} at {where}{saved}")


class EpochTable:
    """Prints one aligned row per epoch (fastai style) and keeps them for ``history.csv``."""

    def __init__(self, columns: list[str], console: Console):
        self.columns = columns
        self.console = console
        self.rows: list[list[Any]] = []
        self.widths = [max(len(c), 5 if c == "epoch" else 10) for c in columns]

    def print_header(self) -> None:
        self.console.print("  ".join(c.ljust(w) for c, w in zip(self.columns, self.widths)), style="bold", highlight=False)

    def print_row(self, values: list[Any]) -> None:
        self.console.print("  ".join(_fmt(v).ljust(w) for v, w in zip(values, self.widths)), highlight=False)

    def add(self, row: dict[str, Any]) -> None:
        values = [row[c] for c in self.columns]
        self.rows.append(values)
        self.print_row(values)

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
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training examples in ``epoch``: a function of ``seed`` and ``epoch`` only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains ``config.model`` on ``config.data``; ``fit()`` returns the epoch rows.

    ``model`` and ``data`` (a :class:`~onebit.data.DataBundle`) replace what the config names:
    a user's own module and dataset (:func:`onebit.fit`)."""

    base_columns = ["epoch", "train_loss", "valid_loss", "accuracy", "top_k_accuracy", "flip_ratio", "time"]

    def __init__(self, config: TrainConfig, console: Console | None = None, *, model: nn.Module | None = None,
                 data: datasets.DataBundle | None = None):
        config.validate()
        self.config = config
        self.rank, self.world_size = _distributed()
        self.is_main = self.rank == 0
        self.console = console or Console()
        if not self.is_main:
            self.console = Console(quiet=True)
        seed_everything(config.seed)
        self.data = data if data is not None else datasets.load(config.data, image_size=config.image_size)
        if model is None:
            self.model = _create_model(config.model, self.data.num_classes, self.data.in_channels, config.model_kwargs)
            _probe(self.model, config.model, config.model_kwargs, self.data.test.tensors[0][:1])
        else:
            self.model = model
        # one GPU per process where GPUs exist (torchrun's LOCAL_RANK), else the CPU
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else torch.device("cpu")
        self.memory_format = MEMORY_FORMATS[config.memory_format]
        self.model.to(self.device, memory_format=self.memory_format)
        self.net: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.teacher = self._load_teacher() if config.teacher else None
        self.binary_params = binary_parameters(self.model)
        self.optimizers = self._make_optimizers()
        self.optimizer = self.optimizers[0]  # the float optimizer (Adam or SGD)
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = self._make_scheduler()
        spec = self.data.augment if config.augment == "auto" else config.augment
        self.augment = Augment.parse(spec, self.data.image_size)
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + self.rank)
        self.mixup_rng = np.random.default_rng([config.seed, self.rank])
        self.flips = FlipCounter(self.binary_params)
        self.k = min(config.topk, self.data.num_classes)
        self.table = EpochTable(list(self.base_columns), self.console)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self._loss_sum, self._loss_count, self._elapsed = 0.0, 0, 0.0
        self._stop_signal: int | None = None
        self.interrupted: Interrupted | None = None

    # -- construction ----------------------------------------------------------------------
    def _load_teacher(self) -> nn.Module:
        """The teacher run's model: eval mode, frozen, on the device, in the run's memory format."""
        teacher, meta = load_run(self.config.teacher)
        mine = {"num_classes": self.data.num_classes, "in_channels": self.data.in_channels, "image_size": list(self.data.image_size)}
        theirs = {k: meta[k] for k in mine}
        if theirs != mine:
            raise ValueError(f"teacher {self.config.teacher!r} was trained on data of another shape: {theirs}, this run {mine}")
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher.to(self.device, memory_format=self.memory_format)

    def _make_optimizers(self) -> list[torch.optim.Optimizer]:
        c = self.config
        if c.optimizer == "bop":
            binary = {id(p) for p in self.binary_params}
            if not binary:
                raise ValueError(f"--optimizer bop needs binary weights, and model {c.model!r} has none")
            rest = [p for p in self.model.parameters() if id(p) not in binary]
            return [
                torch.optim.Adam(rest, lr=c.lr, weight_decay=c.weight_decay),
                Bop(self.binary_params, threshold=c.bop_threshold, gamma=c.bop_gamma),
            ]
        params = self.model.parameters()
        if c.optimizer == "adam":
            return [torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)]
        return [torch.optim.SGD(params, lr=c.lr, momentum=0.9, nesterov=True, weight_decay=c.weight_decay)]

    def _make_scheduler(self):
        c = self.config
        steps = c.epochs * self.steps_per_epoch
        if c.schedule == "one-cycle":
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=c.lr, total_steps=steps)
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        return None

    def _steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.config.batch_size)

    # -- one epoch ---------------------------------------------------------------------------
    def _batch_indices(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        idx = perm[step * self.config.batch_size : (step + 1) * self.config.batch_size]
        if self.world_size > 1:
            short = (-len(idx)) % self.world_size
            if short:  # pad the last global batch so that every rank gets as many examples
                idx = torch.cat([idx, perm[:short]])
            idx = idx[self.rank :: self.world_size]
        return idx

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch on the device, in the configured memory format (4-D batches only)."""
        if x.dim() == 4:
            return x.to(self.device, memory_format=self.memory_format)
        return x.to(self.device)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha = self.config.mixup
        if alpha > 0:
            lam = float(self.mixup_rng.beta(alpha, alpha))
            perm = torch.randperm(len(y), generator=self.generator).to(y.device)
            x = lam * x + (1 - lam) * x[perm]
            logits = self.net(x)
            loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        else:
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            target = self.teacher(x)  # sees the same (augmented, mixed) images as the student
        w = self.config.distill_weight
        return (1 - w) * loss + w * distillation_loss(logits, target, self.config.distill_temperature)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.augment.enabled:
            x = self.augment(x, self.generator)
        x, y = self._to_device(x), y.to(self.device)
        loss = self._loss(x, y)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.config.weight_clip is not None:
            clip_weights(self.binary_params, self.config.weight_clip)
        return float(loss.item())

    def train_epoch(self, epoch: int, progress: Progress | None = None) -> float:
        """Run the rest of ``epoch`` from ``self.step``; returns the mean training loss."""
        self.net.train()
        x_all, y_all = self.data.train.tensors
        perm = epoch_permutation(len(y_all), self.config.seed, epoch)
        task = None
        if progress is not None:
            task = progress.add_task(f"epoch {epoch}", total=self.steps_per_epoch, completed=self.step, loss=self._mean_loss())
        while self.step < self.steps_per_epoch:
            idx = self._batch_indices(perm, self.step)
            loss = self.train_step(x_all[idx], y_all[idx])  # moved to the device in train_step
            self._loss_sum += loss * len(idx)
            self._loss_count += len(idx)
            self.step += 1
            self.global_step += 1
            if progress is not None:
                progress.update(task, advance=1, loss=self._mean_loss())
            self.on_step_end()
            if self._should_stop():
                break
        if progress is not None:
            progress.remove_task(task)
        return self._mean_loss()

    def _mean_loss(self) -> float:
        if self.world_size > 1:
            t = torch.tensor([self._loss_sum, float(self._loss_count)], dtype=torch.float64)
            t = self._all_reduce(t)
            return float(t[0] / t[1]) if t[1] else math.nan
        return self._loss_sum / self._loss_count if self._loss_count else math.nan

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or ``op``) a small CPU tensor over the ranks (through the device for NCCL)."""
        moved = t.to(self.device)
        dist.all_reduce(moved, op=op)
        return moved.cpu()

    def on_step_end(self) -> None:
        """Hook called after every training step (override in subclasses, e.g. to stop at a given step)."""

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask ``fit()`` to stop after the current step, save a checkpoint and raise :class:`Interrupted`."""
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        if self.world_size > 1:  # every rank stops at the same step
            flag = torch.tensor([0 if self._stop_signal is None else int(self._stop_signal)])
            flag = self._all_reduce(flag, dist.ReduceOp.MAX)
            if flag.item() and self._stop_signal is None:
                self._stop_signal = int(flag.item())
        return self._stop_signal is not None

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_metrics(self, model: nn.Module | None = None) -> dict[str, float]:
        """Test-set ``valid_loss``, ``accuracy`` and ``top_k_accuracy`` (sharded across ranks)."""
        model = model or self.model
        model.eval()
        x_all, y_all = self.data.test.tensors
        idx = torch.arange(self.rank, len(y_all), self.world_size)
        sums = torch.zeros(4, dtype=torch.float64)
        for start in range(0, len(idx), 256):
            batch = idx[start : start + 256]
            x, y = self._to_device(x_all[batch]), y_all[batch].to(self.device)
            logits = model(x)
            sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
            sums[1] += (logits.argmax(dim=1) == y).sum().item()
            topk = logits.topk(self.k, dim=1).indices
            sums[2] += (topk == y[:, None]).any(dim=1).sum().item()
            sums[3] += len(y)
        if self.world_size > 1:
            sums = self._all_reduce(sums)
        n = float(sums[3])
        return {"valid_loss": float(sums[0]) / n, "accuracy": float(sums[1]) / n, "top_k_accuracy": float(sums[2]) / n}

    def evaluate(self, model: nn.Module | None = None) -> tuple[float, float]:
        """Test-set (loss, accuracy)."""
        m = self.evaluate_metrics(model)
        return m["valid_loss"], m["accuracy"]

    # -- the run ---------------------------------------------------------------------------
    def describe(self) -> str:
        c, d = self.config, self.data
        shape = "x".join(map(str, (d.in_channels, *d.image_size)))
        extras = [f"augment {self.augment.describe()}"]
        if c.mixup:
            extras.append(f"mixup {c.mixup}")
        if c.weight_clip is not None:
            extras.append(f"weight clip {c.weight_clip}")
        if self.teacher is not None:
            extras.append(f"distilled from {c.teacher} (w={c.distill_weight}, T={c.distill_temperature})")
        if c.memory_format != "contiguous":
            extras.append(c.memory_format)
        if c.optimizer == "bop":
            extras.append(f"bop threshold={c.bop_threshold} gamma={c.bop_gamma}")
        if self.world_size > 1:
            extras.append(f"{self.world_size} processes")
        return (
            f"[bold]onebit train[/]: {c.model} on {d.name} ({len(d.train)} train / {len(d.test)} test, {shape}, "
            f"{d.num_classes} classes)\n{c.epochs} epochs, {c.optimizer} lr={c.lr} {c.schedule}, "
            f"batch {c.batch_size}, seed {c.seed}, {', '.join(extras)}"
        )

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``config.epochs`` (from where a resumed run stopped). SIGINT/SIGTERM end the
        current step, save a checkpoint and raise :class:`Interrupted`."""
        c = self.config
        self.console.print(self.describe(), highlight=False)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=not self.is_main,
        )
        self.table.print_header()
        for row in self.table.rows:
            self.table.print_row(row)
        # one trainer per run directory: the processes a distributed run starts share their
        # starter's lock (the onebit command holds it), a single process takes it here
        lock = lock_run_directory(c.out) if c.out and self.world_size == 1 else contextlib.nullcontext()
        with lock:
            return self._fit(progress)

    def _fit(self, progress: Progress) -> list[dict[str, Any]]:
        c = self.config
        if c.out and self.is_main:
            self.save_config(c.out)
        board = None
        if c.tensorboard and c.out and self.is_main:
            from onebit.train.tensorboard import TensorBoardLog

            board = TensorBoardLog(c.out)
        previous = self._install_signal_handlers()
        try:
            with progress:
                while self.epoch < c.epochs:
                    start = time.perf_counter() - self._elapsed
                    if self.step == 0:
                        self.flips.snapshot()
                    if self.epoch == 0 and self.step == 0 and c.out and self.is_main:
                        _record_weights(self.model, c.out, 0)  # the initial weights, for `onebit plot weights --animate`
                    train_loss = self.train_epoch(self.epoch, progress)
                    if self._stop_signal is not None and self.step < self.steps_per_epoch:
                        self._elapsed = time.perf_counter() - start
                        return self._stop()
                    row = {"epoch": self.epoch, "train_loss": train_loss, **self.evaluate_metrics()}
                    row["flip_ratio"] = self.flips.ratio()
                    row["time"] = _clock(time.perf_counter() - start)
                    self.table.add(row)
                    if board is not None:
                        board.epoch(row, self.model, self.optimizers)
                    self.epoch, self.step = self.epoch + 1, 0
                    self._loss_sum, self._loss_count, self._elapsed = 0.0, 0, 0.0
                    if c.out and self.is_main:
                        self.save(c.out)
                        _record_weights(self.model, c.out, self.epoch)
                    if self._stop_signal is not None and self.epoch < c.epochs:
                        return self._stop()
        finally:
            self._restore_signal_handlers(previous)
            if board is not None:
                board.close()
        return self.history

    @property
    def history(self) -> list[dict[str, Any]]:
        return [dict(zip(self.table.columns, row)) for row in self.table.rows]

    def _stop(self) -> list[dict[str, Any]]:
        if self.config.out and self.is_main:
            self.save(self.config.out)
        self.interrupted = Interrupted(self._stop_signal, self.epoch, self.step, self.config.out)
        raise self.interrupted

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._stop_signal = signum

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        if previous:
            for s, h in previous.items():
                signal.signal(s, h)

    # -- files -----------------------------------------------------------------------------
    def save_config(self, directory: str) -> None:
        io.save_json(
            os.path.join(directory, "config.json"),
            {
                "config": dataclasses.asdict(self.config),
                "num_classes": self.data.num_classes,
                "in_channels": self.data.in_channels,
                "image_size": list(self.data.image_size),
                "classes": self.data.classes,
            },
        )

    def save(self, directory: str) -> None:
        """Write the run: ``model.safetensors``, ``checkpoint.safetensors``, ``config.json``,
        ``history.csv`` (each atomically)."""
        os.makedirs(directory, exist_ok=True)
        io.save_tensors(os.path.join(directory, "model.safetensors"), {k: v.cpu() for k, v in self.model.state_dict().items()})
        tensors, meta = self.checkpoint_state()
        io.save_tensors(os.path.join(directory, CHECKPOINT), tensors, metadata={"onebit_checkpoint": json.dumps(meta)})
        self.save_config(directory)
        self.table.save(os.path.join(directory, "history.csv"))

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue the run exactly: tensors and a JSON-able dict."""
        tensors: dict[str, torch.Tensor] = {f"model.{k}": v.cpu() for k, v in self.model.state_dict().items()}
        optimizers = []
        for i, opt in enumerate(self.optimizers):
            sd = opt.state_dict()
            scalars: dict[str, dict[str, Any]] = {}
            for pid, state in sd["state"].items():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizer.{i}.{pid}.{key}"] = value.cpu()
                    else:
                        scalars.setdefault(str(pid), {})[key] = value
            optimizers.append({"param_groups": sd["param_groups"], "scalars": scalars, "params": sorted(map(str, sd["state"]))})
        for i, s in enumerate(self.flips.signs):
            tensors[f"flips.{i}"] = s.to(torch.uint8).cpu()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.generator"] = self.generator.get_state()
        np_state = np.random.get_state()
        py_state = random.getstate()
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
            "elapsed": self._elapsed,
            "optimizers": optimizers,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": {
                "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "python": [py_state[0], list(py_state[1]), py_state[2]],
                "mixup": self.mixup_rng.bit_generator.state,
            },
            "history": {"columns": self.table.columns, "rows": self.table.rows},
            "world_size": self.world_size,
        }
        return tensors, meta

    def load_checkpoint(self, directory: str) -> None:
        """Restore model, optimizers, scheduler, RNG states, position and history from ``directory``.

        A damaged checkpoint raises :class:`onebit.io.FileFormatError` naming the file."""
        path = os.path.join(directory, CHECKPOINT)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {directory!r} has no checkpoint to resume from")
        try:
            meta = json.loads(io.tensors_metadata(path)["onebit_checkpoint"])
            tensors = io.load_tensors(path)
            self._restore(meta, tensors)
        except io.FileFormatError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            what = f"missing entry {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
            raise io.FileFormatError(f"{path}: damaged or not this run's checkpoint ({what})") from None

    def _restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        for i, (opt, saved) in enumerate(zip(self.optimizers, meta["optimizers"])):
            state: dict[int, dict[str, Any]] = {}
            prefix = f"optimizer.{i}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    pid, name = key[len(prefix) :].split(".", 1)
                    state.setdefault(int(pid), {})[name] = value
            for pid, scalars in saved["scalars"].items():
                state.setdefault(int(pid), {}).update(scalars)
            opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        if self.scheduler is not None and meta["scheduler"] is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        self.flips.signs = [tensors[f"flips.{i}"].bool().to(self.device) for i in range(len(self.flips.params))]
        rng = meta["rng"]
        if self.rank == 0:
            torch.set_rng_state(tensors["rng.torch"])
            self.generator.set_state(tensors["rng.generator"])
            n = rng["numpy"]
            np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
            p = rng["python"]
            random.setstate((p[0], tuple(p[1]), p[2]))
            self.mixup_rng.bit_generator.state = rng["mixup"]
        else:  # other ranks: fresh but deterministic streams for the rest of the run
            self.generator.manual_seed(self.config.seed * 7919 + self.rank + 104_729 * meta["global_step"])
            self.mixup_rng = np.random.default_rng([self.config.seed, self.rank, meta["global_step"]])
        self.epoch, self.step, self.global_step = meta["epoch"], meta["step"], meta["global_step"]
        self._loss_sum, self._loss_count, self._elapsed = meta["loss_sum"], meta["loss_count"], meta["elapsed"]
        self.table.rows = [list(r) for r in meta["history"]["rows"]]

    @classmethod
    def from_run(cls, directory: str, console: Console | None = None, **overrides) -> "Trainer":
        """A trainer continuing the run saved in ``directory`` (its config, checkpoint and history)."""
        config = TrainConfig.from_dict(read_run_config(directory)["config"])
        config.out = directory
        for key, value in overrides.items():
            setattr(config, key, value)
        trainer = cls(config, console)
        trainer.load_checkpoint(directory)
        return trainer


def train(config: TrainConfig, console: Console | None = None) -> Trainer:
    """Build a :class:`Trainer` for ``config``, fit it and return it (raises :class:`Interrupted` on a signal)."""
    trainer = Trainer(config, console)
    trainer.fit()
    return trainer


def resume(directory: str, console: Console | None = None, **overrides) -> Trainer:
    """Continue the run saved in ``directory`` to its configured number of epochs and return the trainer."""
    trainer = Trainer.from_run(directory, console, **overrides)
    trainer.fit()
    return trainer


def load_run(directory: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a saved run directory (eval mode) and return it with the run's metadata.

    A missing file raises ``FileNotFoundError``, a damaged one :class:`onebit.io.FileFormatError`,
    each naming the file."""
    weights_path = os.path.join(directory, "model.safetensors")
    meta = read_run_config(directory)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} not found: {directory!r} is not a onebit run directory")
    cfg = meta["config"]
    model = _create_model(cfg["model"], meta["num_classes"], meta["in_channels"], cfg.get("model_kwargs", {}))
    state = io.load_tensors(weights_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise io.FileFormatError(f"{weights_path}: does not hold the weights of this run's model ({first})") from None
    return model.eval(), meta


def read_run_config(directory: str) -> dict[str, Any]:
    """The checked ``config.json`` of a run directory: ``FileNotFoundError`` when missing,
    :class:`onebit.io.FileFormatError` naming the file and the entry when damaged."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory!r} is not a onebit run directory")
    meta = io.load_json(path)

    def bad(why: str) -> io.FileFormatError:
        return io.FileFormatError(f"{path}: {why} (not a onebit run's config.json, or damaged)")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    for key in ("config", "num_classes", "in_channels", "image_size"):
        if key not in meta:
            raise bad(f"missing entry {key!r}")
    cfg = meta["config"]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), str):
        raise bad("entry 'config' has no model name")
    if not isinstance(cfg.get("model_kwargs", {}), dict):
        raise bad("entry 'config.model_kwargs' is not an object")
    for key in ("num_classes", "in_channels"):
        if not (isinstance(meta[key], int) and not isinstance(meta[key], bool) and 1 <= meta[key] <= 1 << 20):
            raise bad(f"entry {key!r} is not a positive integer: {meta[key]!r}")
    size = meta["image_size"]
    if not (isinstance(size, list) and 1 <= len(size) <= 3 and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 16 for v in size)):
        raise bad(f"entry 'image_size' is not a list of positive integers: {size!r}")
    return meta


def _create_model(name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """``models.create``; a model its arguments cannot build raises ``ValueError`` naming them."""
    try:
        with warnings.catch_warnings(record=True) as caught:  # torch's warnings about empty tensors:
            warnings.simplefilter("always")                   # raised as one error below instead
            model = models.create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
        if not any(p.numel() == 0 for p in model.parameters()):
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return model
    except (ValueError, TypeError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as error:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no --model-arg"
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"model {name!r} cannot be built with {args}: {first}") from None


def _probe(model: nn.Module, name: str, kwargs: dict[str, Any], example: torch.Tensor) -> None:
    """One example through the model (eval mode, no gradient): a model its arguments made
    empty or of the wrong shape for the data raises ``ValueError`` naming them, before training."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no --model-arg"
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ValueError(f"model {name!r} built with {args} has empty parameters ({empty[0]}, ...)")
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"model {name!r} built with {args} cannot take the data's input of shape {list(example.shape)}: {first}") from None
    finally:
        model.train(was_training)


# -- run directories -------------------------------------------------------------------------
class RunDirectoryError(ValueError):
    """A run directory that cannot be used: it holds another run, another trainer holds it, or it is a file."""


def holds_run(directory: str) -> bool:
    """Whether ``directory`` holds (part of) a run: its config, weights or checkpoint."""
    return any(os.path.exists(os.path.join(directory, name)) for name in RUN_FILES[:3])


def prepare_run_directory(directory: str) -> None:
    """Create ``directory`` for a run; :class:`RunDirectoryError` when it (or a parent) is a file."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise RunDirectoryError(f"--out {directory} is a file, not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirectoryError(f"--out {directory}: a part of the path is a file, not a directory") from None
    except OSError as error:
        raise RunDirectoryError(f"--out {directory}: cannot create the directory ({error.strerror})") from None


def clear_run(directory: str) -> None:
    """Remove the run files of ``directory`` (and stale temporaries); the caller holds its lock."""
    for name in RUN_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.unlink(path)
    io.remove_stale_temporaries(directory, every=True)


_LOCKS: dict[str, list] = {}  # real path -> [file descriptor, holders in this process]
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def lock_run_directory(directory: str):
    """Hold ``directory``'s run lock (an exclusive ``flock`` on its lock file) while in the block.

    A second process asking for it fails at once with :class:`RunDirectoryError` naming the
    holder's pid; the lock is re-entrant within one process, and the kernel releases it when
    its holder dies (even by ``kill -9``). Stale temporary files of interrupted writes are
    removed once the lock is taken."""
    prepare_run_directory(directory)
    key = os.path.realpath(directory)
    with _LOCKS_GUARD:
        held = _LOCKS.get(key)
        if held is not None:
            held[1] += 1
        else:
            fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                who = f" (pid {owner})" if owner.isdigit() else ""
                raise RunDirectoryError(
                    f"{directory} is in use by another onebit train{who}; wait for it to end or choose another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _LOCKS[key] = held = [fd, 1]
            io.remove_stale_temporaries(directory, every=True)
    try:
        yield
    finally:
        with _LOCKS_GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _LOCKS[key]
                fcntl.flock(held[0], fcntl.LOCK_UN)
                os.close(held[0])


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    the mean over the batch of ``T^2 * sum_k p_k (log p_k - log q_k)`` with ``p`` the teacher's and
    ``q`` the student's softmax at temperature ``T``; no gradient reaches ``teacher``.
    ReActNet (Liu et al. 2020) trains binary networks with it (T = 1) from a float network."""
    t = temperature
    log_q = F.log_softmax(student / t, dim=1)
    log_p = F.log_softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


# -- multi-process ---------------------------------------------------------------------------
def init_distributed_from_env() -> bool:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); gloo on CPU, NCCL with GPUs. Returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return True


def end_distributed(completed: bool) -> None:
    """Leave the process group. After a completed run the ranks first meet at a barrier, so they
    tear gloo down together: a rank that leaves while its peer is still finishing can abort the
    peer's connection threads ("terminate called without an active exception")."""
    if completed:
        dist.barrier()
    # A DistributedDataParallel wrapper (or any tensor a collective saw) keeps the group alive;
    # the last reference must go now, so that destroying the group joins gloo's threads while
    # the interpreter runs. A group left to interpreter shutdown has its threads release
    # Python tensors during finalization, which aborts the process.
    gc.collect()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config_dict: dict, resume_dir: str | None) -> None:
    keep_freed_memory()  # a spawned interpreter: as the onebit command does in its own process
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    init_distributed_from_env()
    done, trainer = False, None
    try:
        config = TrainConfig.from_dict(config_dict)
        trainer = Trainer.from_run(resume_dir) if resume_dir else Trainer(config)
        try:
            trainer.fit()
        except Interrupted:
            pass
        if rank == 0:
            metrics = trainer.evaluate_metrics()
            trainer.console.print(f"test accuracy: {metrics['accuracy']:.4f}", highlight=False)
        else:
            trainer.evaluate_metrics()
        done = True
    finally:
        trainer = None  # its DDP wrapper holds the process group (see end_distributed)
        end_distributed(done)


def run_distributed(config: TrainConfig, workers: int, resume_dir: str | None = None) -> int:
    """Train with ``workers`` processes started here (DDP over gloo on 127.0.0.1).

    SIGTERM/SIGINT to this process are forwarded to the workers, which stop at the same step
    and save. Returns 0 on success, the signal's conventional status when stopped.
    """
    import torch.multiprocessing as mp

    config.validate()
    ctx = mp.start_processes(
        _worker, args=(workers, _free_port(), dataclasses.asdict(config), resume_dir), nprocs=workers,
        join=False, start_method="spawn",
    )
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not ctx.join(timeout=0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        return 130 if received[0] == signal.SIGINT else 0
    return 0


def _record_weights(model: nn.Module, directory: str, epoch: int) -> None:
    """Every layer's weights after ``epoch`` epochs, in ``directory/weights/`` (see :func:`onebit.plot.record_weights`)."""
    from onebit.plot import record_weights

    record_weights(model, directory, epoch)
