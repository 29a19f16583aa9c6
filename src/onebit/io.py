"""Atomic, pickle-free files: safetensors for tensors, JSON and CSV for the rest.

Every writer writes a temporary file in the destination's directory, flushes it
to disk and renames it over the destination, so a reader never sees a partial
file and an interrupted write never destroys the previous version. A temporary
file is named ``.tmp-<pid>-...``: one left behind by a killed process (whose pid
no longer runs) is removed by the next write to the same directory.

Readers raise :class:`FileFormatError` (a ``ValueError``) naming the file when it
is not what it should be (truncated, not JSON, not safetensors).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "FileFormatError",
    "remove_stale_temporaries",
    "atomic_path",
    "atomic_write_bytes",
    "save_json",
    "load_json",
    "save_csv",
    "save_tensors",
    "load_tensors",
    "tensors_metadata",
]


class FileFormatError(ValueError):
    """A file onebit reads is damaged or of another kind; the message names the file."""


_TEMPORARY = re.compile(r"^\.tmp-(\d+)-")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a pid no system has): not ours to judge
    return True


def remove_stale_temporaries(directory: str | os.PathLike, *, every: bool = False) -> list[str]:
    """Remove the ``.tmp-<pid>-*`` files in ``directory`` whose writer no longer runs (all
    ``.tmp-*`` files with ``every=True``, for a directory the caller holds a lock on).
    Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".tmp-"):
            continue
        m = _TEMPORARY.match(name)
        if not every and (m is None or int(m.group(1)) == os.getpid() or _running(int(m.group(1)))):
            continue
        path = os.path.join(directory, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def ensure_directory(directory: str | os.PathLike, what: str = "") -> None:
    """Create ``directory`` (and its parents); ``NotADirectoryError`` naming ``what`` (or the
    directory) when it or a part of its path is a file, ``OSError`` with the reason otherwise."""
    directory = os.fspath(directory)
    name = what or directory
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{name}: {directory} is a file, not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"{name}: a part of {directory} is a file, not a directory") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` is left as it was;
    an ``OSError`` of the temporary file names ``path``, the file the caller asked for.
    """
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(errno.ENOENT, "cannot write a file without a name", path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory: expected a file name")
    directory = os.path.dirname(os.path.abspath(path))
    ensure_directory(directory, f"cannot write {path}")
    remove_stale_temporaries(directory)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=suffix, dir=directory)
    except OSError as error:
        raise type(error)(error.errno, error.strerror, path) from None  # the file asked for, not the temporary
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file, not mkstemp's private 0600
        os.replace(tmp, path)
    except OSError as error:
        if tmp not in (error.filename, error.filename2):
            raise
        raise type(error)(error.errno, error.strerror, path) from None
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
    """Parse a JSON file; :class:`FileFormatError` naming the file when it is not JSON."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise FileFormatError(f"{os.fspath(path)}: not a valid JSON file ({error})") from None


def save_csv(path: str | os.PathLike, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors as safetensors, atomically; tensors are made contiguous and unshared."""
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file (no pickle involved); :class:`FileFormatError` naming the file
    when it is damaged (truncated, not safetensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found" if not os.path.exists(path) else f"{path} is not a regular file")
    try:
        return load_file(path)
    except (OSError, MemoryError):
        raise
    except Exception as error:  # safetensors raises its own error types on malformed files
        raise FileFormatError(f"{path}: not a readable safetensors file (truncated or damaged: {error})") from None


def tensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (:class:`FileFormatError` when it is damaged)."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, MemoryError):
        raise
    except Exception as error:
        raise FileFormatError(f"{path}: not a readable safetensors file (truncated or damaged: {error})") from None
