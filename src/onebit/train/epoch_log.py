"""What a run shows and keeps of its epochs: its header and one row per epoch on the console (the
rows are ``history.csv``'s), a progress bar over each epoch's steps, and TensorBoard's event files."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from onebit.train.console import EpochTable, progress_bar
from onebit.train.tensorboard import TensorBoardLog

__all__ = ["EpochLog"]


class EpochLog:
    """The epoch table of ``columns`` printed on ``console``, with a progress bar when ``show_progress``
    (only the process that prints shows one) and TensorBoard's log while :meth:`tensorboard` is open."""

    def __init__(self, columns: list[str], console: Console, show_progress: bool):
        self.table = EpochTable(columns, console)
        self.console, self.show_progress = console, show_progress
        self.board: TensorBoardLog | None = None

    def start(self, header: str) -> Progress:
        """Print ``header`` and the table so far (a resumed run's rows); returns a new progress bar."""
        self.console.print(header, highlight=False)
        progress = progress_bar(self.console, enabled=self.show_progress)
        self.table.print_header()
        for row in self.table.rows:
            self.table.print_row(row)
        return progress

    @contextlib.contextmanager
    def tensorboard(self, directory: str | None) -> Iterator[None]:
        """Within the block, each added row also goes to TensorBoard's files in ``directory`` (``None``: not)."""
        self.board = TensorBoardLog(directory) if directory else None
        try:
            yield
        finally:
            if self.board is not None:
                self.board.close()
            self.board = None

    def add(self, row: dict[str, Any], model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        """Print and keep an epoch's ``row``; TensorBoard also gets ``model``'s weights and the learning rates."""
        self.table.add(row)
        if self.board is not None:
            self.board.epoch(row, model, optimizers)
