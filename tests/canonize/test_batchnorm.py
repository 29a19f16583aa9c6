"""onebit.batchnorm: an eval-mode BatchNorm as the affine map ``x * s + t``, in float64.

``g = gamma / sqrt(var + eps)``, ``s = scale * g``, ``t = (bias - mean) * g + beta``; the
canonizers' merge and the engine's ``fold_batchnorm`` both take it from here.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit.batchnorm import batchnorm_affine
from onebit.canonize import merge
from onebit.engine.fuse.batchnorm import folded_scale_bias


def _batchnorm(c: int = 16, affine: bool = True, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, affine=affine, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


@pytest.mark.parametrize("affine", [True, False])
def test_the_affine_map_is_the_batchnorm(affine):
    bn = _batchnorm(affine=affine).double()
    x = torch.randn(4, 16, 3, 3, dtype=torch.float64)
    s, t = batchnorm_affine(bn)
    assert s.dtype == t.dtype == torch.float64
    torch.testing.assert_close(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), bn(x), rtol=1e-12, atol=1e-12)


def test_after_a_scale_and_a_bias():
    bn = _batchnorm().double()
    scale, bias = torch.rand(16, dtype=torch.float64) + 0.5, torch.randn(16, dtype=torch.float64)
    x = torch.randn(4, 16, 3, 3, dtype=torch.float64)
    s, t = batchnorm_affine(bn, scale, bias)
    want = bn(x * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    torch.testing.assert_close(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), want, rtol=1e-12, atol=1e-12)


def test_each_value_rounds_as_documented():
    bn = _batchnorm()
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma, beta, mean = bn.weight.double(), bn.bias.double(), bn.running_mean.double()
    s, t = batchnorm_affine(bn)
    assert torch.equal(s, gamma / std) and torch.equal(t, -mean * s + beta)
    s, t = batchnorm_affine(bn, reciprocal=True)
    assert torch.equal(s, gamma * (1.0 / std)) and torch.equal(t, -mean * s + beta)
    scale, bias = torch.rand(16) + 0.5, torch.randn(16)
    s, t = batchnorm_affine(bn, scale, bias)
    g = gamma / std
    assert torch.equal(s, scale.double() * g) and torch.equal(t, (bias.double() - mean) * g + beta)


def test_one_division_and_the_reciprocal_can_differ_in_the_last_bit():
    bn = nn.BatchNorm1d(4096, affine=True).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(4096, generator=torch.Generator().manual_seed(3)) + 0.5)
        bn.weight.copy_(torch.rand(4096, generator=torch.Generator().manual_seed(4)) + 0.5)
    divided, _ = batchnorm_affine(bn)
    multiplied, _ = batchnorm_affine(bn, reciprocal=True)
    assert not torch.equal(divided, multiplied)
    torch.testing.assert_close(divided, multiplied, rtol=1e-15, atol=0)


def test_without_gamma_or_beta():
    bn = _batchnorm(affine=False)
    s, t = batchnorm_affine(bn)
    assert torch.equal(s, 1.0 / torch.sqrt(bn.running_var.double() + bn.eps))
    assert torch.equal(t, -bn.running_mean.double() * s)
    assert torch.equal(batchnorm_affine(bn, reciprocal=True)[0], s)


def test_merge_and_the_engine_use_it():
    bn = _batchnorm()
    s, t = merge._bn_affine(bn)
    want = batchnorm_affine(bn, reciprocal=True)
    assert torch.equal(s, want[0]) and torch.equal(t, want[1])
    scale = torch.rand(16) + 0.5
    new_scale, new_bias = folded_scale_bias(bn, scale, None)
    s, t = batchnorm_affine(bn, scale, torch.zeros(16, dtype=torch.float64))
    assert new_scale.dtype == torch.float32 and torch.equal(new_scale, s.float()) and torch.equal(new_bias, t.float())
    x = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(
        x * new_scale.view(1, -1, 1, 1) + new_bias.view(1, -1, 1, 1),
        F.batch_norm(
            x * scale.view(1, -1, 1, 1), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0, bn.eps
        ),
    )
