"""onebit.engine.ops: each op, native and reference, equals an independent reference, and refuses a bad
argument with the same message on both backends.

The references are plain torch float64 ops on the +-1 values (exact for these integer sums) and
bit-by-bit packing: sign(x) = -1 iff x < 0 (so sign(0) = +1), bit set = -1, channel c of a group
in word c // 64, bit c % 64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import bitlinear
from onebit.engine import ops

BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif(not ops.native_available(), reason="no native kernels")),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


def signs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -1.0, 1.0).to(torch.float64)


def pack_bits(negative: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """bool ``[N, C, H, W]`` (True = -1) -> int64 ``[N, H, W, G, Wg]``, one bit at a time."""
    n, c, h, w = negative.shape
    cg = c // groups
    words = (cg + 63) // 64
    out = torch.zeros(n, h, w, groups, words, dtype=torch.int64)
    for g in range(groups):
        for ch in range(cg):
            bit = negative[:, g * cg + ch].to(torch.int64) << (ch % 64)  # bit 63 wraps to the sign bit
            out[:, :, :, g, ch // 64] |= bit
    return out


def packed(x: torch.Tensor, padding=(0, 0), pad_value=0.0, groups=1) -> torch.Tensor:
    ph, pw = padding
    return pack_bits(F.pad(x < 0, (pw, pw, ph, ph), value=pad_value < 0), groups)


def conv_of_signs(x, w, stride, padding, dilation, groups, pad_value) -> torch.Tensor:
    ph, pw = padding
    xs = F.pad(signs(x), (pw, pw, ph, ph), value=float(pad_value))
    return F.conv2d(xs, signs(w), stride=stride, dilation=dilation, groups=groups)


def thresholded(acc, thresholds, direction) -> torch.Tensor:
    """bool: the sign -1 of the channel's threshold rule (direction +1: acc < thr; -1: acc > thr)."""
    thr = thresholds.view(1, -1, 1, 1).to(torch.float64)
    up = (direction > 0).view(1, -1, 1, 1)
    return torch.where(up, acc < thr, acc > thr)


def random_thresholds(channels, bound, gen):
    thresholds = torch.randint(-bound, bound + 1, (channels,), generator=gen, dtype=torch.int32)
    direction = torch.where(torch.rand(channels, generator=gen) < 0.5, 1, -1).to(torch.int8)
    return thresholds, direction


CONVS = [  # (N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups, pad_value)
    (2, 16, 8, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.0),
    (1, 130, 70, 5, 5, (3, 1), (2, 1), (1, 0), (1, 1), 2, -1.0),
    (3, 12, 6, 9, 8, (2, 3), (1, 2), (0, 2), (2, 1), 3, 1.0),
]


