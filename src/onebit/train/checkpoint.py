"""The run directory: its files, their format, its lock, and loading a run back.

A run directory (written by rank 0 only, every file atomically, no pickle) holds:

- ``config.json``: the :class:`~onebit.train.TrainConfig` and the data's shape (``num_classes``,
  ``in_channels``, ``image_size``, ``classes``) and normalization (``mean``, ``std``);
- ``model.safetensors``: the model's ``state_dict`` (what :func:`load_run` and ``onebit export`` read);
- ``checkpoint.safetensors``: the model, optimizer tensors (``optimizer.I.PARAM.KEY``), the
  epoch-start signs for ``flip_ratio`` (``flips.I``) and the torch RNG states (``rng.torch``,
  ``rng.generator``), with everything else (position, optimizer hyperparameters, scheduler
  state, numpy, Python and mixup RNG states, history rows) as JSON in the file's metadata
  (``onebit_checkpoint``): one file, so a checkpoint is never half written;
- ``history.csv``: the epoch table;
- ``weights/epoch_NNNN.safetensors``: every layer's weights after each epoch (``onebit plot``);
- ``.onebit-train.lock``: the lock a trainer holds while it writes the directory.

:func:`save_run`, :func:`checkpoint_state` and :func:`restore_checkpoint` read and write a
:class:`~onebit.train.Trainer`'s state: ``model``, ``optimizers``, ``scheduler``, ``flips``,
``generator``, ``mixup_rng``, ``table`` and its position (``epoch``, ``step``, ``global_step``,
``loss_sum``, ``loss_count``, ``elapsed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import shutil
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from onebit import io
from onebit.data import DataBundle
from onebit.train.build import create_model
from onebit.train.config import TrainConfig

if TYPE_CHECKING:
    from onebit.train.trainer import Trainer

__all__ = [
    "CHECKPOINT",
    "RUN_FILES",
    "LOCK_FILE",
    "RunDirectoryError",
    "holds_run",
    "prepare_run_directory",
    "clear_run",
    "lock_run_directory",
    "read_run_config",
    "load_run",
    "save_config",
    "save_run",
    "checkpoint_state",
    "load_checkpoint",
    "restore_checkpoint",
    "record_weights",
]

CHECKPOINT = "checkpoint.safetensors"
#: the files of a run; a directory holding any of the first three holds a run
RUN_FILES = ("config.json", "model.safetensors", CHECKPOINT, "history.csv")
#: the directories of a run: the weights after each epoch, TensorBoard's event files
RUN_DIRECTORIES = ("weights", "tensorboard")
#: the lock file a trainer holds (flock) while it writes a run directory
LOCK_FILE = ".onebit-train.lock"


# -- the directory ---------------------------------------------------------------------------
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
        io.ensure_directory(directory)
    except NotADirectoryError:
        raise RunDirectoryError(f"--out {directory}: a part of the path is a file, not a directory") from None
    except OSError as error:
        raise RunDirectoryError(f"--out {directory}: cannot create the directory ({error.strerror})") from None


def clear_run(directory: str) -> None:
    """Remove the run files of ``directory``: its files, the weights after each epoch
    (``weights/``), the TensorBoard events and stale temporaries; the caller holds its lock."""
    for name in RUN_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.unlink(path)
    for name in RUN_DIRECTORIES:
        path = os.path.join(directory, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
    io.remove_stale_temporaries(directory, every=True)


_LOCKS: dict[str, list] = {}  # real path -> [file descriptor, holding thread's ident, depth]
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def lock_run_directory(directory: str):
    """Hold ``directory``'s run lock (an exclusive ``flock`` on its lock file) while in the block.

    Another process, or another thread of this one, asking for it fails at once with
    :class:`RunDirectoryError` naming the holder. The thread holding it may take it again (the
    ``onebit train`` command holds it and its trainer takes it again); the processes of a
    distributed run, started by the holder, never take it. The kernel releases it when its
    holder dies (even by ``kill -9``). Stale temporary files of interrupted writes are removed
    once the lock is taken."""
    prepare_run_directory(directory)
    key = os.path.realpath(directory)
    me = threading.get_ident()
    with _LOCKS_GUARD:
        held = _LOCKS.get(key)
        if held is not None and held[1] != me:
            holder = next((f"thread {t.name!r}" for t in threading.enumerate() if t.ident == held[1]), "another thread")
            raise RunDirectoryError(
                f"{directory} is in use by another onebit trainer of this process (pid {os.getpid()}, {holder}); "
                "wait for it to end or choose another --out"
            )
        if held is not None:
            held[2] += 1
        else:
            _LOCKS[key] = held = [_take_lock(directory), me, 1]
            io.remove_stale_temporaries(directory, every=True)
    try:
        yield
    finally:
        with _LOCKS_GUARD:
            held[2] -= 1
            if held[2] == 0:
                del _LOCKS[key]
                fcntl.flock(held[0], fcntl.LOCK_UN)
                os.close(held[0])


def _take_lock(directory: str) -> int:
    """The lock file's descriptor, locked and holding this process's pid; or :class:`RunDirectoryError`."""
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
    return fd


# -- reading a run ---------------------------------------------------------------------------
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
    if not (
        isinstance(size, list)
        and 1 <= len(size) <= 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 16 for v in size)
    ):
        raise bad(f"entry 'image_size' is not a list of positive integers: {size!r}")
    return meta


def load_run(directory: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a saved run directory (eval mode) and return it with the run's metadata.

    A missing file raises ``FileNotFoundError``, a damaged one :class:`onebit.io.FileFormatError`,
    each naming the file."""
    weights_path = os.path.join(directory, "model.safetensors")
    meta = read_run_config(directory)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{weights_path} not found: {directory!r} is not a onebit run directory")
    cfg = meta["config"]
    model = create_model(cfg["model"], meta["num_classes"], meta["in_channels"], cfg.get("model_kwargs", {}))
    state = io.load_tensors(weights_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise io.FileFormatError(f"{weights_path}: does not hold the weights of this run's model ({first})") from None
    return model.eval(), meta


# -- writing a run ---------------------------------------------------------------------------
def save_config(directory: str, config: TrainConfig, data: DataBundle) -> None:
    """Write ``config.json``: the config and the data's shape and class names."""
    io.save_json(
        os.path.join(directory, "config.json"),
        {
            "config": dataclasses.asdict(config),
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "image_size": list(data.image_size),
            "classes": data.classes,
            "mean": data.mean,
            "std": data.std,
        },
    )


def save_run(trainer: Trainer, directory: str) -> None:
    """Write the run: ``model.safetensors``, ``checkpoint.safetensors``, ``config.json``,
    ``history.csv`` (each atomically)."""
    io.ensure_directory(directory)
    io.save_tensors(
        os.path.join(directory, "model.safetensors"), {k: v.cpu() for k, v in trainer.model.state_dict().items()}
    )
    tensors, meta = checkpoint_state(trainer)
    io.save_tensors(os.path.join(directory, CHECKPOINT), tensors, metadata={"onebit_checkpoint": json.dumps(meta)})
    save_config(directory, trainer.config, trainer.data)
    trainer.table.save(os.path.join(directory, "history.csv"))


def record_weights(model: nn.Module, directory: str, epoch: int) -> None:
    """Every layer's weights after ``epoch`` epochs, in ``directory/weights/``
    (see :func:`onebit.plot.record_weights`)."""
    from onebit.plot import record_weights as record  # matplotlib loads on first use

    record(model, directory, epoch)


def checkpoint_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to continue the run exactly: tensors and a JSON-able dict."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.cpu() for k, v in trainer.model.state_dict().items()}
    optimizers = [_optimizer_state(i, opt, tensors) for i, opt in enumerate(trainer.optimizers)]
    for i, s in enumerate(trainer.flips.signs):
        tensors[f"flips.{i}"] = s.to(torch.uint8).cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = trainer.generator.get_state()
    meta = {
        "epoch": trainer.epoch,
        "step": trainer.step,
        "global_step": trainer.global_step,
        "loss_sum": trainer.loss_sum,
        "loss_count": trainer.loss_count,
        "elapsed": trainer.elapsed,
        "optimizers": optimizers,
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "rng": _global_rng_state(trainer.mixup_rng),
        "history": {"columns": trainer.table.columns, "rows": trainer.table.rows},
        "world_size": trainer.world_size,
    }
    return tensors, meta


def _optimizer_state(i: int, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Optimizer ``i``'s state: its tensors put in ``tensors``, the rest returned as JSON."""
    sd = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{i}.{pid}.{key}"] = value.cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars, "params": sorted(map(str, sd["state"]))}


def _global_rng_state(mixup_rng: np.random.Generator) -> dict[str, Any]:
    """numpy's and Python's global generator states and the mixup generator's, as JSON."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "mixup": mixup_rng.bit_generator.state,
    }


# -- continuing a run ------------------------------------------------------------------------
def load_checkpoint(trainer: Trainer, directory: str) -> None:
    """Restore model, optimizers, scheduler, RNG states, position and history from ``directory``.

    A damaged checkpoint raises :class:`onebit.io.FileFormatError` naming the file."""
    path = os.path.join(directory, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory!r} has no checkpoint to resume from")
    try:
        meta = json.loads(io.tensors_metadata(path)["onebit_checkpoint"])
        tensors = io.load_tensors(path)
        restore_checkpoint(trainer, meta, tensors)
    except io.FileFormatError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        what = f"missing entry {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise io.FileFormatError(f"{path}: damaged or not this run's checkpoint ({what})") from None


def restore_checkpoint(trainer: Trainer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's ``tensors`` and ``meta`` (see :func:`checkpoint_state`) into ``trainer``."""
    trainer.model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, (opt, saved) in enumerate(zip(trainer.optimizers, meta["optimizers"])):
        _restore_optimizer(i, opt, saved, tensors)
    if trainer.scheduler is not None and meta["scheduler"] is not None:
        trainer.scheduler.load_state_dict(meta["scheduler"])
    if trainer.scaler is not None and meta.get("scaler") is not None:
        trainer.scaler.load_state_dict(meta["scaler"])
    trainer.flips.signs = [tensors[f"flips.{i}"].bool().to(trainer.device) for i in range(len(trainer.flips.params))]
    _restore_rng(trainer, meta, tensors)
    trainer.epoch, trainer.step, trainer.global_step = meta["epoch"], meta["step"], meta["global_step"]
    trainer.loss_sum, trainer.loss_count, trainer.elapsed = meta["loss_sum"], meta["loss_count"], meta["elapsed"]
    trainer.table.rows = [list(r) for r in meta["history"]["rows"]]


def _restore_optimizer(i: int, optimizer: torch.optim.Optimizer, saved: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optimizer.{i}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, scalars in saved["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _restore_rng(trainer: Trainer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Rank 0 continues its saved streams; other ranks start fresh but deterministic ones."""
    rng = meta["rng"]
    if trainer.rank == 0:
        torch.set_rng_state(tensors["rng.torch"])
        trainer.generator.set_state(tensors["rng.generator"])
        n = rng["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        p = rng["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
        trainer.mixup_rng.bit_generator.state = rng["mixup"]
    else:
        trainer.generator.manual_seed(trainer.config.seed * 7919 + trainer.rank + 104_729 * meta["global_step"])
        trainer.mixup_rng = np.random.default_rng([trainer.config.seed, trainer.rank, meta["global_step"]])
