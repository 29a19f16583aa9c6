"""onebit.engine.kernels.weight_cache: which cache a native call may use, and the state it compares."""

from __future__ import annotations

import pytest
import torch

from onebit.engine import ops

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="the native kernels are not built")


def test_a_cache_follows_plain_weights_and_refuses_other_objects():
    from onebit.engine.kernels.weight_cache import WeightCache, usable_cache

    wp, cache = torch.zeros(4, 1, dtype=torch.int64), WeightCache()
    assert usable_cache(None, wp) is None
    assert usable_cache(cache, wp) is cache
    with pytest.raises(ValueError, match="cache must be a onebit.engine.kernels.WeightCache, got dict"):
        usable_cache({}, wp)


def test_inference_tensors_are_never_cached():
    from onebit.engine.kernels.weight_cache import WeightCache, cache_state, usable_cache

    with torch.inference_mode():
        wp = torch.zeros(4, 1, dtype=torch.int64)
    cache = WeightCache()
    assert usable_cache(cache, wp) is None and cache_state(cache, wp) == (None, 0)


def test_the_state_changes_with_every_write_through_torch_and_every_clear():
    from onebit.engine.kernels.weight_cache import WeightCache, cache_state

    wp, cache = torch.zeros(4, 1, dtype=torch.int64), WeightCache()
    assert cache_state(None, wp) == (None, 0)
    got, first = cache_state(cache, wp)
    assert got is cache and cache_state(cache, wp)[1] == first
    wp[0] = 1
    written = cache_state(cache, wp)[1]
    cache.clear()
    cleared = cache_state(cache, wp)[1]
    assert len({first, written, cleared}) == 3
