"""A directory of IDX files in the MNIST / Fashion-MNIST layout (gzipped or not).

Expected files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ending in
``.gz`` (``.idx3-ubyte`` with a dot is accepted too). IDX format: two zero bytes,
a type byte (0x08: unsigned byte), the number of dimensions, one big-endian
uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
import re

import numpy as np
import torch

from onebit.data.bundle import DataBundle, array_bundle, register_directory_reader

__all__ = ["read_idx", "load_idx_directory"]

_ROLES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_PATTERN = re.compile(r"^(train|t10k|test)-(images|labels)[.-]idx([13])-ubyte(\.gz)?$")


def _find(path: str) -> dict[tuple[str, str], str]:
    found: dict[tuple[str, str], str] = {}
    for name in sorted(os.listdir(path)):
        m = _PATTERN.match(name)
        if m:
            split = "train" if m.group(1) == "train" else "test"
            found.setdefault((split, m.group(2)), os.path.join(path, name))
    return found


def _detect(path: str) -> bool:
    return bool(_find(path))


def read_idx(path: str, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped when the name ends in ``.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    name = os.path.basename(path)
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot read IDX file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (expected the magic bytes 00 00 <type> <ndim>, "
            f"got {raw[:4].hex(' ') or 'an empty file'})"
        )
    dtype, ndim = raw[2], raw[3]
    if dtype != 0x08:
        raise ValueError(f"{path}: IDX type 0x{dtype:02x} is not supported (expected 0x08, unsigned bytes)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: expected a {expected_ndim}-dimensional IDX file ({name}), got {ndim} dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape)) if shape else 0
    if len(raw) - header != size:
        raise ValueError(
            f"{path}: IDX header announces shape {list(shape)} ({size} bytes) "
            f"but the file holds {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@register_directory_reader("IDX (MNIST/Fashion-MNIST layout)", _detect)
def load_idx_directory(path: str, image_size: int | None = None, mean=None, std=None) -> DataBundle:
    """Read train/test images and labels from an IDX directory, kept in memory as uint8."""
    found = _find(path)
    arrays = {}
    for role, expected in _ROLES.items():
        if role not in found:
            raise FileNotFoundError(f"{path}: missing {role[0]} {role[1]} (expected {expected} or {expected}.gz)")
        arrays[role] = read_idx(found[role], 3 if role[1] == "images" else 1)
    splits = []
    for split in ("train", "test"):
        images, labels = arrays[(split, "images")], arrays[(split, "labels")]
        if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
            raise ValueError(
                f"{found[(split, 'images')]}: holds {images.shape[0]} images "
                f"of {images.shape[1]}x{images.shape[2]} pixels; "
                "a dataset needs at least one image of at least 1x1 pixel"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"{found[(split, 'labels')]}: {len(labels)} labels for {len(images)} images "
                f"in {found[(split, 'images')]}"
            )
        splits.append((torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))))
    num_classes = int(max(splits[0][1].max(), splits[1][1].max())) + 1
    return array_bundle(
        os.path.basename(os.path.normpath(path)),
        splits[0],
        splits[1],
        scale=255.0,
        num_classes=num_classes,
        classes=[str(i) for i in range(num_classes)],
        augment="crop",
        image_size=image_size,
        mean=mean,
        std=std,
    )
