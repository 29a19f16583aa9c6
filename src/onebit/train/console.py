"""What a training run prints: its one-paragraph description, the progress bar and the epoch table.

The :class:`EpochTable` prints fastai-style rows (epoch, train_loss, valid_loss, accuracy,
top_k_accuracy, flip_ratio, time) and writes the same rows as ``history.csv``; floats have six
decimals in both, times are ``mm:ss``. Only rank 0 of a multi-process run prints.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from onebit import io
from onebit.data import DataBundle
from onebit.train.config import TrainConfig

__all__ = ["EpochTable", "progress_bar", "describe_run", "format_value", "clock"]


class EpochTable:
    """Prints one aligned row per epoch (fastai style) and keeps them for ``history.csv``."""

    def __init__(self, columns: list[str], console: Console):
        self.columns = columns
        self.console = console
        self.rows: list[list[Any]] = []
        self.widths = [max(len(c), 5 if c == "epoch" else 10) for c in columns]

    def print_header(self) -> None:
        self.console.print(
            "  ".join(c.ljust(w) for c, w in zip(self.columns, self.widths)), style="bold", highlight=False
        )

    def print_row(self, values: list[Any]) -> None:
        self.console.print("  ".join(format_value(v).ljust(w) for v, w in zip(values, self.widths)), highlight=False)

    def add(self, row: dict[str, Any]) -> None:
        values = [row[c] for c in self.columns]
        self.rows.append(values)
        self.print_row(values)

    def save(self, path: str) -> None:
        io.save_csv(path, self.columns, ([format_value(v) for v in row] for row in self.rows))


def format_value(value: Any) -> str:
    """A table cell: floats with six decimals, anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def clock(seconds: float) -> str:
    """``seconds`` as ``mm:ss`` (rounded to the second)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes:02d}:{secs:02d}"


def progress_bar(console: Console, enabled: bool) -> Progress:
    """The transient per-epoch bar: ``epoch N  [bar]  step/steps  loss L  elapsed``."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )


def describe_run(
    config: TrainConfig,
    data: DataBundle,
    augment: str,
    distilled: bool,
    world_size: int,
    device: str = "cpu",
    dropped: int = 0,
) -> str:
    """The run's header: model, data and its shape, then schedule, batch, seed and the extras in use
    (``dropped``: examples the last, too small batch of each epoch leaves out)."""
    c, d = config, data
    shape = "x".join(map(str, (d.in_channels, *d.image_size)))
    extras = [f"augment {augment}"]
    if c.loader_workers:
        extras.append(f"{c.loader_workers} loader workers")
    if dropped:
        extras.append(f"last batch of {dropped} dropped each epoch (BatchNorm needs 2 examples)")
    if device != "cpu":
        extras.append(device)
    if c.precision != "fp32":
        extras.append(c.precision)
    if c.weights:
        extras.append(f"from weights {c.weights}")
    if c.mixup:
        extras.append(f"mixup {c.mixup}")
    if c.weight_clip is not None:
        extras.append(f"weight clip {c.weight_clip}")
    if distilled:
        extras.append(f"distilled from {c.teacher} (w={c.distill_weight}, T={c.distill_temperature})")
    if c.memory_format != "contiguous":
        extras.append(c.memory_format)
    if c.optimizer == "bop":
        extras.append(f"bop threshold={c.bop_threshold} gamma={c.bop_gamma}")
    if world_size > 1:
        extras.append(f"{world_size} processes")
    return (
        f"[bold]onebit train[/]: {c.model} on {d.name} ({len(d.train)} train / {len(d.test)} test, {shape}, "
        f"{d.num_classes} classes)\n{c.epochs} epochs, {c.optimizer} lr={c.lr} {c.schedule}, "
        f"batch {c.batch_size}, seed {c.seed}, {', '.join(extras)}"
    )
