"""DataBundle and the dataset registry."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import TensorDataset

__all__ = ["DataBundle", "register_dataset", "load", "names"]


@dataclass
class DataBundle:
    """A train/test split of images ``[N, C, H, W]`` (float32, normalized) and labels ``[N]`` (int64)."""

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    classes: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def in_channels(self) -> int:
        return int(self.train.tensors[0].shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.tensors[0].shape[2:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"DataBundle({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"classes={self.num_classes}, shape={[self.in_channels, *self.image_size]})"
        )


_DATASETS: dict[str, Callable[..., DataBundle]] = {}
_DIRECTORY_READERS: list[tuple[str, Callable[[str], bool], Callable[..., DataBundle]]] = []


def register_dataset(name: str):
    """Decorator: register ``fn(**kwargs) -> DataBundle`` under ``name``."""

    def decorator(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        _DATASETS[name] = fn
        return fn

    return decorator


def register_directory_reader(kind: str, detect: Callable[[str], bool]):
    """Decorator: ``fn(path, **kwargs) -> DataBundle`` reads directories for which ``detect(path)`` is true."""

    def decorator(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        _DIRECTORY_READERS.append((kind, detect, fn))
        return fn

    return decorator


def names() -> list[str]:
    """Registered dataset names."""
    return sorted(_DATASETS)


def load(source: str = "digits", **kwargs) -> DataBundle:
    """Load a dataset by registered name or from a directory in a standard format."""
    if source in _DATASETS:
        return _DATASETS[source](**kwargs)
    if os.path.sep in source or source.startswith(".") or os.path.exists(source):
        if not os.path.isdir(source):
            raise FileNotFoundError(f"data directory {source!r} does not exist")
        for _, detect, reader in _DIRECTORY_READERS:
            if detect(source):
                return reader(source, **kwargs)
        kinds = ", ".join(kind for kind, _, _ in _DIRECTORY_READERS) or "none registered"
        raise ValueError(f"data directory {source!r} is in no known format (known: {kinds})")
    raise ValueError(f"unknown dataset {source!r}; known datasets: {', '.join(names())}, or a directory path")


def normalize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Normalize both splits per channel with the training split's mean and std."""
    dims = (0, 2, 3)
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std, mean.flatten().tolist(), std.flatten().tolist()
