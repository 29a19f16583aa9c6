"""Large constant tensors in transparent huge pages (``csrc/kernels/huge_pages.h``).

A layer whose weights outgrow the caches (a language model's ``BitLinear``) reads them from memory on
every call. In 4 KiB pages that stream needs a TLB entry, and a restart of the hardware prefetchers,
every 4 KiB; in 2 MiB huge pages one per 2 MiB. :func:`in_huge_pages` copies such a tensor into memory
aligned to 2 MiB whose whole 2 MiB pages are advised as huge pages (Linux ``madvise(MADV_HUGEPAGE)``,
honoured in the kernel's ``madvise`` and ``always`` THP modes). A packed model places its tensors of
2 MiB or more so when it is built or loaded. ``ONEBIT_HUGE_PAGES=0`` in the environment (read at
import) leaves every tensor where it is.
"""

from __future__ import annotations

import os

import torch

from onebit import _C

__all__ = ["HUGE_PAGE", "in_huge_pages"]

#: bytes of an x86-64 / aarch64 transparent huge page; smaller tensors are left where they are
HUGE_PAGE = 2 << 20
_ENABLED = os.environ.get("ONEBIT_HUGE_PAGES", "1").strip() not in ("0", "false", "no", "off")


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a new tensor of the same dtype and shape whose memory starts on a 2 MiB boundary,
    its whole 2 MiB pages advised as huge pages; ``t`` itself when it is under :data:`HUGE_PAGE` bytes,
    not a plain contiguous CPU tensor, or where the advice is not taken (off Linux, THP ``never``,
    ``ONEBIT_HUGE_PAGES=0``)."""
    nbytes = t.numel() * t.element_size()
    if not _ENABLED or nbytes < HUGE_PAGE or type(t) is not torch.Tensor or not t.is_cpu or not t.is_contiguous():
        return t
    buffer, advised = _C.huge_page_buffer(nbytes)
    if not advised:
        return t
    out = buffer.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
