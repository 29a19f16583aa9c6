"""Integer thresholds of BatchNorm + sign agree bit for bit with the float ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from onebit.math import sign
from onebit.thresholds import (
    Thresholds,
    accumulator_bound,
    batchnorm_sign_thresholds,
    integer_thresholds,
    thresholds_from_decisions,
)


def _bn(channels: int, weight, bias, mean, var, eps=1e-5) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=eps).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        bn.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        bn.running_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        bn.running_var.copy_(torch.as_tensor(var, dtype=torch.float32))
    return bn


def _check_all_values(bn, bound, scale=None, bias=None, spatial=(3, 5)):
    """Compare thresholds with sign(bn(acc * scale + bias)) on every acc, laid out as a conv output."""
    th = batchnorm_sign_thresholds(bn, bound, scale=scale, bias=bias)
    c = bn.num_features
    acc = torch.arange(-bound, bound + 1, dtype=torch.float32)
    # scatter the values over batch and spatial positions as a conv output would hold them
    h, w = spatial
    per = h * w
    n = (acc.numel() + per - 1) // per
    vals = torch.nn.functional.pad(acc, (0, n * per - acc.numel()), value=0.0)
    x = vals.view(n, 1, h, w).expand(n, c, h, w).contiguous()
    y = x
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    expected = sign(bn(y)) < 0
    got = th.negative(x.to(torch.int32))
    assert torch.equal(got, expected)
    return th


def test_positive_scale_is_direction_up_and_exact():
    bn = _bn(3, [1.0, 2.0, 0.5], [0.0, 0.3, -0.2], [0.5, -3.0, 7.0], [1.0, 4.0, 0.25])
    th = _check_all_values(bn, 27)
    assert th.direction.tolist() == [1, 1, 1]


def test_negative_scale_is_direction_down():
    bn = _bn(2, [-1.0, -0.01], [0.1, 0.0], [2.0, -1.0], [1.0, 3.0])
    th = _check_all_values(bn, 9)
    assert th.direction.tolist() == [-1, -1]


def test_zero_scale_gives_constant_channels():
    bn = _bn(3, [0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    th = _check_all_values(bn, 18)
    acc = torch.arange(-18, 19).view(1, 1, 1, -1).expand(1, 3, 1, 37)
    neg = th.negative(acc)
    assert not neg[0, 0].any() and neg[0, 1].all() and not neg[0, 2].any()  # bias 0 -> +0 -> sign +1


def test_tiny_and_huge_scales():
    bn = _bn(4, [1e-30, -1e-30, 1e30, -1e-38], [0.0, 1e-31, -1e-10, 0.0], [0.5, -0.5, 0.0, 1.0], [1.0, 1.0, 1e-12, 2.0])
    _check_all_values(bn, 64)


def test_zero_crossing_mean_on_an_integer_and_between():
    bn = _bn(4, [1.0, 1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 3.5, -2.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    th = _check_all_values(bn, 9)
    # acc < 3 -> negative; acc < 3.5 -> negative, i.e. acc < 4; acc > -2 -> negative; acc > 0
    assert th.threshold.tolist() == [3, 4, -2, 0]
    assert th.direction.tolist() == [1, 1, -1, -1]


def test_conv_bias_and_magnitude_scale_before_bn():
    torch.manual_seed(0)
    c = 16
    bn = _bn(c, torch.randn(c), torch.randn(c), torch.randn(c) * 5, torch.rand(c) + 0.1)
    _check_all_values(bn, 45, scale=torch.rand(c) * 0.1, bias=torch.randn(c))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(0, 600),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1e-6, 1e-3, 1.0, 1e3]),
)
def test_random_batchnorms_agree_on_every_accumulator(channels, bound, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, generator=g) * magnitude
    weight[torch.rand(channels, generator=g) < 0.2] = 0.0
    bn = _bn(
        channels,
        weight,
        torch.randn(channels, generator=g) * magnitude,
        torch.randn(channels, generator=g) * bound / 2,
        torch.rand(channels, generator=g) * 10 + 1e-6,
        eps=float(torch.rand(1, generator=g)) * 1e-3,
    )
    _check_all_values(bn, bound)


def test_linear_layout_uses_batchnorm1d():
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(5).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.0, 1e-20, 3.0]))
        bn.running_mean.copy_(torch.randn(5) * 10)
    th = batchnorm_sign_thresholds(bn, 100)
    acc = torch.arange(-100, 101, dtype=torch.float32).view(-1, 1).expand(201, 5)
    assert torch.equal(th.negative(acc.to(torch.int32), channel_dim=1), bn(acc) < 0)


def test_non_monotone_decisions_raise():
    with pytest.raises(ValueError, match="channel 0 is not monotone"):
        integer_thresholds(lambda a: torch.cos(a), 1, 10)


def test_decision_table_forms():
    table = torch.tensor([[True, True, False, False], [False, False, False, True], [True] * 4, [False] * 4])
    th = thresholds_from_decisions(table, -1)
    # values -1..2
    assert th.threshold.tolist() == [1, 1, 3, -2]
    assert th.direction.tolist() == [1, -1, 1, 1]
    acc = torch.arange(-1, 3).view(1, 1, -1).expand(1, 4, 4)
    assert torch.equal(th.negative(acc)[0], table)


def test_thresholds_validate_their_fields():
    with pytest.raises(TypeError):
        Thresholds(torch.zeros(2), torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError):
        Thresholds(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))


def test_accumulator_bound():
    assert accumulator_bound(64, 1, (3, 3)) == 576
    assert accumulator_bound(64, 4, (3, 3)) == 144
    assert accumulator_bound(100) == 100
