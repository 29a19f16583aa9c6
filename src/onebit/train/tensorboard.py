"""TensorBoard logging of a training run: scalars per epoch and weight histograms.

``onebit train --tensorboard`` (``TrainConfig.tensorboard``) writes TensorBoard event files
under ``RUN/tensorboard/`` through ``torch.utils.tensorboard``; view them with
``tensorboard --logdir RUN/tensorboard``. Per epoch (the step is the epoch number):

- ``loss/train``, ``loss/valid``, ``accuracy/top1``, ``accuracy/top_k``, ``flip_ratio``,
  ``learning_rate`` (every optimizer's first group, e.g. ``learning_rate/adam``);
- a histogram of every parameter's latent values (``weights/<name>``) and, for layers with
  a weight quantizer, of the weights they compute with (``quantized/<name>``).

The ``tensorboard`` package is an optional dependency (``pip install 'onebit[tensorboard]'``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["TensorBoardLog", "SUBDIR"]

SUBDIR = "tensorboard"

_SCALARS = {
    "train_loss": "loss/train",
    "valid_loss": "loss/valid",
    "accuracy": "accuracy/top1",
    "top_k_accuracy": "accuracy/top_k",
    "flip_ratio": "flip_ratio",
}


class TensorBoardLog:
    """Writes one run's event files under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "--tensorboard needs the 'tensorboard' package: pip install 'onebit[tensorboard]'"
            ) from error
        self.directory = os.path.join(os.fspath(run_dir), SUBDIR)
        self.writer = SummaryWriter(log_dir=self.directory)

    def epoch(self, row: dict[str, Any], model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Log one epoch's table row, learning rates and weight histograms (step = the row's epoch)."""
        step = int(row["epoch"])
        for key, tag in _SCALARS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and value == value:  # numbers, not NaN
                self.writer.add_scalar(tag, float(value), step)
        for optimizer in optimizers:
            lr = optimizer.param_groups[0].get("lr")
            if lr is not None:
                self.writer.add_scalar(f"learning_rate/{type(optimizer).__name__.lower()}", float(lr), step)
        with torch.no_grad():
            for name, p in model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
            for name, module in model.named_modules():
                quantized = getattr(module, "quantized_weight", None)
                if callable(quantized) and getattr(module, "weight_quantizer", None) is not None:
                    self.writer.add_histogram(f"quantized/{name}", quantized().detach().float().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
