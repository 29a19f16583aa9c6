"""A BatchNorm after a binary conv runs in the conv's epilogue, rounded as this process's torch
rounds it: the packed model stays bit-identical to the model whatever torch kernel runs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onebit.models
from onebit import engine
from onebit.engine import kernels as K
from onebit.engine import ops, torch_rounding

needs_native = pytest.mark.skipif(not ops.native_available(), reason="the native kernels are not built")


def random_batchnorm(channels: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g) * 20)
        bn.running_var.copy_(torch.rand(channels, generator=g) * 50 + 0.01)
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
    return bn


def test_this_torch_rounds_batchnorm_once_or_twice():
    assert torch_rounding.batchnorm_rounding() in ("fma", "mul_add")


@pytest.mark.parametrize("bias", [-0.0, 0.0])
@pytest.mark.parametrize("weight", [1.0, -1.0])
def test_the_replica_keeps_the_sign_of_a_zero_shift(bias, weight):
    """With mean 0 the shift is the bias, +0.0 or -0.0: torch's BatchNorm of a signed zero shows which,
    and ``x * scale + shift`` gives the same bits."""
    mean, var = torch.zeros(2), torch.ones(2)
    w, b = torch.full((2,), weight), torch.full((2,), bias)
    fused = torch_rounding.batchnorm_epilogue(mean, var, w, b, 0.0)
    if fused is None:
        pytest.skip("torch's BatchNorm rounding is not reproducible here")
    scale, shift, fma = fused
    x = torch.tensor([0.0, -0.0, 1.0, -1.0]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    want = F.batch_norm(x, mean, var, w, b, False, 0.0, 0.0)
    got = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)  # exact here: one rounding or two agree
    assert torch.equal(torch.signbit(got), torch.signbit(want)) and torch.equal(got, want)


@needs_native
@pytest.mark.parametrize("channels", [1, 5, 16, 67, 256])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_conv_epilogue_equals_torchs_batchnorm_of_the_conv_output(channels, channels_last):
    bn = random_batchnorm(channels, seed=channels)
    scale, shift, fused = torch_rounding.batchnorm_epilogue(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 24, 9, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wp = K.pack_weights(torch.randn(channels, 24, 3, 3, generator=g))
    conv = dict(in_channels=24, out_channels=channels, kernel_size=3, padding=1)
    conv_scale = torch.rand(channels, generator=g) + 0.1
    y = K.binary_conv2d(x, wp, scale=conv_scale, **conv)
    want = F.batch_norm(
        y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format),
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        False,
        0.0,
        bn.eps,
    )
    got = K.binary_conv2d(x, wp, scale=conv_scale, bn_scale=scale, bn_shift=shift, bn_fma=fused, **conv)
    assert torch.equal(got, want)


@needs_native
def test_bireal_blocks_run_conv_batchnorm_and_add_as_one_step_bit_identical():
    model = onebit.models.create("birealnet_small", num_classes=10, in_channels=1).eval()
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.load_state_dict(random_batchnorm(m.num_features, seed=i).state_dict())
    x = torch.randn(3, 1, 28, 28)
    packed = engine.pack(model, x)
    steps = [row["op"] for row in packed.profile(x, repeat=1)]
    assert "pack+binary_conv2d+batch_norm+add" in steps
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        assert torch.equal(packed(xl), model(xl))


@needs_native
def test_a_batchnorm_that_cannot_be_reproduced_stays_torchs_op(monkeypatch):
    monkeypatch.setattr(torch_rounding, "batchnorm_epilogue", lambda *args: None)
    model = onebit.models.create("birealnet_small", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 28, 28)
    packed = engine.pack(model, x)
    steps = [row["op"] for row in packed.profile(x, repeat=1)]
    assert not any("+batch_norm" in s for s in steps) and "batch_norm" in steps
    assert torch.equal(packed(x), model(x))


@needs_native
def test_torchs_default_kernel_rounding_is_found_and_the_packed_model_follows():
    # torch's default CPU kernel is what a machine without AVX2 runs: a fresh process. On x86-64 it
    # rounds twice (no FMA); elsewhere the compiler may fuse it (gcc on aarch64 does), so there the
    # rounding found is only required to be one of the two, and the packed model to follow it.
    code = """
import torch, onebit.models
from torch import nn
from onebit import engine
from onebit.engine import torch_rounding
torch.manual_seed(0)
model = onebit.models.create("birealnet_small", num_classes=10, in_channels=1).eval()
for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
        m.running_mean.normal_(0, 5); m.running_var.uniform_(0.1, 9); m.weight.data.normal_(); m.bias.data.normal_()
x = torch.randn(2, 1, 28, 28)
packed = engine.pack(model, x)
steps = [row["op"] for row in packed.profile(x, repeat=1)]
print(torch_rounding.batchnorm_rounding(), "pack+binary_conv2d+batch_norm+add" in steps, \
torch.equal(packed(x), model(x)))
"""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rounding, fused_step, equal = out.stdout.split()
    assert rounding == "mul_add" if platform.machine() in ("x86_64", "AMD64") else rounding in ("fma", "mul_add")
    assert (fused_step, equal) == ("True", "True")
