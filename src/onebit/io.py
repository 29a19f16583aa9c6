"""Atomic, pickle-free files: safetensors for tensors, JSON and CSV for the rest.

Every writer writes a temporary file in the destination's directory, flushes it
to disk and renames it over the destination, so a reader never sees a partial
file and an interrupted write never destroys the previous version.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

__all__ = ["atomic_path", "atomic_write_bytes", "save_json", "load_json", "save_csv", "save_tensors", "load_tensors"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file, not mkstemp's private 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically; tensors are made contiguous and unshared."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file (no pickle involved)."""
    return load_file(os.fspath(path))
