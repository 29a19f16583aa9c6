"""A layer's weights prepared for the native kernels, kept between calls (:class:`WeightCache`)."""

from __future__ import annotations

import torch

from onebit import _C

__all__ = ["PROBE_WORDS", "WeightCache", "usable_cache", "cache_state"]

#: words of a packed weight a :class:`WeightCache` reads on every call to notice writes that
#: bypass the tensor's version counter (all of them for a layer this small or smaller)
PROBE_WORDS = _C.WeightCache.PROBE_WORDS


class WeightCache(_C.WeightCache):
    """One layer's weights prepared for the kernels, kept between calls.

    A call reuses the prepared weights when it gets the same tensor (address) in the same
    state. The state is the tensor's version counter, which every write through torch bumps
    (in-place ops on it or on any view of it, ``copy_``, indexing, ``load_state_dict``,
    optimizer steps, writes under ``no_grad``), combined with a fingerprint of
    :data:`PROBE_WORDS` of its words (evenly spaced, the first and the last included), read
    by every native call (a fraction of a microsecond). So:

    - every write through torch is seen;
    - every write through an alias that bypasses the counter (``t.data``, ``t.numpy()``,
      DLPack, a raw pointer) is seen when the tensor has at most ``PROBE_WORDS`` words, or
      when it changes a probed word: any write to the whole tensor (``t.data.bitwise_not_()``,
      ``t.data.copy_(other)``, ``t.numpy()[:] = ...``, ``fill_``/``zero_``) does;
    - a write of a few words through such an alias in a larger tensor may go unseen: call
      :meth:`clear` after it (a ``PackedModel`` rebuilds all its caches on ``.to()`` or copy).
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleared = 0

    def clear(self) -> None:
        """Forget the prepared weights: the next call prepares them again."""
        self._cleared += 1

    def state(self, wp: torch.Tensor) -> int:
        """The caller's part of the state the native cache compares: the version counter and the
        number of :meth:`clear` calls (the native call adds the fingerprint of the probed words;
        raises ``RuntimeError`` for inference tensors, which count no writes)."""
        return hash((wp._version, self._cleared))


def _check(cache) -> None:
    if not isinstance(cache, WeightCache):
        raise ValueError(f"cache must be a onebit.engine.kernels.WeightCache, got {type(cache).__name__}")


def usable_cache(cache, wp: torch.Tensor) -> WeightCache | None:
    """``cache`` when it can follow the writes to ``wp``; None for no cache or an inference tensor
    (it counts no writes: its preparation is never kept). ``ValueError`` for anything but a WeightCache."""
    if cache is None:
        return None
    _check(cache)
    try:
        _ = wp._version  # reading it raises for an inference tensor
    except RuntimeError:
        return None
    return cache


def cache_state(cache, wp: torch.Tensor) -> tuple[WeightCache | None, int]:
    """``(cache, state of wp)`` for a native call, or ``(None, 0)`` when ``wp``'s writes cannot be tracked."""
    if cache is None:
        return None, 0
    _check(cache)
    try:
        return cache, cache.state(wp)
    except RuntimeError:  # inference tensors count no writes: never cache them
        return None, 0