def conv_case(case, seed):
    n, c, co, h, w, kernel, stride, padding, dilation, groups, pad_value = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(co, c // groups, *kernel, generator=gen)
    conv = dict(
        in_channels=c,
        out_channels=co,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        pad_value=pad_value,
    )
    expected = conv_of_signs(x, weight, stride, padding, dilation, groups, pad_value)
    return x, weight, conv, expected, gen


# ---------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("padding,pad_value,groups", [((0, 0), 0.0, 1), ((1, 2), -1.0, 2), ((2, 0), 1.0, 5)])
def test_pack_activations_sets_a_bit_for_each_negative(backend, padding, pad_value, groups):
    x = torch.randn(2, 130, 5, 4)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    x[0, 1, 0, 0] = -0.0
    got = ops.pack_activations(x.transpose(2, 3).contiguous().transpose(2, 3), padding, pad_value, groups)
    assert torch.equal(got, packed(x, padding, pad_value, groups))


def test_pack_features_and_weights(backend):
    x = torch.randn(3, 100)
    assert torch.equal(ops.pack_features(x), pack_bits(x[:, :, None, None] < 0).view(3, 2))
    w = torch.randn(8, 20, 3, 3, dtype=torch.float64)  # packed from its float32 signs
    assert torch.equal(ops.pack_weights(w), pack_bits(w < 0).view(8, 3, 3, 1))
    assert torch.equal(ops.pack_weights(w[:, :, 0, 0]), pack_bits(w[:, :, :1, :1] < 0).view(8, 1))


# ---------------------------------------------------------------------------
# binary convolutions


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("float_input", [False, True])
def test_binary_conv2d_int_is_the_conv_of_the_signs(backend, case, float_input):
    x, weight, conv, expected, _ = conv_case(case, 1)
    wp = ops.pack_weights(weight, conv["groups"])
    xp = x if float_input else ops.pack_activations(x, conv["padding"], conv["pad_value"], conv["groups"])
    got = ops.binary_conv2d_int(xp, wp, **conv)
    assert got.dtype == torch.int32 and torch.equal(got.to(torch.float64), expected)


@pytest.mark.parametrize("case", CONVS)
def test_binary_conv2d_applies_scale_bias_batchnorm_and_shortcut_in_float32(backend, case):
    x, weight, conv, expected, gen = conv_case(case, 2)
    co = conv["out_channels"]
    scale, bias = torch.rand(co, generator=gen) + 0.5, torch.randn(co, generator=gen)
    bn_scale, bn_shift = torch.randn(co, generator=gen), torch.randn(co, generator=gen)
    residual = torch.randn(expected.shape, generator=gen)
    got = ops.binary_conv2d(
        x,
        ops.pack_weights(weight, conv["groups"]),
        scale=scale,
        bias=bias,
        bn_scale=bn_scale,
        bn_shift=bn_shift,
        residual=residual,
        cache=ops.weight_cache() if backend == "native" else None,
        **conv,
    )
    channel = (1, -1, 1, 1)
    want = expected.to(torch.float32) * scale.view(channel) + bias.view(channel)
    want = want * bn_scale.view(channel) + bn_shift.view(channel) + residual
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("out_padding,out_pad_value,out_groups", [((0, 0), 0.0, 1), ((1, 1), -1.0, 2)])
def test_binary_conv2d_threshold_packs_the_thresholded_accumulators(
    backend, case, out_padding, out_pad_value, out_groups
):
    x, weight, conv, expected, gen = conv_case(case, 3)
    thresholds, direction = random_thresholds(conv["out_channels"], 6, gen)
    got = ops.binary_conv2d_threshold(
        x,
        ops.pack_weights(weight, conv["groups"]),
        thresholds=thresholds,
        direction=direction == -1,  # a bool direction: True is "negate above"
        out_padding=out_padding,
        out_pad_value=out_pad_value,
        out_groups=out_groups,
        **conv,
    )
    ph, pw = out_padding
    negative = F.pad(thresholded(expected, thresholds, direction), (pw, pw, ph, ph), value=out_pad_value < 0)
    assert torch.equal(got, pack_bits(negative, out_groups))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_threshold_pack_packs_the_rule_of_each_channel(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    acc = torch.randint(-9, 10, (2, 70, 3, 4), generator=gen).to(dtype)
    thresholds, direction = random_thresholds(70, 9, gen)
    got = ops.threshold_pack(acc, thresholds.long(), direction.int(), out_padding=1, out_pad_value=1.0, out_groups=2)
    negative = F.pad(thresholded(acc.double(), thresholds, direction), (1, 1, 1, 1), value=False)
    assert torch.equal(got, pack_bits(negative, 2))


# ---------------------------------------------------------------------------
# linear layers


@pytest.mark.parametrize("features,out", [(1, 3), (64, 5), (100, 70)])
def test_binary_linear_ops_are_the_matmul_of_the_signs(backend, features, out):
    gen = torch.Generator().manual_seed(features)
    x, weight = torch.randn(4, features, generator=gen), torch.randn(out, features, generator=gen)
    xp, wp = ops.pack_features(x), ops.pack_weights(weight)
    acc = signs(x) @ signs(weight).T  # [N, Out]
    assert torch.equal(ops.binary_linear_int(xp, wp, in_features=features).double(), acc)
    scale, bias = torch.rand(out, generator=gen), torch.randn(out, generator=gen)
    got = ops.binary_linear(xp, wp, in_features=features, scale=scale, bias=bias)
    assert torch.equal(got, acc.float() * scale + bias)
    thresholds, direction = random_thresholds(out, features, gen)
    got = ops.binary_linear_threshold(xp, wp, in_features=features, thresholds=thresholds, direction=direction)
    negative = thresholded(acc[:, :, None, None], thresholds, direction)
    assert torch.equal(got, pack_bits(negative).view(4, -1))


# ---------------------------------------------------------------------------
# max pooling on bits


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation,ceil_mode,groups",
    [(2, 2, 0, 1, False, 1), (3, 2, 1, 1, True, 2), (3, 1, 1, 2, False, 1), ((2, 3), (1, 2), (1, 1), 1, True, 3)],
)
def test_max_pool_bits_is_the_thresholded_max_pool_of_the_accumulators(
    backend, kernel, stride, padding, dilation, ceil_mode, groups
):
    gen = torch.Generator().manual_seed(5)
    c = 66 * groups
    acc = torch.randint(-20, 21, (2, c, 7, 8), generator=gen).double()
    thresholds, direction = random_thresholds(c, 15, gen)
    bits = pack_bits(thresholded(acc, thresholds, direction), groups)
    or_mask = pack_bits((direction == -1).view(1, c, 1, 1), groups).view(groups, -1)
    pad_words = pack_bits(torch.rand(1, c, 1, 1, generator=gen) < 0.5, groups).view(groups, -1)
    got = ops.max_pool_bits(
        bits,
        or_mask,
        pad_words,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
        out_padding=(1, 2),
        channels=c,
    )
    pooled = F.max_pool2d(acc, kernel, stride, padding, dilation, ceil_mode)
    want = pack_bits(thresholded(pooled, thresholds, direction), groups)
    n, oh, ow = want.shape[:3]
    assert got.shape == (n, oh + 2, ow + 4, groups, want.shape[-1])
    assert torch.equal(got[:, 1:-1, 2:-2], want)
    border = torch.ones(got.shape[:3], dtype=torch.bool)
    border[:, 1:-1, 2:-2] = False
    assert bool((got[border] == pad_words).all())


# ---------------------------------------------------------------------------
# ternary weights x int8 activations (BitLinear)


def ternary_levels(out, features, gen):
    return torch.randint(-1, 2, (out, features), generator=gen).to(torch.float32)


def test_pack_ternary_weights_writes_four_codes_a_byte():
    levels = ternary_levels(3, 10, torch.Generator().manual_seed(6))
    wp = ops.pack_ternary_weights(levels)
    assert wp.dtype == torch.uint8 and wp.shape == (3, 3)
    for o in range(3):
        for k in range(10):
            assert (int(wp[o, k // 4]) >> (2 * (k % 4))) & 3 == int(levels[o, k]) + 1
        assert int(wp[o, 2]) >> 4 == 0  # the unused codes of the last byte


@pytest.mark.parametrize("features", [1, 10, 300])
def test_ternary_linear_int_is_the_integer_matmul(backend, features):
    gen = torch.Generator().manual_seed(features)
    levels = ternary_levels(7, features, gen)
    x = torch.randint(-128, 128, (5, features), generator=gen, dtype=torch.int8)
    got = ops.ternary_linear_int(x, ops.pack_ternary_weights(levels), in_features=features)
    assert got.dtype == torch.int32 and torch.equal(got.long(), x.long() @ levels.long().T)


@pytest.mark.parametrize("features", [1, 10, 300])
def test_ternary_linear_quantizes_each_token_then_rounds_as_bitlinear(backend, features):
    gen = torch.Generator().manual_seed(features + 1)
    levels = ternary_levels(7, features, gen)
    x = torch.randn(5, features, generator=gen) * 3
    scale, bias = torch.rand(7, generator=gen), torch.randn(7, generator=gen)
    got = ops.ternary_linear(x, ops.pack_ternary_weights(levels), in_features=features, scale=scale, bias=bias)
    assert torch.equal(got, bitlinear(x, levels, scale, bias))


# ---------------------------------------------------------------------------
# one check for both backends


def _bad_calls():
    xp = torch.zeros(1, 3, 3, 1, 1, dtype=torch.int64)
    wp = torch.zeros(4, 1, 1, 1, dtype=torch.int64)
    conv = dict(in_channels=8, out_channels=4, kernel_size=1)
    thr, d = torch.zeros(4, dtype=torch.int32), torch.ones(4, dtype=torch.int8)
    fp, lw = torch.zeros(2, 1, dtype=torch.int64), torch.zeros(4, 1, dtype=torch.int64)
    tw = torch.zeros(4, 3, dtype=torch.uint8)
    return {
        "pack groups": lambda: ops.pack_activations(torch.zeros(1, 3, 2, 2), 0, 0.0, 2),
        "pack features": lambda: ops.pack_features(torch.zeros(3)),
        "pack weights groups": lambda: ops.pack_weights(torch.zeros(6, 1, 3, 3), 4),
        "conv scale": lambda: ops.binary_conv2d(xp, wp, scale=torch.ones(3), **conv),
        "conv batchnorm": lambda: ops.binary_conv2d(xp, wp, bn_scale=torch.ones(4), **conv),
        "conv residual": lambda: ops.binary_conv2d(xp, wp, residual=torch.zeros(1, 4, 3, 4), **conv),
        "conv kernel": lambda: ops.binary_conv2d_int(xp, wp, **dict(conv, kernel_size=2)),
        "threshold float": lambda: ops.binary_conv2d_threshold(xp, wp, thresholds=thr.float(), direction=d, **conv),
        "threshold shape": lambda: ops.binary_conv2d_threshold(xp, wp, thresholds=thr[:3], direction=d, **conv),
        "direction dtype": lambda: ops.binary_conv2d_threshold(xp, wp, thresholds=thr, direction=d.float(), **conv),
        "direction value": lambda: ops.binary_conv2d_threshold(
            xp, wp, thresholds=thr, direction=torch.tensor([1, -1, 2, 1]), **conv
        ),
        "out groups": lambda: ops.binary_conv2d_threshold(xp, wp, thresholds=thr, direction=d, out_groups=3, **conv),
        "linear features": lambda: ops.binary_linear_int(fp, lw, in_features=65),
        "linear bias": lambda: ops.binary_linear(fp, lw, in_features=8, bias=torch.ones(5)),
        "linear direction": lambda: ops.binary_linear_threshold(fp, lw, in_features=8, thresholds=thr, direction=d[:2]),
        "pool mask": lambda: ops.max_pool_bits(
            xp,
            torch.zeros(2, 1, dtype=torch.int64),
            torch.zeros(1, 1, dtype=torch.int64),
            kernel_size=2,
            stride=1,
            padding=0,
            dilation=1,
            ceil_mode=False,
            out_padding=0,
            channels=8,
        ),
        "ternary input": lambda: ops.ternary_linear(torch.zeros(2, 9), tw, in_features=10),
        "ternary weight": lambda: ops.ternary_linear_int(
            torch.zeros(2, 10, dtype=torch.int8), tw[:, :2], in_features=10
        ),
        "ternary scale": lambda: ops.ternary_linear(torch.zeros(2, 10), tw, in_features=10, scale=torch.ones(5)),
    }


@pytest.mark.skipif(not ops.native_available(), reason="no native kernels")
@pytest.mark.parametrize("name", list(_bad_calls()))
def test_a_bad_argument_is_the_same_error_on_both_backends(name):
    messages = []
    for backend in ("native", "reference"):
        with ops.use_backend(backend), pytest.raises(ValueError) as error:
            _bad_calls()[name]()
        messages.append(str(error.value))
    assert messages[0] == messages[1], messages
