"""Keep freed memory in the process heap, so large tensors stop costing page faults.

PyTorch's CPU allocator is the C library's ``malloc``. With glibc's defaults, every
block above a dynamic threshold comes from a fresh ``mmap`` and goes back to the
kernel when freed, so each new activation, gradient or engine output of a few MB pays
one page fault per 4 KiB page on first touch (about 2 µs each here): a quarter of a
binary network's training step, and most of a large packed convolution. Raising the
``mmap`` threshold to its maximum (32 MiB) and never trimming the heap keeps freed
blocks for reuse, as jemalloc or tcmalloc would.

:func:`keep_freed_memory` applies this with ``mallopt`` (glibc only; elsewhere it does
nothing). It changes the whole process, so the library never calls it on import: the
``onebit`` command does, for ``train``, ``eval``, ``bench`` and ``demo``. The price is
that the process keeps its peak heap size until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit systems
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Set glibc's ``mmap`` threshold to 32 MiB and switch heap trimming off.

    Returns True when both settings were accepted, False where ``mallopt`` is not
    available (not Linux/glibc) or refused them."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
