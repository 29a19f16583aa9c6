"""An image-folder tree: one subfolder per class.

Either ``root/train/<class>/*.png`` with ``root/test/<class>/...`` (or ``val`` /
``valid``), or ``root/<class>/*`` alone, split into a fixed, stratified 80/20
train/test split. Images (PNG, JPEG, BMP, GIF, PPM/PGM, WebP) are read with
Pillow, converted to grey-scale when every image is grey, else to RGB, and
resized (shorter side, then centre crop) to ``image_size`` -- by default the size
all images share, or 64 when they differ.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

from onebit.data.bundle import DataBundle, normalize, register_directory_reader

__all__ = ["load_image_folder"]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
_TEST_NAMES = ("test", "val", "valid", "validation")


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS)


def _class_dirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _has_images(path: str) -> bool:
    return any(_is_image(f) for f in os.listdir(path))


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
        raise ValueError(f"{root}: class folder(s) {', '.join(unknown)} do not exist in the training split ({', '.join(classes)})")
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for f in sorted(os.listdir(folder)):
            if _is_image(f):
                files.append(os.path.join(folder, f))
                labels.append(label)
    if not files:
        raise ValueError(f"{root}: no images found (expected <class>/<image>{'|'.join(EXTENSIONS)})")
    return files, labels, classes


def _read(files: list[str], image_size: int | None):
    from PIL import Image, ImageOps, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{f}: cannot read image ({error})") from None
    grey = all(im.mode in ("1", "L", "I", "I;16", "F", "LA") for im in images)
    mode = "L" if grey else "RGB"
    sizes = {im.size for im in images}
    if image_size is None:
        size = next(iter(sizes)) if len(sizes) == 1 else (64, 64)
    else:
        size = (image_size, image_size)
    arrays = []
    for im in images:
        im = im.convert(mode)
        if im.size != size:
            im = ImageOps.fit(im, size)
        a = np.asarray(im, dtype=np.float32) / 255.0
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)), size


@register_directory_reader("image folder (one subfolder per class)", _detect)
def load_image_folder(path: str, image_size: int | None = None, test_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    dirs = _class_dirs(path)
    if "train" in dirs:
        test_dir = next((os.path.join(path, d) for d in _TEST_NAMES if d in dirs), None)
        if test_dir is None:
            raise FileNotFoundError(f"{path}: has train/ but no test split (expected one of {', '.join(n + '/' for n in _TEST_NAMES)})")
        train_files, train_labels, classes = _list(os.path.join(path, "train"))
        test_files, test_labels, _ = _list(test_dir, classes)
    else:
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
        train_files, train_labels = [files[i] for i in sorted(train_idx)], [labels[i] for i in sorted(train_idx)]
        test_files, test_labels = [files[i] for i in sorted(test_idx)], [labels[i] for i in sorted(test_idx)]
        if not test_files:
            raise ValueError(f"{path}: too few images for a test split; add a test/ folder or more images per class")
    images, _ = _read(train_files + test_files, image_size)  # one mode and size for both splits
    x_train, x_test = images[: len(train_files)], images[len(train_files) :]
    x_train, x_test, mean, std = normalize(x_train, x_test)
    return DataBundle(
        name=os.path.basename(os.path.normpath(path)),
        train=TensorDataset(x_train, torch.tensor(train_labels)),
        test=TensorDataset(x_test, torch.tensor(test_labels)),
        num_classes=len(classes),
        classes=classes,
        mean=mean,
        std=std,
        augment="crop+flip",
    )
