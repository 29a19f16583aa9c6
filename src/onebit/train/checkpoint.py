"""The run directory: its files, their format, its lock, and loading a run back.

A run directory (written by rank 0 only, every file atomically, no pickle) holds:

- ``config.json``: the :class:`~onebit.train.TrainConfig` and the data's shape (``num_classes``,
  ``in_channels``, ``image_size``, ``classes``) and normalization (``mean``, ``std``);
- ``model.safetensors``: the model's ``state_dict`` (what :func:`load_run` and ``onebit export`` read);
- ``checkpoint.safetensors``: the model, optimizer tensors (``optimizer.I.PARAM.KEY``), the
  epoch-start signs for ``flip_ratio`` (``flips.I``) and the torch RNG states (``rng.torch``,
  ``rng.generator``), with everything else (position, optimizer hyperparameters, scheduler and
  fp16 loss scaler states, numpy, Python and mixup RNG states, history rows) as JSON in the file's metadata
  (``onebit_checkpoint``): one file, so a checkpoint is never half written;
- ``history.csv``: the epoch table;
- ``weights/epoch_NNNN.safetensors``: every layer's weights after each epoch (``onebit plot``);
- ``.onebit-train.lock``: the lock a trainer holds while it writes the directory.

A checkpoint is a :meth:`Trainer.state_dict() <onebit.train.Trainer.state_dict>`:
:func:`encode_checkpoint` / :func:`decode_checkpoint` turn one into the file's tensors and JSON and
back, :func:`write_run` writes a run's files from one and :func:`read_checkpoint` reads one back.
This module handles files only; what a state holds, and how it is restored, is the trainer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from onebit import io
from onebit.data import DataBundle
from onebit.models.config_file import CONFIG_FILE, read_config
from onebit.train.build import create_model
from onebit.train.config import TrainConfig
from onebit.train.console import format_value

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
    "save_history",
    "write_run",
    "encode_checkpoint",
    "decode_checkpoint",
    "read_checkpoint",
    "checkpoint_path",
    "naming_damage",
    "record_weights",
    "Resumable",
    "save_run",
    "checkpoint_state",
    "load_checkpoint",
    "restore_checkpoint",
]

CHECKPOINT = "checkpoint.safetensors"
#: the files of a run; a directory holding any of the first three holds a run
RUN_FILES = (CONFIG_FILE, "model.safetensors", CHECKPOINT, "history.csv")
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
    """The checked ``config.json`` of a run directory (:func:`onebit.models.config_file.check_config`):
    ``FileNotFoundError`` when missing, :class:`onebit.io.FileFormatError` naming the file and the
    entry when damaged."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory!r} is not a onebit run directory")
    return read_config(path)


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


def save_history(path: str, history: dict[str, Any]) -> None:
    """Write ``history.csv``: the epoch table's ``columns`` and ``rows``, as the table prints them."""
    io.save_csv(path, history["columns"], ([format_value(v) for v in row] for row in history["rows"]))


def write_run(directory: str, state: dict[str, Any], config: TrainConfig, data: DataBundle) -> None:
    """Write the run of a trainer's ``state`` (see :meth:`onebit.train.Trainer.state_dict`):
    ``model.safetensors``, ``checkpoint.safetensors``, ``config.json``, ``history.csv`` (each atomically)."""
    io.ensure_directory(directory)
    io.save_tensors(os.path.join(directory, "model.safetensors"), {k: v.cpu() for k, v in state["model"].items()})
    tensors, meta = encode_checkpoint(state)
    io.save_tensors(os.path.join(directory, CHECKPOINT), tensors, metadata={"onebit_checkpoint": json.dumps(meta)})
    save_config(directory, config, data)
    save_history(os.path.join(directory, "history.csv"), state["history"])


def record_weights(model: nn.Module, directory: str, epoch: int) -> None:
    """Every layer's weights after ``epoch`` epochs, in ``directory/weights/``
    (see :func:`onebit.plot.record_weights`)."""
    from onebit.plot import record_weights as record  # matplotlib loads on first use

    record(model, directory, epoch)


# -- the checkpoint file ---------------------------------------------------------------------
#: a state's entries kept in the file's JSON as they are, in the order written
_POSITION = ("epoch", "step", "global_step", "loss_sum", "loss_count", "elapsed")


