"""CIFAR-10 (and CIFAR-100) batch directories: the "python version" or the "binary version".

Python version: ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and
``batches.meta`` (CIFAR-100: ``train``, ``test``, ``meta``), pickled dicts with
``data`` (``[N, 3072]`` uint8, channel-major 32x32) and ``labels``
(``fine_labels``). They are read with a restricted unpickler that only builds
plain containers and numpy arrays, never arbitrary objects.
Binary version: ``data_batch_1.bin`` ... ``data_batch_5.bin`` and
``test_batch.bin``, records of one label byte and 3072 pixel bytes, and
``batches.meta.txt`` with one class name per line.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from onebit.data.bundle import DataBundle, array_bundle, register_directory_reader

__all__ = ["load_cifar_directory", "read_python_batch", "read_binary_batch"]

_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds only arrays and lists)")


def _layout(path: str) -> str | None:
    names = set(os.listdir(path))
    if "data_batch_1.bin" in names or "test_batch.bin" in names:
        return "binary"
    if "data_batch_1" in names or "test_batch" in names:
        return "python"
    if {"train", "test", "meta"} <= names:
        return "python100"
    return None


def _detect(path: str) -> bool:
    return _layout(path) is not None


def read_python_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 3, 32, 32] uint8, labels [N] int64)`` from one pickled batch."""
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001  (any unpickling failure is a malformed file)
        raise ValueError(f"{path}: not a CIFAR python batch ({error})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (expected a dict with data and labels)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    labels = batch.get("labels", batch.get("fine_labels"))
    data = batch.get("data")
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR batch without 'data' and 'labels' entries (has {', '.join(map(str, batch))})")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: CIFAR 'data' must be uint8 of shape [N, 3072], got {data.dtype} {list(data.shape)}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels


def read_binary_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` from one binary-version batch (records of 1 + 3072 bytes)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise ValueError(
            f"{path}: size {raw.size} bytes is not a whole number of CIFAR-10 records (1 label byte + 3072 pixel bytes)"
        )
    records = raw.reshape(-1, 3073)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _classes(path: str, layout: str, num_classes: int) -> list[str]:
    try:
        if layout == "binary":
            with open(os.path.join(path, "batches.meta.txt"), encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        else:
            meta_path = os.path.join(path, "batches.meta" if layout == "python" else "meta")
            with open(meta_path, "rb") as f:
                meta = _SafeUnpickler(f, encoding="bytes").load()
            key = b"label_names" if b"label_names" in meta else b"fine_label_names"
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]
    except Exception:  # noqa: BLE001  (class names are optional)
        names = []
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


@register_directory_reader("CIFAR (python or binary batches)", _detect)
def load_cifar_directory(path: str, image_size: int | None = None, mean=None, std=None) -> DataBundle:
    """Read the train and test batches of a CIFAR-10/100 directory, kept in memory as uint8."""
    layout = _layout(path)
    if layout == "binary":
        train_files, test_files, reader, suffix = _TRAIN, ["test_batch"], read_binary_batch, ".bin"
    elif layout == "python":
        train_files, test_files, reader, suffix = _TRAIN, ["test_batch"], read_python_batch, ""
    else:
        train_files, test_files, reader, suffix = ["train"], ["test"], read_python_batch, ""
    parts = {}
    for split, files in (("train", train_files), ("test", test_files)):
        images, labels = [], []
        for name in files:
            file = os.path.join(path, name + suffix)
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"{path}: missing CIFAR batch {name + suffix} "
                    f"(expected {', '.join(f + suffix for f in train_files + test_files)})"
                )
            x, y = reader(file)
            images.append(x)
            labels.append(y)
        parts[split] = (torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))
    num_classes = int(max(parts["train"][1].max(), parts["test"][1].max())) + 1
    return array_bundle(
        os.path.basename(os.path.normpath(path)),
        parts["train"],
        parts["test"],
        scale=255.0,
        num_classes=num_classes,
        classes=_classes(path, layout, num_classes),
        augment="crop+flip",
        image_size=image_size,
        mean=mean,
        std=std,
    )
