"""Sources of images: map-style datasets that give one raw ``(image, label)`` when asked.

A source holds what is cheap to hold (labels, file names, small uint8 arrays) and decodes an
image only when it is asked for one. Its items are raw: ``image`` is ``[C, H, W]`` uint8 (or
float32 in ``[0, 1]`` for images deeper than 8 bits, or images already resized in memory),
``label`` an int. :class:`onebit.data.bundle.Split` turns them into what a model sees.

- :class:`ArrayDataset`: images in memory as one tensor (digits, IDX, CIFAR: uint8, one byte a
  pixel); ``batch(indices)`` gathers many at once.
- :class:`ImageFiles`: image files decoded with Pillow one at a time (an image folder). File
  names live in one numpy byte array, not a list of Python strings, so that loader worker
  processes share them instead of copying them page by page as reference counts change.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageSource", "ArrayDataset", "ImageFiles", "open_image", "decode_image", "GREY_MODES"]


class ImageSource(Dataset):
    """The common shape of a source: ``len``, ``source[i] -> (image, label)``, ``labels`` (all, int64),
    ``channels`` and ``scale`` (what divides a uint8 pixel to bring it to ``[0, 1]``)."""

    labels: torch.Tensor
    channels: int
    scale: float = 255.0
    #: whether ``batch(indices)`` gathers many items at once (the images are in memory)
    in_memory: bool = False

    def __len__(self) -> int:
        return len(self.labels)


class ArrayDataset(ImageSource):
    """Images ``[N, C, H, W]`` in memory (uint8 with ``scale`` 255 or 16, or float32 with ``scale`` 1)
    and labels ``[N]`` (other inputs ``[N, C, ...]`` too, e.g. a user's own data)."""

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: float = 255.0):
        if images.dim() < 2:
            raise ValueError(f"images must be [N, C, ...], got shape {list(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images, self.labels, self.scale = images, labels.to(torch.int64), float(scale)
        self.channels = int(images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.images.shape[2:])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at ``indices``, gathered in one indexing each."""
        return self.images[indices], self.labels[indices]


#: Pillow modes of grey-scale images (one channel)
GREY_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "LA", "La")


def _is_deep(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;16")


def _unit_grey(im) -> np.ndarray:
    """A grey image deeper than 8 bits as float32 in ``[0, 1]``: 16-bit values divided by 65,535,
    32-bit integers by their type's maximum unless they fit 16 bits (then as 16-bit), floats kept."""
    a = np.asarray(im)
    if im.mode == "F":
        peak = 1.0
    elif im.mode.startswith("I;16") or (a.size and 0 <= a.min() and a.max() <= 65535):
        peak = 65535.0
    else:
        peak = float(2**31 - 1)
    return np.clip(a.astype(np.float64) / peak, 0.0, 1.0).astype(np.float32)


@contextlib.contextmanager
def open_image(path: str):
    """Pillow's image of ``path`` (header read, pixels on demand), inside a ``with``: a file Pillow
    cannot read, or one above its pixel limit, raises ``ValueError`` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # above Pillow's pixel limit: refused, not just a warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path}: refused, too many pixels for an image of a dataset ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read image ({error})") from None


def decode_image(path: str, mode: str) -> torch.Tensor:
    """Decode one image file with Pillow as ``[C, H, W]``: uint8 in ``mode`` (``"L"`` or ``"RGB"``),
    or float32 in ``[0, 1]`` for an image deeper than 8 bits (its precision kept; its grey in every
    channel when ``mode`` is RGB). Errors as :func:`open_image`."""
    with open_image(path) as im:
        if _is_deep(im.mode):
            a = _unit_grey(im)
            if mode == "RGB":
                a = np.repeat(a[..., None], 3, axis=-1)
        else:
            a = np.array(im.convert(mode))
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


class ImageFiles(ImageSource):
    """Image files and their labels; ``files[i]`` is decoded (:func:`decode_image`) when item ``i``
    is asked for. ``mode`` is ``"L"`` (one channel) or ``"RGB"``."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], mode: str):
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        if len(files) != len(labels):
            raise ValueError(f"{len(labels)} labels for {len(files)} files")
        self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.mode, self.channels = mode, 1 if mode == "L" else 3

    def path(self, index: int) -> str:
        return os.fsdecode(self.files[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.path(index), self.mode), int(self.labels[index])
