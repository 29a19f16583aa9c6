"""The training loop: :class:`Trainer` runs epochs of steps on a built model and data.

``fit()`` runs epochs of ``train_epoch()`` and ``evaluate_metrics()``, prints a row of the
epoch table after each (:mod:`onebit.train.console`) and saves the run directory
(:mod:`onebit.train.checkpoint`) when the config has an ``out``.

Distillation (``teacher``): the model of a finished run, frozen, sees each training batch too,
and the loss mixes the labels' cross-entropy with :func:`distillation_loss` to its outputs.

Reproducibility: the order of the training examples in epoch ``e`` is a permutation drawn
from ``seed`` and ``e`` alone (:func:`epoch_permutation`); augmentation and mixup draw from a
generator whose state is checkpointed. A run stopped at any step (SIGINT/SIGTERM finish the
current step and save, then :class:`Interrupted` is raised) and continued with ``resume``
ends with exactly the weights of an uninterrupted run in a single process with the same seed.

Multi-process: in a process group (started by :mod:`onebit.train.distributed` or torchrun)
the model is wrapped in DistributedDataParallel; each global batch of ``batch_size`` examples
is split between the ranks, evaluation is sharded and summed, every rank stops at the same
step, and only rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader

from onebit.data import DataBundle
from onebit.data.augment import Augment
from onebit.data.loader import (
    AugmentedSamples,
    EpochBatches,
    IndexBatches,
    batch_indices,
    batches_of,
    close_loader,
    epoch_permutation,
    make_loader,
    steps_per_epoch,
)
from onebit.optim import FlipCounter, binary_parameters, clip_weights
from onebit.train import checkpoint
from onebit.train.build import build, load_start_weights, make_optimizers, make_scheduler, seed_everything
from onebit.train.config import MEMORY_FORMATS, TrainConfig
from onebit.train.console import EpochTable, clock, describe_run, progress_bar
from onebit.train.precision import autocast, make_scaler, resolve_device
from onebit.train.tensorboard import TensorBoardLog

__all__ = ["Trainer", "Interrupted", "train", "resume", "distillation_loss", "epoch_permutation"]


class Interrupted(KeyboardInterrupt):
    """Raised by :meth:`Trainer.fit` after a stop request (signal) once the checkpoint is saved.

    A ``KeyboardInterrupt`` so that code catching ``Exception`` does not swallow a stop request
    and callers that only handle Ctrl-C still stop cleanly."""

    def __init__(self, signum: int, epoch: int, step: int, directory: str | None):
        self.signum, self.epoch, self.step, self.directory = signum, epoch, step, directory
        where = f"epoch {epoch} step {step}"
        saved = f"; checkpoint saved, continue with `onebit train --resume {directory}`" if directory else ""
        super().__init__(f"stopped by {signal.Signals(signum).name} at {where}{saved}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    the mean over the batch of ``T^2 * sum_k p_k (log p_k - log q_k)`` with ``p`` the teacher's and
    ``q`` the student's softmax at temperature ``T``; no gradient reaches ``teacher``.
    ReActNet (Liu et al. 2020) trains binary networks with it (T = 1) from a float network."""
    t = temperature
    log_q = F.log_softmax(student / t, dim=1)
    log_p = F.log_softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Trains ``model`` on ``data`` (a :class:`~onebit.data.DataBundle`) with the hyper-parameters
    of ``config``; ``fit()`` returns the epoch rows.

    ``Trainer.from_config(config)`` (and ``Trainer(config)``) builds the model and data the config
    names (:func:`onebit.train.build.build`); :func:`onebit.fit` passes a user's own module and
    dataset. A model passed here is trained in place."""

    base_columns = ["epoch", "train_loss", "valid_loss", "accuracy", "top_k_accuracy", "flip_ratio", "time"]

    def __init__(
        self,
        config: TrainConfig,
        console: Console | None = None,
        *,
        model: nn.Module | None = None,
        data: DataBundle | None = None,
    ):
        config.validate()
        self.config = config
        self.rank, self.world_size = _rank_and_world_size()
        self.is_main = self.rank == 0
        self.console = console or Console()
        if not self.is_main:
            self.console = Console(quiet=True)
        if model is None or data is None:
            # the names of the config, resolved by build(), which seeds the generators before creating the model
            model, data = build(config, model=model, data=data)
        else:
            seed_everything(config.seed)  # a model built elsewhere: training starts from the seed
            if config.weights:
                load_start_weights(model, config.weights)
        self.data, self.model = data, model
        self._place_model()
        self.teacher = self._load_teacher() if config.teacher else None
        self.binary_params = binary_parameters(self.model)
        self.optimizers = make_optimizers(config, self.model, self.binary_params)
        self.optimizer = self.optimizers[0]  # the float optimizer (Adam or SGD)
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), config.batch_size, self.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.data.train)} training example(s) make no batch of at least 2 per process "
                "(BatchNorm in training needs 2): use more data or fewer processes"
            )
        self.scheduler = make_scheduler(config, self.optimizer, config.epochs * self.steps_per_epoch)
        self.scaler = make_scaler(self.device, config.precision)
        self.augment = Augment.parse(
            self.data.augment if config.augment == "auto" else config.augment, self.data.image_size
        )
        # in-memory data without loader workers: whole batches gathered and augmented at once
        self.batched = self.data.train.in_memory and config.loader_workers == 0 and not self.augment.resized_crop
        self._train_loader: DataLoader | None = None
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + self.rank)
        self.mixup_rng = np.random.default_rng([config.seed, self.rank])
        self.flips = FlipCounter(self.binary_params)
        self.k = min(config.topk, self.data.num_classes)
        self.table = EpochTable(list(self.base_columns), self.console)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.loss_sum, self.loss_count, self.elapsed = 0.0, 0, 0.0  # of the epoch so far
        self._stop_signal: int | None = None
        self.interrupted: Interrupted | None = None

    @classmethod
    def from_config(cls, config: TrainConfig, console: Console | None = None) -> Trainer:
        """A trainer of the model on the data ``config`` names, both built by :func:`onebit.train.build.build`
        (the generators seeded from ``config.seed`` first, so that a seed gives the same initial weights)."""
        return cls(config, console)

    @classmethod
    def from_run(cls, directory: str, console: Console | None = None, **overrides) -> Trainer:
        """A trainer continuing the run saved in ``directory`` (its config, checkpoint and history)."""
        config = TrainConfig.from_dict(checkpoint.read_run_config(directory)["config"])
        config.out = directory
        for key, value in overrides.items():
            setattr(config, key, value)
        trainer = cls.from_config(config, console)
        trainer.load_checkpoint(directory)
        return trainer

    # -- construction ----------------------------------------------------------------------
    def _place_model(self) -> None:
        """The model on the device, in the configured memory format, wrapped in DDP in a process group."""
        # one GPU per process where GPUs exist (torchrun's LOCAL_RANK), else the CPU
        self.device = resolve_device(self.config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this rank's GPU, also for the loader's pinning thread
        self.memory_format = MEMORY_FORMATS[self.config.memory_format]
        self.model.to(self.device, memory_format=self.memory_format)
        self.net: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _load_teacher(self) -> nn.Module:
        """The teacher run's model: eval mode, frozen, on the device, in the run's memory format."""
        teacher, meta = checkpoint.load_run(self.config.teacher)
        mine = {
            "num_classes": self.data.num_classes,
            "in_channels": self.data.in_channels,
            "image_size": list(self.data.image_size),
        }
        if meta.get("std") is not None:  # runs written before the statistics were saved have none
            mine.update(mean=self.data.mean, std=self.data.std)
        theirs = {k: meta.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(
                f"teacher {self.config.teacher!r} was trained on data of another shape: {theirs}, this run {mine}"
            )
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher.to(self.device, memory_format=self.memory_format)

    # -- the data ----------------------------------------------------------------------------
    def _training_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The (augmented) batches of ``epoch`` from ``self.step`` on, on the CPU."""
        if self.batched:
            perm = epoch_permutation(len(self.data.train), self.config.seed, epoch)
            for step in range(self.step, self.steps_per_epoch):
                idx = batch_indices(perm, step, self.config.batch_size, self.rank, self.world_size)
                x, y = self.data.train.batch(idx)
                yield (self.augment(x, self.generator) if self.augment.enabled else x), y
            return
        if self._train_loader is None:
            samples = AugmentedSamples(
                self.data.train.source, self.data.train_transform(self.augment), self.config.seed
            )
            sampler = EpochBatches(
                len(self.data.train), self.config.batch_size, self.config.seed, self.rank, self.world_size
            )
            self._train_loader = make_loader(
                samples, sampler, self.config.loader_workers, pin_memory=self.device.type == "cuda", persistent=True
            )
        self._train_loader.batch_sampler.set_epoch(epoch, self.step)
        yield from batches_of(self._train_loader)

    def _test_batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's share of the test set (every ``world_size``-th example), on the CPU."""
        test = self.data.test
        idx = torch.arange(self.rank, len(test), self.world_size)
        if test.in_memory:
            for start in range(0, len(idx), batch_size):
                yield test.batch(idx[start : start + batch_size])
            return
        # workers started for this pass and ended with it (the training loader's persist)
        yield from batches_of(
            make_loader(
                test, IndexBatches(idx, batch_size), self.config.loader_workers, pin_memory=self.device.type == "cuda"
            )
        )

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch on the device, in the configured memory format (4-D batches only)."""
        if x.dim() == 4:
            return x.to(self.device, memory_format=self.memory_format, non_blocking=True)
        return x.to(self.device, non_blocking=True)

    # -- one epoch ---------------------------------------------------------------------------
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
        """One step on a batch (already augmented): forward and loss in the run's precision,
        backward, every optimizer, the schedule and the weight clip."""
        x, y = self._to_device(x), y.to(self.device, non_blocking=True)
        with autocast(self.device, self.config.precision):
            loss = self._loss(x, y)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        else:
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
        task = None
        if progress is not None:
            task = progress.add_task(
                f"epoch {epoch}", total=self.steps_per_epoch, completed=self.step, loss=self._mean_loss()
            )
        batches = self._training_batches(epoch)
        for x, y in batches:
            loss = self.train_step(x, y)  # moved to the device in train_step
            self.loss_sum += loss * len(y)
            self.loss_count += len(y)
            self.step += 1
            self.global_step += 1
            if progress is not None:
                progress.update(task, advance=1, loss=self._mean_loss())
            self.on_step_end()
            if self._should_stop():
                break
        batches.close()  # a stop mid-epoch: no batch is drawn past this step (the loader's workers persist)
        if progress is not None:
            progress.remove_task(task)
        return self._mean_loss()

    def _mean_loss(self) -> float:
        if self.world_size > 1:
            t = torch.tensor([self.loss_sum, float(self.loss_count)], dtype=torch.float64)
            t = self._all_reduce(t)
            return float(t[0] / t[1]) if t[1] else math.nan
        return self.loss_sum / self.loss_count if self.loss_count else math.nan

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
        sums = torch.zeros(4, dtype=torch.float64)
        for x, y in self._test_batches():
            x, y = self._to_device(x), y.to(self.device)
            logits = model(x).float()
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
        """The run's header line (model, data, schedule and options in use)."""
        dropped = len(self.data.train) - min(len(self.data.train), self.steps_per_epoch * self.config.batch_size)
        return describe_run(
            self.config,
            self.data,
            self.augment.describe(),
            self.teacher is not None,
            self.world_size,
            str(self.device),
            dropped,
        )

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``config.epochs`` (from where a resumed run stopped). SIGINT/SIGTERM end the
        current step, save a checkpoint and raise :class:`Interrupted`."""
        c = self.config
        self.console.print(self.describe(), highlight=False)
        progress = progress_bar(self.console, enabled=self.is_main)
        self.table.print_header()
        for row in self.table.rows:
            self.table.print_row(row)
        # one trainer per run directory: the processes a distributed run starts share their
        # starter's lock (the onebit command holds it), a single process takes it here
        lock = checkpoint.lock_run_directory(c.out) if c.out and self.world_size == 1 else contextlib.nullcontext()
        try:
            with lock:
                return self._fit(progress)
        finally:
            self.close()

    def close(self) -> None:
        """End the training loader's worker processes (``fit`` does at its end; a later epoch starts new ones)."""
        close_loader(self._train_loader)

    @property
    def _writes(self) -> bool:
        """Whether this process writes the run directory (rank 0 of a run with ``out``)."""
        return bool(self.config.out) and self.is_main

    def _fit(self, progress: Progress) -> list[dict[str, Any]]:
        c = self.config
        if self._writes:
            self.save_config(c.out)
        board = TensorBoardLog(c.out) if c.tensorboard and self._writes else None
        previous = self._install_signal_handlers()
        try:
            with progress:
                while self.epoch < c.epochs:
                    self._run_epoch(progress, board)
        finally:
            self._restore_signal_handlers(previous)
            if board is not None:
                board.close()
        return self.history

    def _run_epoch(self, progress: Progress, board: TensorBoardLog | None) -> None:
        """The rest of the current epoch, its table row and the saved run; :class:`Interrupted`
        when a stop was requested (mid-epoch, or at its end before the last epoch)."""
        start = time.perf_counter() - self.elapsed
        if self.step == 0:
            self.flips.snapshot()
        if self.epoch == 0 and self.step == 0 and self._writes:
            checkpoint.record_weights(
                self.model, self.config.out, 0
            )  # the initial weights, for `onebit plot weights --animate`
        train_loss = self.train_epoch(self.epoch, progress)
        if self._stop_signal is not None and self.step < self.steps_per_epoch:
            self.elapsed = time.perf_counter() - start
            self._stop()
        self._end_epoch(train_loss, start, board)
        if self._stop_signal is not None and self.epoch < self.config.epochs:
            self._stop()

    def _end_epoch(self, train_loss: float, start: float, board: TensorBoardLog | None) -> None:
        """Evaluate, add the table row (and TensorBoard's), move to the next epoch and save."""
        row = {"epoch": self.epoch, "train_loss": train_loss, **self.evaluate_metrics()}
        row["flip_ratio"] = self.flips.ratio()
        row["time"] = clock(time.perf_counter() - start)
        self.table.add(row)
        if board is not None:
            board.epoch(row, self.model, self.optimizers)
        self.epoch, self.step = self.epoch + 1, 0
        self.loss_sum, self.loss_count, self.elapsed = 0.0, 0, 0.0
        if self._writes:
            self.save(self.config.out)
            checkpoint.record_weights(self.model, self.config.out, self.epoch)

    @property
    def history(self) -> list[dict[str, Any]]:
        return [dict(zip(self.table.columns, row)) for row in self.table.rows]

    def _stop(self) -> None:
        """Save the run where it stands and raise :class:`Interrupted`."""
        if self._writes:
            self.save(self.config.out)
        self.interrupted = Interrupted(self._stop_signal, self.epoch, self.step, self.config.out)
        raise self.interrupted

    def _install_signal_handlers(self):
        """SIGINT/SIGTERM request a stop at the end of the step (a second Ctrl-C stops at once);
        returns the previous handlers (None off the main thread, where signals cannot be caught)."""
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

    # -- files (the format is onebit.train.checkpoint's) ------------------------------------
    def save_config(self, directory: str) -> None:
        """Write the run's ``config.json``."""
        checkpoint.save_config(directory, self.config, self.data)

    def save(self, directory: str) -> None:
        """Write the run: ``model.safetensors``, ``checkpoint.safetensors``, ``config.json``,
        ``history.csv`` (each atomically)."""
        checkpoint.save_run(self, directory)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue the run exactly: tensors and a JSON-able dict."""
        return checkpoint.checkpoint_state(self)

    def load_checkpoint(self, directory: str) -> None:
        """Restore model, optimizers, scheduler, RNG states, position and history from ``directory``.

        A damaged checkpoint raises :class:`onebit.io.FileFormatError` naming the file."""
        checkpoint.load_checkpoint(self, directory)


def train(config: TrainConfig, console: Console | None = None) -> Trainer:
    """Build a :class:`Trainer` for ``config``, fit it and return it (raises :class:`Interrupted` on a signal)."""
    trainer = Trainer.from_config(config, console)
    trainer.fit()
    return trainer


def resume(directory: str, console: Console | None = None, **overrides) -> Trainer:
    """Continue the run saved in ``directory`` to its configured number of epochs and return the trainer."""
    trainer = Trainer.from_run(directory, console, **overrides)
    trainer.fit()
    return trainer
