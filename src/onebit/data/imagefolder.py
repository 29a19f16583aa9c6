"""An image-folder tree, one subfolder per class, read one image at a time.

Either ImageNet's layout, ``root/train/<class>/*`` with ``root/val/<class>/*`` (or ``test`` /
``valid`` / ``validation``), or ``root/<class>/*`` alone, split into a fixed, stratified 80/20
train/test split. Images (PNG, JPEG, BMP, GIF, PPM/PGM, WebP, TIFF) are decoded with Pillow when
asked for (:class:`~onebit.data.datasets.ImageFiles`): nothing but their names is held in memory.

- Channels: grey-scale (``L``) when every image of a sample of the training split is grey, else RGB.
- Size a model sees: ``image_size``, or by default the size the sampled images share (64 when
  they differ). Images of at least 64 px (:data:`~onebit.data.bundle.LARGE_IMAGE`) are evaluated
  as ImageNet's are, resized so that the shorter side is ``size / 0.875`` and centre-cropped to
  ``size``, and trained with a random resized crop and flips; smaller ones are fitted (shorter
  side to ``size``, centre crop) and trained with a random translation and flips.
- Normalization: the mean and std per channel of a sample of up to 1,000 training images as
  evaluated, unless given.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from onebit.data.bundle import (
    LARGE_IMAGE,
    DataBundle,
    eval_transform,
    make_bundle,
    register_directory_reader,
    sample_indices,
)
from onebit.data.datasets import GREY_MODES, ImageFiles, open_image

__all__ = ["load_image_folder", "EXTENSIONS", "STATS_SAMPLE"]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
_TEST_NAMES = ("val", "test", "valid", "validation")
#: how many training images the channel mode, the default size and the statistics are read from
STATS_SAMPLE = 1000


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _class_dirs(path: str) -> list[str]:
    return sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))


def _has_images(path: str) -> bool:
    return any(_is_image(f.name) for f in os.scandir(path))


def _detect(path: str) -> bool:
    dirs = _class_dirs(path)
    if "train" in dirs:
        return any(_has_images(os.path.join(path, "train", d)) for d in _class_dirs(os.path.join(path, "train")))
    return any(_has_images(os.path.join(path, d)) for d in dirs)


def _list(root: str, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    found = _class_dirs(root)
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(
            f"{root}: class folder(s) {', '.join(unknown)} do not exist in the training split ({', '.join(classes)})"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        names = sorted(f.name for f in os.scandir(folder) if _is_image(f.name))
        files += [os.path.join(folder, f) for f in names]
        labels += [label] * len(names)
    if not files:
        raise ValueError(f"{root}: no images found (expected <class>/<image>{'|'.join(EXTENSIONS)})")
    return files, labels, classes


def _split(path: str, test_fraction: float, split_seed: int):
    """(train files, train labels, test files, test labels, classes) of the tree at ``path``."""
    dirs = _class_dirs(path)
    if "train" in dirs:
        test_dir = next((os.path.join(path, d) for d in _TEST_NAMES if d in dirs), None)
        if test_dir is None:
            raise FileNotFoundError(
                f"{path}: has train/ but no test split (expected one of {', '.join(n + '/' for n in _TEST_NAMES)})"
            )
        train_files, train_labels, classes = _list(os.path.join(path, "train"))
        test_files, test_labels, _ = _list(test_dir, classes)
        return train_files, train_labels, test_files, test_labels, classes
    files, labels, classes = _list(path)
    rng = np.random.default_rng(split_seed)
    train_idx, test_idx = [], []
    labels_np = np.asarray(labels)
    for c in range(len(classes)):
        idx = np.flatnonzero(labels_np == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test_idx += idx[:n_test].tolist()
        train_idx += idx[n_test:].tolist()
    train_idx, test_idx = sorted(train_idx), sorted(test_idx)
    if not test_idx:
        raise ValueError(f"{path}: too few images for a test split; add a test/ folder or more images per class")
    return (
        [files[i] for i in train_idx],
        [labels[i] for i in train_idx],
        [files[i] for i in test_idx],
        [labels[i] for i in test_idx],
        classes,
    )


def _survey(files: list[str]) -> tuple[str, set[tuple[int, int]]]:
    """The channel mode and the (height, width) sizes of a sample of ``files`` (headers only)."""
    grey, sizes = True, set()
    for i in sample_indices(len(files), STATS_SAMPLE):
        with open_image(files[i]) as im:
            grey = grey and im.mode in GREY_MODES
            sizes.add((im.height, im.width))
    return ("L" if grey else "RGB"), sizes


def _estimate_stats(source: ImageFiles, size: tuple[int, int], prepare: str) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to :data:`STATS_SAMPLE` training images, as evaluated, in ``[0, 1]``."""
    transform = eval_transform(source, size, prepare, [], None)
    total = torch.zeros(source.channels, dtype=torch.float64)
    squares = torch.zeros(source.channels, dtype=torch.float64)
    count = 0
    for i in sample_indices(len(source), STATS_SAMPLE):
        x = transform(source[int(i)][0]).to(torch.float64).flatten(1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    var = (squares - count * mean * mean) / max(count - 1, 1)
    return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-8).tolist()


@register_directory_reader("image folder (one subfolder per class)", _detect)
def load_image_folder(
    path: str, image_size: int | None = None, mean=None, std=None, test_fraction: float = 0.2, split_seed: int = 0
) -> DataBundle:
    """The bundle of the tree at ``path`` (see the module's docstring)."""
    train_files, train_labels, test_files, test_labels, classes = _split(path, test_fraction, split_seed)
    mode, sizes = _survey(train_files)
    if image_size is not None:
        size = (image_size, image_size)
    else:
        size = next(iter(sizes)) if len(sizes) == 1 else (LARGE_IMAGE, LARGE_IMAGE)
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"{train_files[0]}: an image of {size[1]}x{size[0]} pixels holds nothing to learn from")
    large = min(size) >= LARGE_IMAGE
    prepare = "center" if large else "fit"
    train, test = ImageFiles(train_files, train_labels, mode), ImageFiles(test_files, test_labels, mode)
    if mean is None:
        mean, std = _estimate_stats(train, size, prepare)
    return make_bundle(
        os.path.basename(os.path.normpath(path)),
        train,
        test,
        num_classes=len(classes),
        classes=classes,
        mean=mean,
        std=std,
        augment="resized-crop+flip" if large else "crop+flip",
        size=size,
        prepare=prepare,
    )
