"""The options of a training run: :class:`TrainConfig` and the checks of every option.

A run is defined by its config alone (it is saved as ``config.json`` in the run directory):
names (model, dataset, optimizer, schedule) that :mod:`onebit.train.build` resolves, and the
hyper-parameters the :class:`~onebit.train.Trainer` reads. ``validate()`` checks every option
(type, finite, in range) before anything starts and names the option in its error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from onebit import models
from onebit.data.augment import Augment
from onebit.train.precision import DEVICES, PRECISIONS

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES", "MEMORY_FORMATS"]

OPTIMIZERS = ("adam", "sgd", "bop")
SCHEDULES = ("one-cycle", "cosine", "linear", "constant")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

#: the options that may be None (off, or "as stored")
_OPTIONAL = ("out", "image_size", "weight_clip", "teacher", "weights", "mean", "std")


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
    #: loader worker processes decoding and augmenting samples (0: in the training process; in-memory
    #: data is then served a whole batch at a time)
    loader_workers: int = 0
    #: "auto" (a GPU when there is one), "cpu" or "cuda"
    device: str = "auto"
    #: "fp32", or mixed precision "bf16" / "fp16" (autocast in training; evaluation and export in fp32)
    precision: str = "fp32"
    #: start from these weights: a run directory, a weights file, a pushed folder or hf://org/name[@revision]
    weights: str | None = None
    #: normalize with this mean and std per channel (of images in [0, 1]) instead of the data's own
    mean: list | None = None
    std: list | None = None

    def validate(self) -> None:
        """Check every option (type, finite, in range) before anything starts: ``ValueError``
        (``TypeError`` for a wrong type) naming the option."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.default)
        self._check_names()
        self._check_counts()
        self._check_rates()
        self._check_data_and_distillation()
        self._check_outputs()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config of ``values`` (a saved ``config.json``'s ``config``); unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    # -- the checks, in the order validate() runs them ---------------------------------------
    def _check_names(self) -> None:
        if self.model not in models.names() and not models.is_file_model(self.model) and not self.model.startswith("<"):
            raise ValueError(
                f"unknown model {self.model!r}; known models: {', '.join(models.names())} "
                "(or a file's model as path/to/file.py:NAME)"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def _check_counts(self) -> None:
        _in_range("loader_workers", self.loader_workers, 0, 256)
        for name in ("epochs", "batch_size", "topk", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        _in_range("epochs", self.epochs, 1, 10**6)
        _in_range("batch_size", self.batch_size, 1, 2**31 - 1)
        _in_range("topk", self.topk, 1, 2**31 - 1)
        _in_range("workers", self.workers, 1, 1024)
        _in_range("seed", self.seed, 0, 2**32 - 1)

    def _check_rates(self) -> None:
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

    def _check_data_and_distillation(self) -> None:
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

    def _check_outputs(self) -> None:
        if self.tensorboard and not self.out:
            raise ValueError("--tensorboard writes under the run directory: give --out")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("--mean and --std go together: give both or neither")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and (
                not values
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            ):
                raise ValueError(f"{_option(name)} must be finite numbers, one per channel, got {values!r}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise ValueError(f"--std must be positive, got {self.std!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"unknown memory format {self.memory_format!r}; choose one of {', '.join(MEMORY_FORMATS)}")
        if not isinstance(self.model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {self.model_kwargs!r}")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_type(name: str, value: Any, default: Any) -> None:
    """``value`` has the kind of the field's default (an int for an int, a number for a float, ...)."""
    if value is None and name in _OPTIONAL:
        return
    if isinstance(default, bool) or default is dataclasses.MISSING:
        return
    if isinstance(default, int) or name == "image_size":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float) or name == "weight_clip":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str) or name in ("out", "teacher", "weights"):
        ok = isinstance(value, str)
    elif name in ("mean", "std"):
        ok = isinstance(value, list)
    else:
        ok = name != "model_kwargs" or isinstance(value, dict)
    if not ok:
        raise TypeError(
            f"{_option(name)} must be {type(default).__name__ if default is not None else 'a value'}, got {value!r}"
        )


def _in_range(name: str, value: float, lo: float, hi: float, low_open: bool = False) -> None:
    """``value`` is a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``low_open``)."""
    finite = isinstance(value, int) or math.isfinite(value)
    inside = finite and (value > lo if low_open else value >= lo) and value <= hi
    if not inside:
        low = "(" if low_open else "["
        high = "inf)" if hi == math.inf else f"{hi}]"
        raise ValueError(f"{_option(name)} must be a finite number in {low}{lo}, {high}, got {value}")
