"""The training loop: :class:`Trainer` runs epochs of steps on a built model and data.

``fit()`` runs epochs of ``train_epoch()`` and ``evaluate_metrics()``, prints a row of the
epoch table after each (:mod:`onebit.train.epoch_log`) and saves the run directory
(:mod:`onebit.train.checkpoint`) when the config has an ``out``. A step draws its batch from
:mod:`onebit.train.batches`, computes :mod:`onebit.train.loss` and applies :mod:`onebit.train.update`.

``state_dict()`` is everything a run continues from (model, optimizers, schedule, loss scaler,
random streams, position, history); ``load_state_dict()`` restores it, and the checkpoint file
holds it.

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
import signal
import time
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from onebit.data import DataBundle
from onebit.data.augment import Augment
from onebit.data.loader import epoch_permutation
from onebit.optim import FlipCounter, binary_parameters
from onebit.train import checkpoint
from onebit.train.batches import BatchSource, to_device, training_steps
from onebit.train.build import build, make_optimizers, make_scheduler
from onebit.train.collective import agreed_stop_signal, mean_over_ranks, rank_and_world_size
from onebit.train.config import MEMORY_FORMATS, TrainConfig
from onebit.train.console import clock, describe_run
from onebit.train.epoch_log import EpochLog
from onebit.train.evaluation import evaluate_model
from onebit.train.loss import distillation_loss, training_loss
from onebit.train.precision import autocast, make_scaler, place_model, resolve_device
from onebit.train.state import POSITION, continue_streams, rank_streams, snapshot, streams_state
from onebit.train.stopping import Interrupted, stop_signals
from onebit.train.teacher import load_teacher
from onebit.train.update import apply_update

__all__ = ["Trainer", "Interrupted", "train", "resume", "distillation_loss", "epoch_permutation"]


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
        self.rank, self.world_size = rank_and_world_size()
        self.is_main = self.rank == 0
        self.console = (console or Console()) if self.is_main else Console(quiet=True)
        # what the config names and was not given, built once the generators are seeded from config.seed
        model, data = build(config, model=model, data=data)
        self.data, self.model = data, model
        # one GPU per process where GPUs exist (torchrun's LOCAL_RANK), else the CPU
        self.device = resolve_device(config.device)
        self.memory_format = MEMORY_FORMATS[config.memory_format]
        self.net: nn.Module = place_model(model, self.device, self.memory_format, self.world_size)
        self.teacher = load_teacher(config.teacher, data, self.device, self.memory_format) if config.teacher else None
        self.binary_params = binary_parameters(self.model)
        self.optimizers = make_optimizers(config, self.model, self.binary_params)
        self.optimizer = self.optimizers[0]  # the float optimizer (Adam or SGD)
        self.steps_per_epoch = training_steps(len(data.train), config.batch_size, self.world_size)
        self.scheduler = make_scheduler(config, self.optimizer, config.epochs * self.steps_per_epoch)
        self.scaler = make_scaler(self.device, config.precision)
        self.augment = Augment.parse(data.augment if config.augment == "auto" else config.augment, data.image_size)
        self.batches = BatchSource(data, self.augment, config, self.rank, self.world_size, self.device.type == "cuda")
        self.batched = self.batches.batched  # whole in-memory batches gathered and augmented at once
        self.generator, self.mixup_rng = rank_streams(config.seed, self.rank)
        self.flips = FlipCounter(self.binary_params)
        self.k = min(config.topk, self.data.num_classes)
        self.log = EpochLog(list(self.base_columns), self.console, show_progress=self.is_main)
        self.table = self.log.table
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

    # -- one epoch ---------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The step's loss (:func:`onebit.train.loss.training_loss`) with the run's mixup and teacher."""
        return training_loss(self.net, x, y, self.config, self.mixup_rng, self.generator, self.teacher)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One step on a batch (already augmented): forward and loss in the run's precision,
        backward, every optimizer, the schedule and the weight clip."""
        x, y = to_device(x, self.device, self.memory_format), y.to(self.device, non_blocking=True)
        with autocast(self.device, self.config.precision):
            loss = self._loss(x, y)
        apply_update(loss, self.optimizers, self.scheduler, self.scaler, self.binary_params, self.config.weight_clip)
        return float(loss.item())

    def train_epoch(self, epoch: int, progress: Progress | None = None) -> float:
        """Run the rest of ``epoch`` from ``self.step``; returns the mean training loss."""
        self.net.train()
        task = None
        if progress is not None:
            task = progress.add_task(
                f"epoch {epoch}", total=self.steps_per_epoch, completed=self.step, loss=self._mean_loss()
            )
        batches = self.batches.training(epoch, self.step, self.generator)
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
        return mean_over_ranks(self.loss_sum, self.loss_count, self.device, self.world_size)

    def on_step_end(self) -> None:
        """Hook called after every training step (override in subclasses, e.g. to stop at a given step)."""

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask ``fit()`` to stop after the current step, save a checkpoint and raise :class:`Interrupted`."""
        self._stop_signal = signum

    def _on_signal(self, signum: int) -> None:
        """SIGINT/SIGTERM request a stop at the end of the step; a second Ctrl-C stops at once."""
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        agreed = agreed_stop_signal(self._stop_signal, self.device, self.world_size)  # every rank stops together
        if self._stop_signal is None:
            self._stop_signal = agreed
        return self._stop_signal is not None

    # -- evaluation ------------------------------------------------------------------------
    def evaluate_metrics(self, model: nn.Module | None = None) -> dict[str, float]:
        """Test-set ``valid_loss``, ``accuracy`` and ``top_k_accuracy`` (sharded across ranks)."""
        model = model or self.model
        return evaluate_model(model, self.batches.test(), self.k, self.device, self.memory_format, self.world_size)

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
        progress = self.log.start(self.describe())
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
        self.batches.close()

    @property
    def _writes(self) -> bool:
        """Whether this process writes the run directory (rank 0 of a run with ``out``)."""
        return bool(self.config.out) and self.is_main

    def _fit(self, progress: Progress) -> list[dict[str, Any]]:
        c = self.config
        if self._writes:
            self.save_config(c.out)
        with self.log.tensorboard(c.out if c.tensorboard and self._writes else None):
            with stop_signals(self._on_signal), progress:
                while self.epoch < c.epochs:
                    self._run_epoch(progress)
        return self.history

    def _run_epoch(self, progress: Progress) -> None:
        """The rest of the current epoch, its table row and the saved run; :class:`Interrupted`
        when a stop was requested (mid-epoch, or at its end before the last epoch)."""
        start = time.perf_counter() - self.elapsed
        if self.step == 0:
            self.flips.snapshot()
        if self.epoch == 0 and self.step == 0 and self._writes:
            # the initial weights, for `onebit plot weights --animate`
            checkpoint.record_weights(self.model, self.config.out, 0)
        train_loss = self.train_epoch(self.epoch, progress)
        if self._stop_signal is not None and self.step < self.steps_per_epoch:
            self.elapsed = time.perf_counter() - start
            self._stop()
        self._end_epoch(train_loss, start)
        if self._stop_signal is not None and self.epoch < self.config.epochs:
            self._stop()

    def _end_epoch(self, train_loss: float, start: float) -> None:
        """Evaluate, add the table row (and TensorBoard's), move to the next epoch and save."""
        row = {"epoch": self.epoch, "train_loss": train_loss, **self.evaluate_metrics()}
        row["flip_ratio"] = self.flips.ratio()
        row["time"] = clock(time.perf_counter() - start)
        self.log.add(row, self.model, self.optimizers)
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

    # -- the state to resume from ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly, as CPU copies that later steps leave unchanged:
        ``model``, ``optimizers`` (a list), ``scheduler``, ``scaler`` (their ``state_dict``, or ``None``),
        ``flips`` (the epoch-start signs of the binary weights), ``rng`` (the global ``torch``, ``numpy``
        and ``python`` streams, the augmentation ``generator``'s and ``mixup``'s), the position (``epoch``,
        ``step``, ``global_step``, and the epoch's ``loss_sum``, ``loss_count`` and ``elapsed`` seconds),
        ``history`` (the epoch table's ``columns`` and ``rows``) and ``world_size``."""
        return snapshot(
            {
                "model": self.model.state_dict(),
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "flips": self.flips.signs,
                "rng": streams_state(self.generator, self.mixup_rng),
                **{key: getattr(self, key) for key in POSITION},
                "history": {"columns": self.table.columns, "rows": self.table.rows},
                "world_size": self.world_size,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict`'s, or a checkpoint's), copied in: the next steps are
        those the trainer that gave it would take. Rank 0 continues the saved random streams; the other
        ranks of a distributed run start streams of their own from the seed, their rank and ``global_step``."""
        state = snapshot(state)  # never shares a tensor with the caller's state (optimizers keep theirs)
        if len(state["flips"]) != len(self.flips.params):
            raise ValueError(
                f"the state holds the signs of {len(state['flips'])} binary weight tensors, "
                f"the model has {len(self.flips.params)}"
            )
        self.model.load_state_dict(state["model"])
        for opt, saved in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.flips.signs = [signs.bool().to(self.device) for signs in state["flips"]]
        if self.rank == 0:
            continue_streams(state["rng"], self.generator, self.mixup_rng)
        else:  # only rank 0's streams are saved: the others start their own from where the run stands
            self.generator, self.mixup_rng = rank_streams(self.config.seed, self.rank, state["global_step"])
        for key in POSITION:
            setattr(self, key, state[key])
        self.table.rows = [list(row) for row in state["history"]["rows"]]

    # -- files (the format is onebit.train.checkpoint's) ------------------------------------
    def save_config(self, directory: str) -> None:
        """Write the run's ``config.json``."""
        checkpoint.save_config(directory, self.config, self.data)

    def save(self, directory: str) -> None:
        """Write the run: ``model.safetensors``, ``checkpoint.safetensors``, ``config.json``,
        ``history.csv`` (each atomically), from :meth:`state_dict`."""
        checkpoint.write_run(directory, self.state_dict(), self.config, self.data)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The checkpoint file's tensors and JSON-able dict of :meth:`state_dict`."""
        return checkpoint.encode_checkpoint(self.state_dict())

    def load_checkpoint(self, directory: str) -> None:
        """Restore model, optimizers, scheduler, RNG states, position and history from ``directory``.

        A damaged checkpoint, or one of another model, raises :class:`onebit.io.FileFormatError` naming the file."""
        state = checkpoint.read_checkpoint(directory)
        with checkpoint.naming_damage(checkpoint.checkpoint_path(directory)):
            self.load_state_dict(state)


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
