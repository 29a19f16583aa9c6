"""onebit.engine.geometry: the engine's one argument check, and its output sizes.

Each check accepts what the kernels take and refuses the rest with a ValueError that names the
argument; output sizes equal those torch's own conv2d and max_pool2d give.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from onebit.engine import geometry as geo


def packed_input(n=2, h=6, w=6, groups=1, words=1):
    return torch.zeros(n, h, w, groups, words, dtype=torch.int64)


def packed_weight(co=8, kh=3, kw=3, words=1):
    return torch.zeros(co, kh, kw, words, dtype=torch.int64)


CONV = dict(in_channels=16, out_channels=8, kernel_size=3, padding=1)


# ---------------------------------------------------------------------------
# output sizes and words


@pytest.mark.parametrize(
    "size,kernel,stride,padding,dilation", list(itertools.product([5, 8], [1, 3], [1, 2], [0, 1], [1, 2]))
)
def test_conv_output_size_is_torchs(size, kernel, stride, padding, dilation):
    if size + 2 * padding < dilation * (kernel - 1) + 1:
        return
    y = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, kernel, kernel), None, stride, padding, dilation)
    assert geo.conv_output_size(size, kernel, stride, padding, dilation) == y.shape[-1]


@pytest.mark.parametrize(
    "size,kernel,stride,padding,dilation,ceil_mode",
    list(itertools.product([5, 7, 8], [2, 3], [1, 2, 3], [0, 1], [1, 2], [False, True])),
)
def test_pool_output_size_is_torchs(size, kernel, stride, padding, dilation, ceil_mode):
    if padding > kernel // 2 or size + 2 * padding < dilation * (kernel - 1) + 1:
        return  # torch refuses these
    y = F.max_pool2d(torch.zeros(1, 1, size, size), kernel, stride, padding, dilation, ceil_mode)
    assert geo.pool_output_size(size, kernel, stride, padding, dilation, ceil_mode) == y.shape[-1]


@pytest.mark.parametrize("channels", [1, 63, 64, 65, 130])
def test_used_bits_set_exactly_the_channels_bits(channels):
    words = geo.words_for(channels)
    assert words == -(-channels // 64)
    bits = [(word >> b) & 1 for word in geo.used_bits(channels, words) for b in range(64)]
    assert bits == [1] * channels + [0] * (64 * words - channels)


# ---------------------------------------------------------------------------
# scalars and tensors


def test_pair_takes_an_int_or_two_and_names_the_argument():
    assert geo.pair(3, "stride") == (3, 3)
    assert geo.pair((1, 2), "stride") == (1, 2)
    assert geo.pair([1, 2], "stride") == (1, 2)
    assert geo.pair(torch.Size([4, 5]), "stride") == (4, 5)
    for bad in (True, 1.0, (1, 2, 3), (1.0, 2), "2", None):
        with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
            geo.pair(bad, "stride")


def test_check_int_refuses_bools_floats_and_small_values():
    assert geo.check_int(4, "groups", 1) == 4
    with pytest.raises(ValueError, match="groups must be an int, got True"):
        geo.check_int(True, "groups", 1)
    with pytest.raises(ValueError, match="groups must be an int, got 2.0"):
        geo.check_int(2.0, "groups", 1)
    with pytest.raises(ValueError, match="groups must be >= 1, got 0"):
        geo.check_int(0, "groups", 1)


def test_pad_code_knows_zero_and_plus_minus_one():
    assert [geo.pad_code(v, "pad_value") for v in (0.0, 1, -1.0)] == [0, 1, -1]
    for bad in (0.5, "x", None):
        with pytest.raises(ValueError, match="pad_value must be 0.0, 1.0 or -1.0"):
            geo.pad_code(bad, "pad_value")


def test_check_tensor_names_the_tensor_and_the_problem():
    geo.check_tensor(torch.zeros(2, 3), "t", torch.float32, 2)
    geo.check_tensor(torch.zeros(3, 2).T, "t", torch.float32, 2, contiguous=False)
    with pytest.raises(ValueError, match="t must be a torch.Tensor, got list"):
        geo.check_tensor([1.0], "t", torch.float32)
    with pytest.raises(ValueError, match="t must have dtype torch.float32, got torch.float64"):
        geo.check_tensor(torch.zeros(2, dtype=torch.float64), "t", torch.float32)
    with pytest.raises(ValueError, match=r"t must have 2 dimensions, got shape \[2\]"):
        geo.check_tensor(torch.zeros(2), "t", torch.float32, 2)
    with pytest.raises(ValueError, match="t must be contiguous"):
        geo.check_tensor(torch.zeros(3, 2).T, "t", torch.float32, 2)
    with pytest.raises(ValueError, match="t must be on the CPU, got device meta"):
        geo.check_tensor(torch.zeros(2, device="meta"), "t", torch.float32)


def test_check_per_channel_wants_one_value_per_output_channel():
    geo.check_per_channel(torch.zeros(8), "scale", torch.float32, 8)
    with pytest.raises(ValueError, match=r"scale must have shape \[8\] \(one per output channel\), got \[7\]"):
        geo.check_per_channel(torch.zeros(7), "scale", torch.float32, 8)
    with pytest.raises(ValueError, match="scale must have 1 dimensions"):
        geo.check_per_channel(torch.zeros(1, 8), "scale", torch.float32, 8)


# ---------------------------------------------------------------------------
# binary convolutions


def test_conv_spec_normalizes_and_derives_the_packed_layout():
    spec = geo.ConvSpec.check(130, 8, (3, 1), stride=2, padding=(1, 0), groups=2, pad_value=-1)
    assert spec.kernel == (3, 1) and spec.stride == (2, 2) and spec.padding == (1, 0) and spec.pad_value == -1.0
    assert spec.words == 2 and spec.pad_code == -1 and spec.weight_shape == (8, 3, 1, 2)
    assert spec.output_size(5, 4) == (3, 2)
    assert spec.attrs()["kernel_size"] == [3, 1] and spec.op_args()[2] == [3, 1]


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(in_channels=0), "in_channels must be >= 1"),
        (dict(out_channels=2.5), "out_channels must be an int"),
        (dict(groups=3), "groups=3 must divide in_channels=16 and out_channels=8"),
        (dict(kernel_size=0), r"kernel_size must be >= 1, got \(0, 0\)"),
        (dict(kernel_size=(3, 3, 3)), "kernel_size must be an int or a pair"),
        (dict(stride=(1, 0)), "stride must be >= 1"),
        (dict(dilation=0), "dilation must be >= 1"),
        (dict(padding=-1), "padding must be >= 0"),
        (dict(pad_value=2.0), "pad_value must be 0.0, 1.0 or -1.0"),
    ],
)
def test_conv_spec_refuses_each_bad_argument_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        geo.ConvSpec.check(**dict(CONV, **bad))


def test_check_conv_accepts_packed_or_float_input():
    call = geo.check_conv(packed_input(h=8, w=8), packed_weight(), **CONV)
    assert (call.n, call.hp, call.wp, call.oh, call.ow) == (2, 8, 8, 6, 6)
    assert call.output_shape == (2, 8, 6, 6)
    call = geo.check_conv(torch.zeros(2, 16, 6, 6).transpose(2, 3), packed_weight(), **CONV)  # any strides
    assert (call.hp, call.wp, call.oh, call.ow) == (8, 8, 6, 6)


@pytest.mark.parametrize(
    "xp,wp,conv,match",
    [
        (torch.zeros(2, 6, 6, 1, 1, dtype=torch.int32), packed_weight(), CONV, "packed input xp must have dtype"),
        (torch.zeros(2, 16, 6), packed_weight(), CONV, "float32 of shape"),
        (torch.zeros(2, 15, 6, 6), packed_weight(), CONV, r"input x has shape .*in_channels=16"),
        (packed_input(groups=2), packed_weight(), CONV, r"expected \[N, Hp, Wp, groups=1, words=1\]"),
        (packed_input(h=2, w=2), packed_weight(), CONV, "cannot hold padding 1x1"),
        (packed_input(h=3, w=3), packed_weight(), dict(CONV, padding=0, dilation=2), "too small for kernel"),
        (packed_input(), packed_weight(co=4), CONV, r"packed weight wp has shape .*out_channels=8"),
        (packed_input(), packed_weight().float(), CONV, "packed weight wp must have dtype torch.int64"),
        (packed_input(), packed_weight().transpose(1, 2), CONV, "packed weight wp must be contiguous"),
    ],
)
def test_check_conv_refuses_inputs_and_weights_that_do_not_fit(xp, wp, conv, match):
    with pytest.raises(ValueError, match=match):
        geo.check_conv(xp, wp, **conv)


def test_check_conv_weight_is_the_weight_part_of_check_conv():
    spec = geo.ConvSpec.check(**CONV)
    geo.check_conv_weight(packed_weight(), spec)
    with pytest.raises(ValueError, match=r"KH=3, KW=3, words=1"):
        geo.check_conv_weight(packed_weight(kh=1), spec)


def test_check_epilogue_takes_float32_vectors_and_a_whole_batchnorm():
    v = torch.zeros(8)
    geo.check_epilogue(8)
    geo.check_epilogue(8, v, v, v, v, True)
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        geo.check_epilogue(8, v, torch.zeros(4))
    with pytest.raises(ValueError, match="scale must have dtype torch.float32"):
        geo.check_epilogue(8, v.double())
    with pytest.raises(ValueError, match="bn_scale and bn_shift go together"):
        geo.check_epilogue(8, bn_shift=v)
    with pytest.raises(ValueError, match="bn_fma must be a bool, got int"):
        geo.check_epilogue(8, bn_scale=v, bn_shift=v, bn_fma=1)
    with pytest.raises(ValueError, match=r"bn_shift must have shape \[8\]"):
        geo.check_epilogue(8, bn_scale=v, bn_shift=torch.zeros(9))


def test_check_conv_epilogue_adds_the_residual_of_the_output_shape():
    call = geo.check_conv(packed_input(), packed_weight(), in_channels=16, out_channels=8, kernel_size=3)
    geo.check_conv_epilogue(call, residual=torch.zeros(2, 8, 4, 4).transpose(2, 3))  # any strides
    with pytest.raises(ValueError, match=r"residual must have the output's shape \[2, 8, 4, 4\], got \[2, 8, 4, 5\]"):
        geo.check_conv_epilogue(call, residual=torch.zeros(2, 8, 4, 5))
    with pytest.raises(ValueError, match="residual must have dtype torch.float32"):
        geo.check_conv_epilogue(call, residual=torch.zeros(2, 8, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="scale must have shape"):
        geo.check_conv_epilogue(call, scale=torch.zeros(2))


# ---------------------------------------------------------------------------
# thresholds and their direction


def test_check_direction_converts_bool_and_integers_to_int8():
    up_down = torch.tensor([1, -1, 1])
    assert torch.equal(geo.check_direction(up_down), up_down.to(torch.int8))
    negate_above = torch.tensor([False, True, False])
    assert torch.equal(geo.check_direction(negate_above, 3), up_down.to(torch.int8))
    given = torch.tensor([1, -1], dtype=torch.int8)
    assert geo.check_direction(given, 2) is given


def test_check_direction_refuses_other_values_types_and_shapes_by_name():
    with pytest.raises(ValueError, match="direction must be a torch.Tensor, got list"):
        geo.check_direction([1, -1])
    with pytest.raises(ValueError, match="direction must be int8 \\(\\+1 / -1\\) or bool"):
        geo.check_direction(torch.ones(3))
    with pytest.raises(ValueError, match=r"direction must hold only \+1 and -1, got direction\[2\] = 0"):
        geo.check_direction(torch.tensor([1, -1, 0, 1]))
    with pytest.raises(ValueError, match=r"direction\[0\] = 257"):  # not wrapped to +1 by an int8 cast
        geo.check_direction(torch.tensor([257, 1]))
    with pytest.raises(ValueError, match=r"direction must have shape \[3\]"):
        geo.check_direction(torch.tensor([1, -1], dtype=torch.int8), 3)


def test_check_direction_can_leave_int8_values_to_the_kernel():
    unchecked = torch.tensor([1, 0], dtype=torch.int8)
    assert geo.check_direction(unchecked, 2, values=False) is unchecked
    with pytest.raises(ValueError, match=r"direction\[1\] = 0"):
        geo.check_direction(unchecked, 2)
    with pytest.raises(ValueError, match=r"direction\[1\] = 0"):  # a conversion always checks
        geo.check_direction(unchecked.to(torch.int32), 2, values=False)


def test_check_thresholds_gives_int32_thresholds_clamped_and_int8_directions():
    thr, d = geo.check_thresholds(torch.tensor([-(2**40), 3, 2**40]), torch.tensor([True, False, True]), 3)
    assert thr.dtype == torch.int32 and thr.tolist() == [-(2**31), 3, 2**31 - 1]
    assert d.dtype == torch.int8 and d.tolist() == [-1, 1, -1]
    with pytest.raises(ValueError, match="thresholds must be integers \\(int32\\), got torch.float32"):
        geo.check_thresholds(torch.zeros(3), d)
    with pytest.raises(ValueError, match="thresholds must be a torch.Tensor"):
        geo.check_thresholds(3, d)
    with pytest.raises(ValueError, match=r"thresholds must have shape \[4\]"):
        geo.check_thresholds(thr, d, 4)


def test_check_threshold_pack_reads_the_channels_from_the_accumulators():
    thr, d = torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.int8)
    geo.check_threshold_pack(torch.zeros(1, 3, 2, 2), thr, d)
    with pytest.raises(ValueError, match=r"acc must be a CPU tensor \[N, C, H, W\], got shape \[3, 2, 2\]"):
        geo.check_threshold_pack(torch.zeros(3, 2, 2), thr, d)
    with pytest.raises(ValueError, match=r"thresholds must have shape \[4\]"):
        geo.check_threshold_pack(torch.zeros(1, 4, 2, 2), thr, d)


def test_check_threshold_output_gives_the_padded_packed_shape():
    call = geo.check_conv(packed_input(), packed_weight(co=130), in_channels=16, out_channels=130, kernel_size=3)
    shape, oph, opw, code, og = geo.check_threshold_output(call, (1, 2), -1.0, 2)
    assert shape == (2, 6, 8, 2, 2) and (oph, opw, code, og) == (1, 2, -1, 2)
    with pytest.raises(ValueError, match="out_groups=3 must divide out_channels=130"):
        geo.check_threshold_output(call, 0, 0.0, 3)
    with pytest.raises(ValueError, match="out_padding must be >= 0"):
        geo.check_threshold_output(call, -1, 0.0, 1)
    with pytest.raises(ValueError, match="out_pad_value must be 0.0, 1.0 or -1.0"):
        geo.check_threshold_output(call, 0, 0.5, 1)


# ---------------------------------------------------------------------------
# linear layers


def test_check_linear_matches_features_words():
    xp, wp = torch.zeros(3, 2, dtype=torch.int64), torch.zeros(5, 2, dtype=torch.int64)
    assert geo.check_linear(xp, wp, 100) == (3, 5, 2)
    with pytest.raises(ValueError, match=r"packed input xp has shape \[3, 2\]: expected \[N, 1\] for 60 features"):
        geo.check_linear(xp, wp, 60)
    with pytest.raises(ValueError, match=r"packed weight wp has shape \[5, 1\]"):
        geo.check_linear(xp, wp[:, :1].contiguous(), 100)
    with pytest.raises(ValueError, match="packed weight wp has no output features"):
        geo.check_linear(xp, wp[:0], 100)
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        geo.check_linear(xp, wp, 0)


def test_check_ternary_reads_two_bit_weights_and_tokens():
    wp = torch.zeros(3, 3, dtype=torch.uint8)  # 3 outputs, 10 features: 3 bytes a row
    assert geo.check_ternary(torch.zeros(2, 10), wp, 10, torch.float32) == (2, 10, 3)
    assert geo.check_ternary(torch.zeros(2, 10, dtype=torch.int8), wp, 10, torch.int8) == (2, 10, 3)
    with pytest.raises(ValueError, match=r"expected \[Out >= 1, 5\] \(four 2-bit codes a byte\) for 20 input features"):
        geo.check_ternary(torch.zeros(2, 20), wp, 20, torch.float32)
    with pytest.raises(ValueError, match="packed ternary weight wp must have dtype torch.uint8"):
        geo.check_ternary(torch.zeros(2, 10), wp.long(), 10, torch.float32)
    with pytest.raises(ValueError, match=r"expected torch.float32 \[N, 10\] input x, got shape \[2, 9\]"):
        geo.check_ternary(torch.zeros(2, 9), wp, 10, torch.float32)
    with pytest.raises(ValueError, match="input x must have dtype torch.int8"):
        geo.check_ternary(torch.zeros(2, 10), wp, 10, torch.int8)
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        geo.check_ternary(torch.zeros(2, 10), wp, 10, torch.float32, torch.ones(3), torch.ones(4))


# ---------------------------------------------------------------------------
# packing, bit planes and bit max pooling


def test_check_pack_gives_the_packed_shape():
    shape, ph, pw, code, g = geo.check_pack(torch.zeros(2, 130, 4, 5), (1, 2), -1.0, 2)
    assert shape == (2, 6, 9, 2, 2) and (ph, pw, code, g) == (1, 2, -1, 2)
    with pytest.raises(ValueError, match="x must have at least one channel"):
        geo.check_pack(torch.zeros(2, 0, 4, 4), 0, 0.0, 1)
    with pytest.raises(ValueError, match="groups=4 must divide the 130 channels of x"):
        geo.check_pack(torch.zeros(2, 130, 4, 5), 0, 0.0, 4)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        geo.check_pack(torch.zeros(130, 4, 5), 0, 0.0, 1)


def test_check_pack_features_and_weights():
    assert geo.check_pack_features(torch.zeros(4, 3).T) == (3, 4)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        geo.check_pack_features(torch.zeros(4))
    assert geo.check_pack_weights(torch.zeros(8, 2, 3, 3), 4) == 4
    assert geo.check_pack_weights(torch.zeros(8, 20), 1) == 1
    with pytest.raises(ValueError, match="a 2-D \\(linear\\) weight has no groups"):
        geo.check_pack_weights(torch.zeros(8, 20), 2)
    with pytest.raises(ValueError, match="groups=3 must divide the 8 output channels of w"):
        geo.check_pack_weights(torch.zeros(8, 2, 3, 3), 3)
    with pytest.raises(ValueError, match=r"w must be \[C_out, C_in / groups, KH, KW\] or \[Out, F\]"):
        geo.check_pack_weights(torch.zeros(8, 2, 3), 1)
    with pytest.raises(ValueError, match="w must have dtype torch.float32"):
        geo.check_pack_weights(torch.zeros(8, 20, dtype=torch.float16), 1)


def test_check_integer_planes_gives_one_group_per_plane_and_group():
    shape, ph, pw = geo.check_integer_planes(torch.zeros(2, 6, 4, 4), [1, 0], 3, 2, True, 1.5)
    assert shape == (2, 6, 4, 6, 1) and (ph, pw) == (1, 0)
    with pytest.raises(ValueError, match=r"bits must be an int in \[1, 8\], got 9"):
        geo.check_integer_planes(torch.zeros(2, 6, 4, 4), [0, 0], 1, 9, False, 1.0)
    with pytest.raises(ValueError, match="clip must be positive, got 0.0"):
        geo.check_integer_planes(torch.zeros(2, 6, 4, 4), [0, 0], 1, 2, True, 0.0)
    with pytest.raises(ValueError, match="groups=4 must divide the 6 channels of x"):
        geo.check_integer_planes(torch.zeros(2, 6, 4, 4), [0, 0], 4, 2, False, 1.0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        geo.check_integer_planes(torch.zeros(2, 6, 4, 4), [0, -1], 1, 2, False, 1.0)


def test_check_combine_planes_reads_the_stacked_conv_output():
    y = torch.zeros(2, 2 * 3 * 1 * 4, 5, 5, dtype=torch.int32).contiguous(memory_format=torch.channels_last)
    coeff = torch.zeros(2, dtype=torch.int32)
    assert geo.check_combine_planes(y, coeff, 2, 3, 1, 1) == (2, 12, 5, 5)
    with pytest.raises(ValueError, match="y must be the stacked bit-plane conv's int32 output in channels_last"):
        geo.check_combine_planes(y.contiguous(), coeff, 2, 3, 1, 1)
    with pytest.raises(ValueError, match="y must be the stacked bit-plane conv's int32 output"):
        geo.check_combine_planes(y, coeff, 5, 3, 1, 1)
    with pytest.raises(ValueError, match=r"coeff must have shape \[2\] \(one per plane pair\)"):
        geo.check_combine_planes(y, torch.zeros(3, dtype=torch.int32), 2, 3, 1, 1)
    with pytest.raises(ValueError, match="exact_divisor must be >= 1"):
        geo.check_combine_planes(y, coeff, 2, 3, 1, 0)


def test_check_pool_bits_gives_the_padded_pooled_shape_and_the_kernels_numbers():
    xp = torch.zeros(2, 6, 6, 2, 1, dtype=torch.int64)
    masks = torch.zeros(2, 1, dtype=torch.int64)
    pool = dict(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=True, out_padding=1, channels=100)
    shape, numbers = geo.check_pool_bits(xp, masks, masks, **pool)
    assert shape == (2, 6, 6, 2, 1) and numbers[:8] == (2, 6, 6, 2, 1, 50, 4, 4)  # ceil mode: 4 windows
    with pytest.raises(ValueError, match=r"or_mask must have shape \[2, 1\]"):
        geo.check_pool_bits(xp, masks[:1], masks, **pool)
    with pytest.raises(ValueError, match="400 channels do not fill 2 groups of 1 words"):
        geo.check_pool_bits(xp, masks, masks, **dict(pool, channels=400))
    with pytest.raises(ValueError, match="kernel_size, stride and dilation must be positive"):
        geo.check_pool_bits(xp, masks, masks, **dict(pool, stride=0))
    with pytest.raises(ValueError, match="too small for pooling window 9x9"):
        geo.check_pool_bits(xp, masks, masks, **dict(pool, kernel_size=9, padding=0))
