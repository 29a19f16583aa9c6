"""onebit.engine.kernels.plans: a native call's checked plan kept by shape, so that a repeated call
skips the argument check; a bad call is refused before anything is kept."""

from __future__ import annotations

import pytest
import torch

from onebit.engine import ops

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="the native kernels are not built")

CONV = (16, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.0)  # in, out, kernel, stride, padding, dilation, groups, pad


@pytest.fixture
def plans():
    from onebit.engine.kernels import plans

    return plans


def test_a_repeated_conv_call_gets_the_same_plan(plans):
    xp, wp = torch.zeros(2, 6, 6, 1, 1, dtype=torch.int64), torch.zeros(8, 3, 3, 1, dtype=torch.int64)
    plan = plans.conv_plan(plans.MODE_FLOAT, xp, wp, *CONV)
    assert plan.shape == (2, 8, 4, 4) and plan.co == 8
    assert plan.stride == torch.empty(plan.shape).contiguous(memory_format=torch.channels_last).stride()
    assert plans.conv_plan(plans.MODE_FLOAT, xp.clone(), wp, *CONV) is plan
    as_lists = (16, 8, [3, 3], [1, 1], [1, 1], [1, 1], 1, 0.0)
    assert plans.conv_plan(plans.MODE_FLOAT, xp, wp, *as_lists) is plan
    assert plans.conv_plan(plans.MODE_INT, xp, wp, *CONV) is not plan
    assert plans.conv_plan(plans.MODE_FLOAT, xp[:1].contiguous(), wp, *CONV).shape == (1, 8, 4, 4)


def test_a_threshold_plan_has_the_padded_packed_shape(plans):
    xp, wp = torch.zeros(1, 6, 6, 1, 1, dtype=torch.int64), torch.zeros(70, 3, 3, 1, dtype=torch.int64)
    conv = (16, 70, 3, 1, 1, 1, 1, 0.0)
    plan = plans.conv_plan(plans.MODE_THRESHOLD, xp, wp, *conv, (1, 1), -1.0, 2)
    assert plan.shape == (1, 6, 6, 2, 1) and plan.stride is None


def test_a_bad_call_is_refused_by_the_check_and_not_kept(plans, monkeypatch):
    kept = {}
    monkeypatch.setattr(plans, "_CONV_PLANS", kept)
    xp, wp = torch.zeros(2, 6, 6, 1, 1, dtype=torch.int64), torch.zeros(8, 3, 3, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        plans.conv_plan(plans.MODE_INT, xp, wp, *CONV[:6], 3, 0.0)
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        plans.conv_plan(plans.MODE_INT, xp, wp, 16, 8, {3: 3}, 1, 1, 1, 1, 0.0)  # unhashable: checked
    assert not kept
    plans.conv_plan(plans.MODE_INT, xp, wp, *CONV)
    assert len(kept) == 1


def test_a_full_cache_starts_again(plans, monkeypatch):
    kept = {}
    monkeypatch.setattr(plans, "PACK_PLANS", kept)
    monkeypatch.setattr(plans, "CACHE_SIZE", 2)
    for size in (3, 4, 5):
        x = torch.zeros(1, 4, size, size)
        plans.pack_plan(x, (0, 0), 0.0, 1, key=size)
    assert list(kept) == [5]


def test_a_pack_plan_reads_a_tensor_with_neither_channels_nor_pixels_contiguous_from_a_copy(plans):
    x = torch.zeros(2, 70, 4, 5)
    shape, numbers, copy = plans.pack_plan(x, (1, 0), -1.0, 2)
    assert shape == (2, 6, 5, 2, 1) and numbers[-4:] == (1, 0, -1, 2) and not copy
    assert not plans.pack_plan(x.contiguous(memory_format=torch.channels_last), 0, 0.0, 1)[2]
    assert plans.pack_plan(x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), 0, 0.0, 1)[2]  # H innermost


def test_bit_plane_plans_are_kept_by_shape(plans):
    x = torch.zeros(1, 6, 4, 4)
    entry = plans.integer_planes_plan(x, [1, 1], 3, 2, True, 1.0)
    assert entry == ((1, 6, 6, 6, 1), 1, 1)
    assert plans.integer_planes_plan(x.clone(), [1, 1], 3, 2, True, 1.0) is entry
    y = torch.zeros(1, 8, 3, 3, dtype=torch.int32).contiguous(memory_format=torch.channels_last)
    coeff = torch.zeros(2, dtype=torch.int32)
    shape, stride = plans.combine_planes_plan(y, coeff, 2, 1, 1, 1)
    assert shape == (1, 4, 3, 3) and stride == (36, 1, 12, 4)
    with pytest.raises(ValueError, match="channels_last"):
        plans.combine_planes_plan(y.contiguous(), coeff, 2, 1, 1, 1)
