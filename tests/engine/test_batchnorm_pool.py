"""A BatchNorm before a max pool (a ResNet stem's), fused: the native pool takes the max of the raw
values where the BatchNorm's scale is positive and the min where it is negative, then applies the
BatchNorm to the pooled values only. Specified against the model (torch's BatchNorm, then torch's
``max_pool2d``), bit for bit, signed zeros included, with NaNs and infinities, on every ISA; and the
BatchNorms whose zeros could take two signs stay a step of their own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import float_bits
from exported_programs import gives_in_fresh_process, saved_and_loaded
from onebit import engine
from onebit.engine import ops, torch_rounding
from onebit.engine.graph.floats import batchnorm_before_pool

native = pytest.mark.skipif(not ops.native_available(), reason="no native kernels")


def stem(seed: int, *, weight=None, bias=None) -> nn.Module:
    """conv 7x7/2 -> BatchNorm -> max pool 3x3/2, the BatchNorm's scales of both signs."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 24, 7, 2, 3, bias=False), nn.BatchNorm2d(24), nn.MaxPool2d(3, 2, 1))
    bn = model[1]
    bn.weight.data = torch.randn(24) if weight is None else weight
    bn.bias.data = torch.randn(24) if bias is None else bias
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def pool_after_batchnorm(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """BatchNorm -> max pool on the input itself (mean 0, var 1): its values reach the pool unchanged."""
    model = nn.Sequential(nn.BatchNorm2d(len(weight), eps=0.0), nn.MaxPool2d(2, 2))
    model[0].weight.data, model[0].bias.data = weight, bias
    return model.eval()


def run(model, packed, x):
    with torch.no_grad():
        return model(x), packed(x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_pooled_batchnorm_is_the_models(engine_backend, channels_last):
    model = stem(0)
    x = torch.randn(2, 3, 40, 36)
    x[1, 0, 7, 7] = float("nan")
    x[0, 1, 3:5, 3:5] = float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = engine.pack(model, x)
    if ops.native_available():
        assert [step.label for step in packed._steps] == ["conv2d", "batch_norm+max_pool2d"]
    want, got = run(model, packed, x)
    assert bool(want.isnan().any()) and torch.equal(float_bits(got), float_bits(want))


@native
def test_zeros_of_both_signs_in_the_input(isa):
    """A shift of +0.0 (a BatchNorm as initialised) with both zeros, NaNs and infinities in the windows."""
    weight, bias = torch.tensor([1.0, -1.0, 2.0, -0.75]), torch.zeros(4)
    model = pool_after_batchnorm(weight, bias)
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 3.0])
    x = values[torch.randint(0, 8, (2, 4, 16, 16), generator=torch.Generator().manual_seed(3))]
    x = x.contiguous(memory_format=torch.channels_last)  # a native pool even at this size
    packed = engine.pack(model, x)
    assert [step.label for step in packed._steps] == ["batch_norm+max_pool2d"]
    want, got = run(model, packed, x)
    assert torch.equal(float_bits(got), float_bits(want))


def test_the_condition_names_the_cases_that_would_differ():
    one = torch.ones(3)
    assert batchnorm_before_pool(torch.tensor([1.0, -2.0, 0.1]), torch.tensor([0.5, -1.0, 3.0]), True)
    assert not batchnorm_before_pool(torch.tensor([1.0, 0.0, 1.0]), one, False)  # a constant channel
    assert not batchnorm_before_pool(one, torch.tensor([0.0, float("inf"), 0.0]), False)
    assert not batchnorm_before_pool(torch.tensor([1.0, float("nan"), 1.0]), one, False)
    assert not batchnorm_before_pool(one, torch.tensor([1.0, -0.0, 1.0]), False)  # -0.0 + -0.0 = -0.0
    small = torch.tensor([0.25, 1.0, 1.0])
    assert batchnorm_before_pool(small, torch.zeros(3), False)  # fl(x a) + 0.0: every zero +0.0
    assert not batchnorm_before_pool(small, torch.zeros(3), True)  # fma(x, 0.25, 0): a tiny x a rounds to -0.0


@native
def test_a_minus_zero_shift_stays_unfused_and_exact():
    """bias -0.0 and mean 0 give a shift of -0.0: +0.0 and -0.0 inputs give zeros of two signs, and
    torch's pool keeps the first of a window's; the pool stays its own step and the bits match."""
    model = pool_after_batchnorm(torch.ones(2), torch.tensor([-0.0, -0.0]))
    x = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (1, 2, 32, 32), generator=torch.Generator().manual_seed(1))]
    x = x.contiguous(memory_format=torch.channels_last)
    packed = engine.pack(model, x)
    assert "batch_norm+max_pool2d" not in [step.label for step in packed._steps]
    want, got = run(model, packed, x)
    zeros = want[want == 0]
    assert bool(torch.signbit(zeros).any()) and not bool(torch.signbit(zeros).all())  # the case is real
    assert torch.equal(float_bits(got), float_bits(want))


@native
def test_a_tiny_scale_with_a_fused_multiply_add_stays_unfused_and_exact():
    """With torch rounding its BatchNorm once, fma(x, 0.25, +0.0) of a tiny negative x is -0.0 and of
    +0.0 is +0.0."""
    model = pool_after_batchnorm(torch.full((2,), 0.25), torch.zeros(2))
    fused = torch_rounding.batchnorm_epilogue(
        model[0].running_mean, model[0].running_var, model[0].weight, model[0].bias, 0.0
    )
    if fused is None or not fused[2]:
        pytest.skip("torch rounds this BatchNorm twice here: the case does not arise")
    tiny = torch.tensor([0.0, -1e-45])
    x = tiny[torch.randint(0, 2, (1, 2, 32, 32), generator=torch.Generator().manual_seed(2))]
    x = x.contiguous(memory_format=torch.channels_last)
    packed = engine.pack(model, x)
    assert "batch_norm+max_pool2d" not in [step.label for step in packed._steps]
    want, got = run(model, packed, x)
    assert torch.equal(float_bits(got), float_bits(want))


@native
def test_the_fused_stem_exports_and_loads_in_a_fresh_process(tmp_path):
    model = stem(4)
    x = torch.randn(2, 3, 40, 36)
    packed = engine.pack(model, x)
    program = torch.export.export(packed, (x,))
    loaded = saved_and_loaded(program, tmp_path / "stem.pt2")
    with torch.no_grad():
        want = model(x)
        assert torch.equal(float_bits(loaded(x)), float_bits(want))
    result = gives_in_fresh_process(tmp_path / "stem.pt2", x, want)
    assert result.returncode == 0, result.stderr
