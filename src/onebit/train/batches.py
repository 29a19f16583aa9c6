"""Where a trainer's batches come from: an epoch's training batches from a given step on, this
process's share of the test set, and a batch's move to the device.

In-memory data without loader workers (and without a resized crop, whose output size differs per
image) is gathered and augmented a whole batch at once (``batched``). Anything else goes through
torch's ``DataLoader`` sample by sample, each sample's augmentation seeded by ``(seed, epoch, index)``
(:mod:`onebit.data.loader`); the training loader's workers persist across epochs until :meth:`close`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
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
from onebit.train.config import TrainConfig

__all__ = ["BatchSource", "training_steps", "to_device"]

Batch = tuple[torch.Tensor, torch.Tensor]


def training_steps(n: int, batch_size: int, world_size: int = 1) -> int:
    """The steps of an epoch of ``n`` examples (:func:`onebit.data.loader.steps_per_epoch`);
    ``ValueError`` when they make none."""
    steps = steps_per_epoch(n, batch_size, world_size)
    if steps == 0:
        raise ValueError(
            f"{n} training example(s) make no batch of at least 2 per process "
            "(BatchNorm in training needs 2): use more data or fewer processes"
        )
    return steps


def to_device(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """A batch on ``device``; a 4-D image batch also in ``memory_format``."""
    if x.dim() == 4:
        return x.to(device, memory_format=memory_format, non_blocking=True)
    return x.to(device, non_blocking=True)


class BatchSource:
    """The batches, on the CPU, of process ``rank`` of ``world_size`` training on ``data`` with
    ``config``'s batch size, seed and loader workers and the ``augment`` of its training images."""

    def __init__(
        self, data: DataBundle, augment: Augment, config: TrainConfig, rank: int, world_size: int, pin_memory: bool
    ):
        self.data, self.augment = data, augment
        self.batch_size, self.seed, self.workers = config.batch_size, config.seed, config.loader_workers
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.steps_per_epoch = steps_per_epoch(len(data.train), config.batch_size, world_size)
        self.batched = data.train.in_memory and config.loader_workers == 0 and not augment.resized_crop
        self._train_loader: DataLoader | None = None

    def training(self, epoch: int, start: int, generator: torch.Generator) -> Iterator[Batch]:
        """The (augmented) training batches of ``epoch`` from step ``start`` on; a whole batch's
        augmentation draws from ``generator`` (per-sample seeds on the loader path)."""
        if self.batched:
            perm = epoch_permutation(len(self.data.train), self.seed, epoch)
            for step in range(start, self.steps_per_epoch):
                idx = batch_indices(perm, step, self.batch_size, self.rank, self.world_size)
                x, y = self.data.train.batch(idx)
                yield (self.augment(x, generator) if self.augment.enabled else x), y
            return
        if self._train_loader is None:
            samples = AugmentedSamples(self.data.train.source, self.data.train_transform(self.augment), self.seed)
            sampler = EpochBatches(len(self.data.train), self.batch_size, self.seed, self.rank, self.world_size)
            self._train_loader = make_loader(
                samples, sampler, self.workers, pin_memory=self.pin_memory, persistent=True
            )
        self._train_loader.batch_sampler.set_epoch(epoch, start)
        yield from batches_of(self._train_loader)

    def test(self, batch_size: int = 256) -> Iterator[Batch]:
        """This process's share of the test set: every ``world_size``-th example from ``rank``."""
        test = self.data.test
        idx = torch.arange(self.rank, len(test), self.world_size)
        if test.in_memory:
            for begin in range(0, len(idx), batch_size):
                yield test.batch(idx[begin : begin + batch_size])
            return
        # workers started for this pass and ended with it (the training loader's persist)
        loader = make_loader(test, IndexBatches(idx, batch_size), self.workers, pin_memory=self.pin_memory)
        yield from batches_of(loader)

    def close(self) -> None:
        """End the training loader's worker processes (a later epoch starts new ones)."""
        close_loader(self._train_loader)
