"""The native ternary x int8 kernels on every ISA this CPU runs, against plain integer matmuls.

Shapes cover the kernels' blocking: 1 to 17 tokens (the multi-token row passes take up to four
tokens at a time, the driver eight), output rows across several 64-row blocks with remainders,
features with several 256-feature chunks and a tail, and the extreme codes and activations (every
weight +1 against -128, the largest in-place plane products). The bound layer a packed model's
BitLinear steps call is the op, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import bitlinear
from onebit.engine import kernels as K
from onebit.engine import ops

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="no native kernels")


def levels_of(out: int, features: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (out, features), generator=gen).to(torch.float32)


def integer_matmul(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return x.long() @ levels.long().T


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17])
@pytest.mark.parametrize(("out", "features"), [(67, 300), (131, 1024 + 77), (5, 512)])
def test_int_kernel_is_the_integer_matmul_for_every_token_count(isa, tokens, out, features):
    gen = torch.Generator().manual_seed(1000 * tokens + out)
    levels = levels_of(out, features, gen)
    x = torch.randint(-128, 128, (tokens, features), generator=gen, dtype=torch.int8)
    got = K.ternary_linear_int(x, ops.pack_ternary_weights(levels), in_features=features)
    assert torch.equal(got.long(), integer_matmul(x, levels))


@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("level", [1.0, -1.0])
def test_int_kernel_is_exact_at_the_extremes(isa, tokens, level):
    features, out = 1024, 70
    levels = torch.full((out, features), level)
    levels[::3] = 0.0
    x = torch.full((tokens, features), -128, dtype=torch.int8)
    x[:, 1::2] = 127
    x[tokens // 2 :] = -128
    got = K.ternary_linear_int(x, ops.pack_ternary_weights(levels), in_features=features)
    assert torch.equal(got.long(), integer_matmul(x, levels))


@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 9])
def test_float_kernel_rounds_as_bitlinear_for_every_token_count(isa, tokens):
    features, out = 768 + 5, 129
    gen = torch.Generator().manual_seed(tokens)
    levels = levels_of(out, features, gen)
    x = torch.randn(tokens, features, generator=gen) * 2
    scale, bias = torch.rand(out, generator=gen), torch.randn(out, generator=gen)
    got = K.ternary_linear(x, ops.pack_ternary_weights(levels), in_features=features, scale=scale, bias=bias)
    assert torch.equal(got, bitlinear(x, levels, scale, bias))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_prefill_split_between_threads_rounds_as_bitlinear(isa, threads):
    features, out, tokens = 2048, 96, 40  # tokens quantized and permuted on both threads (>= 2^16 elements)
    gen = torch.Generator().manual_seed(11)
    levels = levels_of(out, features, gen)
    x = torch.randn(tokens, features, generator=gen) * torch.exp(torch.randn(tokens, 1, generator=gen))
    x[7, 100] = float("nan")  # one token's row is NaN, wherever its thread
    scale = torch.rand(out, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = K.ternary_linear(x, ops.pack_ternary_weights(levels), in_features=features, scale=scale)
    finally:
        torch.set_num_threads(before)
    want = bitlinear(x, levels, scale)
    want[7] = float("nan")
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_two_threads_give_the_one_thread_integers(isa):
    features, out, tokens = 1024, 1000, 3  # above the serial threshold (2^21 products)
    gen = torch.Generator().manual_seed(7)
    levels = levels_of(out, features, gen)
    x = torch.randint(-128, 128, (tokens, features), generator=gen, dtype=torch.int8)
    wp = ops.pack_ternary_weights(levels)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = K.ternary_linear_int(x, wp, in_features=features)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got.long(), integer_matmul(x, levels))


@pytest.mark.parametrize("tokens", [0, 1, 3, 9])
@pytest.mark.parametrize("epilogue", ["none", "scale", "scale+bias"])
def test_bound_layer_is_the_op_bit_for_bit(tokens, epilogue):
    features, out = 300, 70
    gen = torch.Generator().manual_seed(tokens + 5)
    wp = ops.pack_ternary_weights(levels_of(out, features, gen))
    scale = torch.rand(out, generator=gen) if epilogue != "none" else None
    bias = torch.randn(out, generator=gen) if epilogue == "scale+bias" else None
    layer = K.TernaryLayer(wp, in_features=features, scale=scale, bias=bias)
    x = torch.randn(tokens, features, generator=gen)
    want = K.ternary_linear(x, wp, in_features=features, scale=scale, bias=bias)
    assert torch.equal(layer(x), want)
    strided = torch.randn(tokens, 2 * features, generator=gen)[:, ::2]  # a strided view takes the op
    assert torch.equal(layer(strided), K.ternary_linear(strided, wp, in_features=features, scale=scale, bias=bias))


def test_bound_layer_checks_its_operands_once_and_its_input_each_call():
    wp = torch.zeros(4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="packed ternary weight wp"):
        K.TernaryLayer(wp, in_features=20)
    with pytest.raises(ValueError, match="scale"):
        K.TernaryLayer(wp, in_features=10, scale=torch.ones(5))
    layer = K.TernaryLayer(wp, in_features=10)
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.zeros(2, 10, dtype=torch.float64))


def test_packed_bitlinear_runs_the_bound_layer_natively_and_the_reference_on_request():
    from torch import nn

    import onebit.engine
    from onebit.nn import BitLinear

    torch.manual_seed(3)
    layer = BitLinear(300, 70).eval()
    packed = onebit.engine.pack(nn.Sequential(layer), torch.randn(2, 300))
    x = torch.randn(5, 300)
    with torch.no_grad():
        want = layer(x)
        assert torch.equal(packed(x), want)
        with ops.use_backend("reference"):
            assert torch.equal(packed(x), want)
        copied = copy.deepcopy(packed)
        assert torch.equal(copied(x), want)
