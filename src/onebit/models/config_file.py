"""The ``config.json`` beside a model's weights: a run's (``onebit train --out``) or a push's (``onebit push``).

Its entries that building the model needs, each checked by :func:`check_config`:

- ``config``: an object naming the ``model`` (a string), with its ``model_kwargs`` (an object, optional);
- ``num_classes``, ``in_channels``: integers in ``[1, 2^20]``;
- ``image_size``: a list of 1 to 3 integers in ``[1, 2^16]``;
- ``sha256`` (a push's only): an object mapping each file's name to its SHA-256, 64 lowercase hex digits.

Every error is an :class:`onebit.io.FileFormatError` naming the file and the entry.
"""

from __future__ import annotations

import os
import re
from typing import Any

from onebit import io

__all__ = ["CONFIG_FILE", "REQUIRED_ENTRIES", "read_config", "check_config"]

CONFIG_FILE = "config.json"
#: the entries every run's and push's config.json holds
REQUIRED_ENTRIES = ("config", "num_classes", "in_channels", "image_size")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_config(path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """The checked ``config.json`` at ``path``; errors name it ``name`` (default: ``path``).

    A file that is not JSON, or an entry that is missing or malformed, raises
    :class:`onebit.io.FileFormatError`; a missing file ``FileNotFoundError``."""
    return check_config(io.load_json(path), os.fspath(path) if name is None else name)


def _is_int_in(value: Any, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= high


def check_config(meta: Any, name: str) -> dict[str, Any]:
    """``meta`` (a parsed ``config.json`` called ``name`` in errors) when every entry above is
    well formed; else :class:`onebit.io.FileFormatError` naming ``name`` and the entry."""

    def bad(why: str) -> io.FileFormatError:
        return io.FileFormatError(f"{name}: {why} (not a onebit run's or push's config.json, or damaged)")

    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    for key in REQUIRED_ENTRIES:
        if key not in meta:
            raise bad(f"missing entry {key!r}")
    run = meta["config"]
    if not isinstance(run, dict) or not isinstance(run.get("model"), str):
        raise bad("entry 'config' has no model name")
    if not isinstance(run.get("model_kwargs", {}), dict):
        raise bad("entry 'config.model_kwargs' is not an object")
    for key in ("num_classes", "in_channels"):
        if not _is_int_in(meta[key], 1 << 20):
            raise bad(f"entry {key!r} is not a positive integer: {meta[key]!r}")
    size = meta["image_size"]
    if not (isinstance(size, list) and 1 <= len(size) <= 3 and all(_is_int_in(v, 1 << 16) for v in size)):
        raise bad(f"entry 'image_size' is not a list of 1 to 3 positive integers: {size!r}")
    sums = meta.get("sha256")
    if sums is not None and not (
        isinstance(sums, dict) and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in sums.values())
    ):
        raise bad("entry 'sha256' is not an object of SHA-256 hex digests")
    return meta