def encode_checkpoint(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A trainer's ``state`` as the checkpoint file holds it: CPU tensors by name and a JSON-able dict."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.cpu() for k, v in state["model"].items()}
    optimizers = [_encode_optimizer(i, sd, tensors) for i, sd in enumerate(state["optimizers"])]
    for i, signs in enumerate(state["flips"]):
        tensors[f"flips.{i}"] = signs.to(torch.uint8).cpu()
    rng = state["rng"]
    tensors["rng.torch"] = rng["torch"]
    tensors["rng.generator"] = rng["generator"]
    n, p = rng["numpy"], rng["python"]
    meta = {key: state[key] for key in _POSITION}
    meta.update(
        optimizers=optimizers,
        scheduler=state["scheduler"],
        scaler=state["scaler"],
        rng={
            "numpy": [n[0], n[1].tolist(), int(n[2]), int(n[3]), float(n[4])],
            "python": [p[0], list(p[1]), p[2]],
            "mixup": rng["mixup"],
        },
        history=state["history"],
        world_size=state["world_size"],
    )
    return tensors, meta


def _encode_optimizer(i: int, sd: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Optimizer ``i``'s ``state_dict`` ``sd``: its tensors put in ``tensors``, the rest returned as JSON."""
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{i}.{pid}.{key}"] = value.cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars, "params": sorted(map(str, sd["state"]))}


def decode_checkpoint(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The trainer's state a checkpoint's ``tensors`` and ``meta`` hold (the inverse of
    :func:`encode_checkpoint`); checkpoints written before the loss scaler was saved have none."""
    rng, flips = meta["rng"], sum(1 for key in tensors if key.startswith("flips."))
    n, p = rng["numpy"], rng["python"]
    return {
        "model": {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
        "optimizers": [_decode_optimizer(i, saved, tensors) for i, saved in enumerate(meta["optimizers"])],
        "scheduler": meta["scheduler"],
        "scaler": meta.get("scaler"),
        "flips": [tensors[f"flips.{i}"].bool() for i in range(flips)],
        "rng": {
            "torch": tensors["rng.torch"],
            "generator": tensors["rng.generator"],
            "numpy": (n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]),
            "python": (p[0], tuple(p[1]), p[2]),
            "mixup": rng["mixup"],
        },
        **{key: meta[key] for key in _POSITION},
        "history": meta["history"],
        "world_size": meta.get("world_size", 1),
    }


def _decode_optimizer(i: int, saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Optimizer ``i``'s ``state_dict`` from its tensors and its JSON entry ``saved``."""
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optimizer.{i}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, scalars in saved["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    return {"state": state, "param_groups": saved["param_groups"]}


@contextlib.contextmanager
def naming_damage(path: str) -> Iterator[None]:
    """Errors of reading or restoring the checkpoint ``path`` inside the block raised again as one
    :class:`onebit.io.FileFormatError` naming the file."""
    try:
        yield
    except io.FileFormatError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        what = f"missing entry {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise io.FileFormatError(f"{path}: damaged or not this run's checkpoint ({what})") from None


def checkpoint_path(directory: str) -> str:
    """The checkpoint file of the run in ``directory``; ``FileNotFoundError`` when it has none."""
    path = os.path.join(directory, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory!r} has no checkpoint to resume from")
    return path


def read_checkpoint(directory: str) -> dict[str, Any]:
    """The trainer's state saved in ``directory`` (see :func:`decode_checkpoint`); a damaged
    checkpoint raises :class:`onebit.io.FileFormatError` naming the file."""
    path = checkpoint_path(directory)
    with naming_damage(path):
        meta = json.loads(io.tensors_metadata(path)["onebit_checkpoint"])
        return decode_checkpoint(io.load_tensors(path), meta)


# -- the names of earlier versions, for any object with state_dict / load_state_dict ---------
class Resumable(Protocol):
    """What resumes from a checkpoint: a :class:`~onebit.train.Trainer`."""

    config: TrainConfig
    data: DataBundle

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def save_run(trainer: Resumable, directory: str) -> None:
    """:func:`write_run` of ``trainer.state_dict()``."""
    write_run(directory, trainer.state_dict(), trainer.config, trainer.data)


def checkpoint_state(trainer: Resumable) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`encode_checkpoint` of ``trainer.state_dict()``."""
    return encode_checkpoint(trainer.state_dict())


def load_checkpoint(trainer: Resumable, directory: str) -> None:
    """``trainer.load_state_dict`` of :func:`read_checkpoint` ``(directory)``; a checkpoint that
    does not fit raises :class:`onebit.io.FileFormatError` naming the file."""
    state = read_checkpoint(directory)
    with naming_damage(checkpoint_path(directory)):
        trainer.load_state_dict(state)


def restore_checkpoint(trainer: Resumable, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """``trainer.load_state_dict`` of :func:`decode_checkpoint` ``(tensors, meta)``."""
    trainer.load_state_dict(decode_checkpoint(tensors, meta))
