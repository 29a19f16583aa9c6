"""DataBundle and the dataset registry."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import TensorDataset

__all__ = ["DataBundle", "register_dataset", "register_directory_reader", "load", "names", "normalize", "resize"]


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
    #: the light augmentation suited to the data (``"none"``, ``"crop"``, ``"crop+flip"``), see ``Augment.parse``
    augment: str = "none"

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


def load(source: str = "digits", image_size: int | None = None, **kwargs) -> DataBundle:
    """Load a dataset by registered name or from a directory in a standard format.

    Directory formats: IDX files (MNIST/Fashion-MNIST layout), CIFAR batches, an image-folder
    tree. ``image_size`` resizes the images to ``image_size x image_size`` (bilinear), e.g. to
    upsample 28 px Fashion-MNIST to 32 px for ImageNet-style networks.
    """
    if source in _DATASETS:
        bundle = _DATASETS[source](**kwargs)
        if image_size and bundle.image_size != (image_size, image_size):
            bundle.train = TensorDataset(resize(bundle.train.tensors[0], image_size), bundle.train.tensors[1])
            bundle.test = TensorDataset(resize(bundle.test.tensors[0], image_size), bundle.test.tensors[1])
        return bundle
    if os.path.sep in source or source.startswith(".") or os.path.exists(source):
        if not os.path.isdir(source):
            raise FileNotFoundError(f"data directory {source!r} does not exist")
        for _, detect, reader in _DIRECTORY_READERS:
            if detect(source):
                return reader(source, image_size=image_size, **kwargs)
        kinds = "; ".join(kind for kind, _, _ in _DIRECTORY_READERS) or "none registered"
        raise ValueError(f"data directory {source!r} is in no known format (known: {kinds})")
    raise ValueError(f"unknown dataset {source!r}; known datasets: {', '.join(names())}, or a directory path")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` images to ``size x size`` (bilinear, antialiased when shrinking)."""
    if tuple(images.shape[2:]) == (size, size):
        return images
    import torch.nn.functional as F

    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def normalize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Normalize both splits per channel with the training split's mean and std."""
    dims = (0, 2, 3)
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std, mean.flatten().tolist(), std.flatten().tolist()
