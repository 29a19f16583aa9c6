"""Serving a split to the trainer: the epoch's order, each sample's randomness, torch's DataLoader.

- The order of the ``n`` training examples in epoch ``e`` is a permutation drawn from
  ``(seed, e)`` alone (:func:`epoch_permutation`); step ``s`` takes the ``s``-th run of
  ``batch_size`` examples of it (:func:`batch_indices`, split between the processes of a
  distributed run).
- A sample's augmentation draws from a generator seeded with ``(seed, e, index)``
  (:func:`sample_seed`), so it does not depend on which loader worker decodes it, on how many
  workers there are, or on where a resumed run started.
- :class:`EpochBatches` hands the ``DataLoader`` the keys ``(index, epoch)`` of each batch from
  a given step on; :class:`AugmentedSamples` turns a key into ``(x, y)``. Workers keep no state
  of their own, so a run stopped mid-epoch and resumed sees exactly the batches it would have.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from onebit.data.datasets import ImageSource

__all__ = [
    "epoch_permutation",
    "batch_indices",
    "steps_per_epoch",
    "sample_seed",
    "AugmentedSamples",
    "EpochBatches",
    "IndexBatches",
    "make_loader",
    "batches_of",
    "close_loader",
]

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers that spreads every input bit."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK
    return z ^ (z >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` of a run seeded ``seed`` (63 bits)."""
    z = _mix((seed & _MASK) ^ 0x9E3779B97F4A7C15)
    z = _mix(z ^ (epoch & _MASK))
    return _mix(z ^ (index & _MASK)) >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training examples in ``epoch``: a function of ``seed`` and ``epoch`` only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Steps of an epoch of ``n`` examples: every full batch, and the last partial one unless it
    would leave a process fewer than 2 examples (BatchNorm in training needs 2); that one is dropped."""
    full, rest = divmod(n, batch_size)
    return full + (1 if -(-rest // world_size) >= 2 else 0)


def batch_indices(perm: torch.Tensor, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This process's examples of ``step``: the step's run of ``perm``; in a distributed run, the
    global batch padded from the epoch's start to a multiple of ``world_size``, then every
    ``world_size``-th example from ``rank``."""
    idx = perm[step * batch_size : (step + 1) * batch_size]
    if world_size > 1:
        short = (-len(idx)) % world_size
        if short:  # pad the last global batch so that every rank gets as many examples
            idx = torch.cat([idx, perm[:short]])
        idx = idx[rank::world_size]
    return idx


class EpochBatches(Sampler[list]):
    """A batch sampler: the keys ``(index, epoch)`` of each of an epoch's batches, from ``start`` on.
    Call :meth:`set_epoch` before iterating (a persistent loader iterates it once per epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps = steps_per_epoch(n, batch_size, world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        for step in range(self.start, self.steps):
            idx = batch_indices(perm, step, self.batch_size, self.rank, self.world_size)
            yield [(int(i), self.epoch) for i in idx]

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)


class IndexBatches(Sampler[list]):
    """A batch sampler over a fixed list of indices, in order (evaluation)."""

    def __init__(self, indices: torch.Tensor, batch_size: int):
        self.indices, self.batch_size = indices, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


class AugmentedSamples(Dataset):
    """``dataset[(index, epoch)] = (transform(image, generator), label)`` for ``source[index]``, the
    generator seeded with :func:`sample_seed` ``(seed, epoch, index)``."""

    def __init__(self, source: ImageSource, transform: Callable, seed: int):
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        image, label = self.source[index]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return self.transform(image, generator), label


def _leave_stops_to_the_trainer(worker_id: int) -> None:
    """A loader worker ignores SIGINT and SIGTERM: Ctrl-C and a scheduler's SIGTERM reach the whole
    process group, and the training process, which finishes its step and saves, ends its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(
    dataset: Dataset, batch_sampler: Sampler, workers: int, *, pin_memory: bool = False, persistent: bool = False
) -> DataLoader:
    """torch's ``DataLoader`` over ``dataset`` with ``workers`` processes (0: in this process),
    pinned batches for a GPU. ``persistent`` workers live across iterations until
    :func:`close_loader`; others end with their iteration."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        # the workers' base seed from a generator of its own: torch's global stream (dropout, mixup)
        # is not drawn from, so a resumed run continues it exactly (samples draw from sample_seed)
        generator=torch.Generator().manual_seed(0),
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_leave_stops_to_the_trainer if workers > 0 else None,
    )


def batches_of(loader: DataLoader) -> Iterator:
    """Iterate ``loader``; an error raised in a worker (e.g. an image file that cannot be read)
    is raised again as its own last line, naming the file, not as the worker's whole traceback."""
    try:
        yield from loader
    except Exception as error:  # noqa: BLE001  (re-raised as the same type, shortened)
        text = str(error)
        if "DataLoader worker process" not in text:
            raise
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if last.startswith(f"{type(error).__name__}:") else last
        try:
            short = type(error)(message)
        except Exception:  # noqa: BLE001  (an exception type that takes other arguments)
            raise error from None
        raise short from None


def close_loader(loader: DataLoader | None) -> None:
    """End a loader's persistent workers now (they ignore SIGTERM, so they must be told)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None
