"""An image-folder tree: one subfolder per class.

Either ``root/train/<class>/*.png`` with ``root/test/<class>/...`` (or ``val`` /
``valid``), or ``root/<class>/*`` alone, split into a fixed, stratified 80/20
train/test split. Images (PNG, JPEG, BMP, GIF, PPM/PGM, WebP) are read with
Pillow, converted to grey-scale when every image is grey, else to RGB, scaled to
[0, 1] by their format's maximum (255, or 65,535 for 16-bit images, whose precision
is kept), and resized (shorter side, then centre crop) to ``image_size`` -- by default the size
all images share, or 64 when they differ.
"""

from __future__ import annotations

import os
import warnings

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


_GREY_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "LA", "La")


def _unit_grey(im):
    """A grey image with more than 8 bits (``I;16*``, ``I``, ``F``) as a float ``F`` image in [0, 1]:
    16-bit values divided by 65,535, 32-bit integers by their type's maximum unless they fit
    16 bits (then as 16-bit), floats taken as they are."""
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        peak = 1.0
    elif im.mode.startswith("I;16") or (a.size and 0 <= a.min() and a.max() <= 65535):
        peak = 65535.0
    else:
        peak = float(2**31 - 1)
    return Image.fromarray(np.clip(a.astype(np.float64) / peak, 0.0, 1.0).astype(np.float32))


def _read(files: list[str], image_size: int | None):
    from PIL import Image, ImageOps, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with warnings.catch_warnings():  # above Pillow's pixel limit: refused, not just a warning
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    im.load()
                    images.append(im.copy())
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"{f}: refused, too many pixels for an image of a dataset ({error})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise ValueError(f"{f}: cannot read image ({error})") from None
    grey = all(im.mode in _GREY_MODES for im in images)
    sizes = {im.size for im in images}
    if image_size is None:
        size = next(iter(sizes)) if len(sizes) == 1 else (64, 64)
    else:
        size = (image_size, image_size)
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"{files[0]}: an image of {size[0]}x{size[1]} pixels holds nothing to learn from")
    arrays = []
    for im in images:
        deep = im.mode in ("I", "F") or im.mode.startswith("I;16")  # more than 8 bits a pixel
        im = _unit_grey(im) if deep else im.convert("L" if grey else "RGB")
        if im.size != size:
            im = ImageOps.fit(im, size)
        a = np.asarray(im, dtype=np.float32)
        if deep and not grey:  # a deep grey image among colour ones: its grey in every channel
            a = np.repeat(a[..., None], 3, axis=-1)
        elif not deep:
            a = a / np.float32(255.0)
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
