"""DataBundle, its splits, and the dataset registry.

A :class:`DataBundle` is a train/test pair of :class:`Split` s over raw sources
(:mod:`onebit.data.datasets`), plus what the model needs to know: classes, channels, the image
size it sees, and the per-channel normalization. ``split[i]`` is ``(x, y)``: the image through
the split's evaluation transform (to ``[0, 1]``, resized and centre-cropped when it comes from
files, normalized), deterministic. Training augmentation is the trainer's
(:mod:`onebit.data.loader`): :meth:`DataBundle.train_transform` gives the per-sample pipeline.

Images that fit in memory (digits, IDX, CIFAR) are kept as uint8, one byte a pixel, and
normalized a batch at a time (``(u8 / scale - mean) / std``, the same float32 arithmetic as
normalizing the whole set at once); image folders stay on disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from onebit.data import transforms as T
from onebit.data.augment import Augment
from onebit.data.datasets import ArrayDataset, ImageSource

__all__ = [
    "DataBundle",
    "Split",
    "ToUnit",
    "register_dataset",
    "register_directory_reader",
    "load",
    "names",
    "array_bundle",
    "resize",
    "channel_stats",
]

#: the fraction of the resized image a centre crop keeps when evaluating large images (ImageNet's 224 of 256)
CROP_FRACTION = 0.875
#: images at least this large (in pixels a side) are "large": RandomResizedCrop to train,
#: Resize + CenterCrop to evaluate
LARGE_IMAGE = 64


class ToUnit:
    """uint8 pixels to float32 in ``[0, 1]``: ``x / scale``; a float image (already in ``[0, 1]``) as it is."""

    def __init__(self, scale: float = 255.0):
        self.scale = float(scale)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return img.to(torch.float32) / self.scale if img.dtype == torch.uint8 else img.to(torch.float32)

    def __repr__(self) -> str:
        return f"ToUnit(scale={self.scale:g})"


class Split(Dataset):
    """One split as a model sees it: ``split[i] = (transform(source[i].image), label)``."""

    def __init__(
        self,
        source: ImageSource,
        transform: T.Compose,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ):
        self.source, self.transform = source, transform
        self.mean, self.std = mean, std  # float32 [C], or None: not normalized

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[index]
        return self.transform(image), label

    @property
    def labels(self) -> torch.Tensor:
        return self.source.labels

    @property
    def in_memory(self) -> bool:
        return self.source.in_memory

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-ready images ``[n, C, H, W]`` and labels at ``indices``: one gather and one
        normalization for in-memory sources, item by item otherwise."""
        if self.in_memory:
            images, labels = self.source.batch(indices)
            x = images.to(torch.float32) / self.source.scale if images.dtype == torch.uint8 else images
            if self.mean is None:
                return x, labels
            return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None], labels
        items = [self[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images and labels as two tensors, as ``TensorDataset.tensors``. This holds the whole
        split in memory as float32 (a split of files is decoded in full): the trainer and
        ``onebit eval`` never ask for it, they read batches."""
        return self.batch(torch.arange(len(self)))


@dataclass
class DataBundle:
    """A train/test pair of :class:`Split` s, the classes, and the normalization (``mean``, ``std``
    per channel, of the training images in ``[0, 1]``)."""

    name: str
    train: Split
    test: Split
    num_classes: int
    classes: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    #: the augmentation suited to the data (see ``Augment.parse``)
    augment: str = "none"
    #: the image size a model sees (after the evaluation transform)
    size: tuple[int, int] = (0, 0)
    #: how a file image becomes ``size`` before normalization: "" (in memory: already), "fit"
    #: (shorter side to size, centre crop) or "center" (shorter side to size / CROP_FRACTION, centre crop)
    prepare: str = ""

    @property
    def in_channels(self) -> int:
        return int(self.train.source.channels)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.size)  # type: ignore[return-value]

    def train_transform(self, augment: Augment) -> T.Compose:
        """The per-sample training pipeline for ``augment``: a random resized crop of the decoded
        image, or the image prepared as for evaluation, randomly translated; flips; normalization."""
        unit = ToUnit(self.train.source.scale)
        normalize = T.Normalize(self.mean, self.std) if self.mean else T.Compose([])  # a user's data: as it is
        steps: list = []
        if augment.resized_crop:
            steps.append(T.RandomResizedCrop(self.size))
            if augment.flip:
                steps.append(T.RandomHorizontalFlip())
            return T.Compose([*steps, unit, normalize])
        steps += prepare_steps(self.size, self.prepare)
        steps += [unit, normalize]
        if augment.crop_padding:
            steps.append(T.RandomCrop(self.size, padding=augment.crop_padding))
        if augment.flip:
            steps.append(T.RandomHorizontalFlip())
        return T.Compose(steps)

    def __repr__(self) -> str:
        return (
            f"DataBundle({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"classes={self.num_classes}, shape={[self.in_channels, *self.image_size]})"
        )


def eval_transform(
    source: ImageSource, size: tuple[int, int], prepare: str, mean: Sequence[float], std: Sequence[float] | None
) -> T.Compose:
    """The deterministic pipeline of a split (``std=None``: to ``[0, 1]`` without normalizing)."""
    steps = prepare_steps(size, prepare)
    steps.append(ToUnit(source.scale))
    if std is not None:
        steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def prepare_steps(size: tuple[int, int], prepare: str) -> list:
    """How a file image becomes ``size``: ``fit`` (shorter side to size, centre crop), ``center``
    (shorter side to size / CROP_FRACTION, centre crop) or nothing (in memory: already)."""
    if prepare == "fit":
        return [T.Resize(min(size)), T.CenterCrop(size)]
    if prepare == "center":
        return [T.Resize(int(min(size) / CROP_FRACTION)), T.CenterCrop(size)]
    return []


def make_bundle(
    name: str,
    train: ImageSource,
    test: ImageSource,
    *,
    num_classes: int,
    classes: list[str],
    mean: Sequence[float],
    std: Sequence[float],
    augment: str,
    size: tuple[int, int],
    prepare: str = "",
) -> DataBundle:
    """A bundle of two sources, their evaluation transforms built from ``size``, ``prepare`` and the statistics."""
    if len(mean) != train.channels or len(std) != train.channels:
        raise ValueError(f"--mean/--std: {name} has {train.channels} channel(s), got {len(mean)} and {len(std)} values")
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be positive, got {list(std)}")
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    splits = [Split(s, eval_transform(s, size, prepare, mean, std), mean_t, std_t) for s in (train, test)]
    return DataBundle(
        name=name,
        train=splits[0],
        test=splits[1],
        num_classes=num_classes,
        classes=classes,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        augment=augment,
        size=tuple(size),
        prepare=prepare,
    )


def array_bundle(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    scale: float,
    num_classes: int,
    classes: list[str],
    augment: str,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataBundle:
    """A bundle of in-memory images (uint8 ``[N, C, H, W]`` with ``scale``), kept as uint8.

    The statistics are the training images' own (``x / scale`` in float32, mean and std per
    channel over the whole set), unless given. ``image_size`` resizes both splits once, in float
    (bilinear, antialiased when shrinking), and keeps them as float32."""
    (x_train, y_train), (x_test, y_test) = train, test
    if image_size or mean is None or std is None:
        unit = x_train.to(torch.float32) / scale
        if image_size:
            unit = resize(unit, image_size)
            x_train, x_test, scale = unit, resize(x_test.to(torch.float32) / scale, image_size), 1.0
        if mean is None or std is None:
            mean, std = channel_stats(unit)
        del unit
    sources = ArrayDataset(x_train, y_train, scale), ArrayDataset(x_test, y_test, scale)
    return make_bundle(
        name,
        *sources,
        num_classes=num_classes,
        classes=classes,
        mean=mean,
        std=std,
        augment=augment,
        size=sources[0].image_size,
    )


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of float images ``[N, C, H, W]``, the std at least 1e-8."""
    dims = (0, 2, 3)
    mean = images.mean(dim=dims)
    std = images.std(dim=dims).clamp_min(1e-8)
    return mean.tolist(), std.tolist()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` float images to ``size x size`` (bilinear, antialiased when shrinking)."""
    if tuple(images.shape[2:]) == (size, size):
        return images
    import torch.nn.functional as F

    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


_DATASETS: dict[str, Callable[..., DataBundle]] = {}
_DIRECTORY_READERS: list[tuple[str, Callable[[str], bool], Callable[..., DataBundle]]] = []


def register_dataset(name: str):
    """Decorator: register ``fn(image_size=None, mean=None, std=None, **kwargs) -> DataBundle`` under ``name``."""

    def decorator(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        _DATASETS[name] = fn
        return fn

    return decorator


def register_directory_reader(kind: str, detect: Callable[[str], bool]):
    """Decorator: ``fn(path, image_size=None, mean=None, std=None, **kwargs) -> DataBundle`` reads
    directories for which ``detect(path)`` is true."""

    def decorator(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        _DIRECTORY_READERS.append((kind, detect, fn))
        return fn

    return decorator


def names() -> list[str]:
    """Registered dataset names."""
    return sorted(_DATASETS)


def load(
    source: str = "digits",
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> DataBundle:
    """Load a dataset by registered name or from a directory in a standard format.

    Directory formats: IDX files (MNIST/Fashion-MNIST layout), CIFAR batches, an image-folder
    tree (ImageNet's layout: ``train/`` and ``val/``, one folder per class). ``image_size``
    sets the side of the images a model sees, e.g. 32 to upsample 28 px Fashion-MNIST for
    ImageNet-style networks, or 224 for ImageNet. ``mean`` / ``std`` (one value per channel, of
    images in ``[0, 1]``) normalize instead of the training images' own statistics.
    """
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if source in _DATASETS:
        return _registered(_DATASETS[source], image_size, mean, std, kwargs)
    if os.path.sep in source or source.startswith(".") or os.path.exists(source):
        if not os.path.isdir(source):
            what = "is a file, not a directory" if os.path.exists(source) else "does not exist"
            raise FileNotFoundError(f"data directory {source!r} {what}")
        for _, detect, reader in _DIRECTORY_READERS:
            if detect(source):
                return reader(source, image_size=image_size, mean=mean, std=std, **kwargs)
        kinds = "; ".join(kind for kind, _, _ in _DIRECTORY_READERS) or "none registered"
        raise ValueError(f"data directory {source!r} is in no known format (known: {kinds})")
    raise ValueError(f"unknown dataset {source!r}; known datasets: {', '.join(names())}, or a directory path")


def _registered(fn: Callable[..., DataBundle], image_size, mean, std, kwargs) -> DataBundle:
    """Call a registered dataset with the options it takes. A function written for earlier versions
    (no ``image_size``/``mean``/``std``, a bundle of ``TensorDataset`` s of normalized images) still
    works: its tensors become in-memory sources, resized when asked, used as they are."""
    import inspect

    from torch.utils.data import TensorDataset

    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    options = {k: v for k, v in (("image_size", image_size), ("mean", mean), ("std", std)) if takes_all or k in params}
    bundle = fn(**options, **kwargs)
    if not isinstance(bundle.train, TensorDataset):
        return bundle
    if mean is not None and "mean" not in options:
        raise ValueError(f"dataset {bundle.name!r} normalizes its own images: it takes no --mean/--std")
    splits = []
    for part in (bundle.train, bundle.test):
        x, y = part.tensors
        x = resize(x, image_size) if image_size and x.dim() == 4 and "image_size" not in options else x
        splits.append(Split(ArrayDataset(x, y, scale=1.0), T.Compose([ToUnit(1.0)])))
    bundle.train, bundle.test = splits
    bundle.size = tuple(int(v) for v in bundle.train.source.images.shape[2:])
    return bundle


def sample_indices(n: int, count: int) -> np.ndarray:
    """``count`` indices spread evenly over ``range(n)`` (all of them when ``n <= count``)."""
    if n <= count:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
