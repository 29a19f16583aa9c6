"""onebit.engine.kernels.operands: a native call's tensors, checked before their addresses are taken,
and its outputs in channels_last memory."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from onebit import _C
from onebit.engine import kernels as K
from onebit.engine import ops

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="the native kernels are not built")


def test_channel_ptr_gives_the_address_of_a_good_vector_and_zero_for_none():
    from onebit.engine.kernels.operands import channel_ptr

    v = torch.zeros(8)
    assert channel_ptr(None, "scale", torch.float32, 8) == 0
    assert channel_ptr(v, "scale", torch.float32, 8) == v.data_ptr()
    p = torch.nn.Parameter(torch.zeros(8))  # a subclass: checked the long way, accepted
    assert channel_ptr(p, "scale", torch.float32, 8) == p.data_ptr()


@pytest.mark.parametrize(
    "t,match",
    [
        (torch.zeros(7), r"scale must have shape \[8\]"),
        (torch.zeros(8, dtype=torch.float64), "scale must have dtype torch.float32"),
        (torch.zeros(16)[::2], "scale must be contiguous"),
        (torch.zeros(1, 8), "scale must have 1 dimensions"),
        ([0.0] * 8, "scale must be a torch.Tensor"),
    ],
)
def test_channel_ptr_refuses_what_the_kernel_cannot_read(t, match):
    from onebit.engine.kernels.operands import channel_ptr

    with pytest.raises(ValueError, match=match):
        channel_ptr(t, "scale", torch.float32, 8)


def test_epilogue_ptrs_take_a_whole_batchnorm_or_none():
    from onebit.engine.kernels.operands import epilogue_ptrs

    s, t = torch.zeros(4), torch.ones(4)
    assert epilogue_ptrs(4, None, None, None, None, False) == (0, 0, (0, 0, False))
    assert epilogue_ptrs(4, s, None, s, t, True) == (s.data_ptr(), 0, (s.data_ptr(), t.data_ptr(), True))
    with pytest.raises(ValueError, match="bn_scale and bn_shift go together"):
        epilogue_ptrs(4, None, None, s, None, False)
    with pytest.raises(ValueError, match="bn_fma must be a bool"):
        epilogue_ptrs(4, None, None, s, t, 1)
    with pytest.raises(ValueError, match=r"bias must have shape \[4\]"):
        epilogue_ptrs(4, s, torch.zeros(5), None, None, False)


def test_a_residual_is_read_in_place_in_either_layout_and_other_strides_are_copied_to_channels_last():
    from onebit.engine.kernels.operands import residual_operand

    out = torch.empty(2, 3, 4, 5)
    assert residual_operand(None, out) == (None, False)
    cl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert residual_operand(cl, out) == (cl, False)
    nchw = torch.randn(2, 3, 4, 5)
    got, in_nchw = residual_operand(nchw, out)  # read as it is, a run of pixels transposed at a time
    assert got is nchw and in_nchw
    for strided in (torch.randn(2, 3, 4, 10)[..., ::2], torch.randn(2, 64, 8, 16)[..., ::2]):  # every other column
        copy, in_nchw = residual_operand(strided, torch.empty(strided.shape))
        assert torch.equal(copy, strided) and copy.permute(0, 2, 3, 1).is_contiguous() and not in_nchw
    with pytest.raises(ValueError, match=r"residual must have the output's shape \[2, 3, 4, 5\]"):
        residual_operand(torch.zeros(2, 3, 4, 4), out)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 3, 3), (0, 8, 2, 2)])
def test_outputs_have_torchs_channels_last_strides_real_or_fake(shape):
    from onebit.engine.kernels.operands import channels_last_strides, empty_nchw_channels_last

    out = empty_nchw_channels_last(*shape, torch.float32)
    assert out.shape == shape and out.stride() == channels_last_strides(*shape)
    if shape[1] > 1:
        assert out.stride() == torch.empty(shape).contiguous(memory_format=torch.channels_last).stride()
    else:  # one channel: the same memory as NCHW, and said so
        assert out.is_contiguous()
    with FakeTensorMode() as mode:
        fake = empty_nchw_channels_last(*shape, torch.int32, like=mode.from_tensor(torch.zeros(1)))
        assert fake.stride() == out.stride() and fake.dtype == torch.int32


@pytest.mark.usefixtures("restore_isa_and_threads")
@pytest.mark.parametrize("isa", _C.supported_isas())
def test_a_conv_layer_writes_nchw_output_equal_to_its_channels_last_one(isa):
    """``layer(x, memory_format=torch.contiguous_format)``: the same values as the channels_last output,
    in NCHW memory, with a BatchNorm epilogue, runs of pixels that span images, on 1 and 2 threads; and a
    residual in NCHW memory (read as it is, a run of pixels at a time) adds as its channels_last copy does."""
    _C.set_isa(isa)
    g = torch.Generator().manual_seed(4)
    for n, c, co, side, stride, groups in ((1, 64, 64, 14, 1, 1), (3, 40, 72, 5, 1, 1), (2, 64, 32, 11, 2, 2)):
        w = torch.randn(co, c // groups, 3, 3, generator=g)
        channels = [torch.rand(co, generator=g) + 0.5 for _ in range(2)] + [torch.randn(co, generator=g)]
        layer = K.ConvLayer(
            K.pack_weights(w),
            scale=channels[0],
            bias=channels[2],
            bn_scale=channels[1],
            bn_shift=channels[2],
            in_channels=c,
            out_channels=co,
            kernel_size=3,
            stride=stride,
            padding=1,
            dilation=1,
            groups=groups,
            pad_value=0.0,
        )
        x = torch.randn(n, c, side, side, generator=g)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            want = layer(x)
            residual = torch.randn(want.shape, generator=g)
            for inp in (x, x.contiguous(memory_format=torch.channels_last)):
                got = layer(inp, memory_format=torch.contiguous_format)
                assert got.is_contiguous() and torch.equal(got, want)
                with_shortcut = layer(inp, residual.contiguous(memory_format=torch.channels_last))
                for fmt in (torch.contiguous_format, torch.channels_last):  # an NCHW residual, read as it is
                    got = layer(inp, residual, memory_format=fmt)
                    assert got.is_contiguous(memory_format=fmt) and torch.equal(got, with_shortcut)
    with pytest.raises(ValueError, match="memory_format must be torch.channels_last or torch.contiguous_format"):
        layer(x, memory_format=torch.preserve_format)
