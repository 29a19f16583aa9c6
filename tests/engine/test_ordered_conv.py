"""onebit's ordered float convs, each summing as one of torch's conv kernels sums:

- the ordered 1x1 conv: each output summed in channel order, one rounding per product and per sum, as
  torch's reference GEMM sums a 1x1 conv on some small maps;
- the tap-ordered conv: each output one chain of fused multiply-adds over the taps in (kh, kw, c) order,
  padding taps skipped, as torch sums a network's few-channel stem;
- the channelwise 1x1 conv: each output one product, then its channel's bias (or +0.0), as torch rounds a
  depthwise 1x1 conv (a ReActNet-style block's learnable shift).

A packed model runs them where torch sums the input's shape so (asked of torch per shape; the stem also
where it is faster), and keeps torch's conv everywhere else: either way, the model's bits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import float_bits
from onebit import _C, engine, models
from onebit.engine.kernels import ChannelwiseConv1x1, OrderedConv1x1, TapOrderedConv
from onebit.engine.sum_order import RoundingProbe, SumOrderProbe

#: a BinaryDenseNet-28 transition on a 28 px input: 544 -> 192 channels on a 2x2 map, which torch's NCHW
#: conv sums with its reference GEMM
DENSENET_TRANSITION = (1, 544, 192, 2)


def channel_order_sums(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The definition in torch's float32 ops: the bias (or +0.0), then each channel's product added in turn."""
    n, c, h, w = x.shape
    co = weight.shape[0]
    acc = torch.zeros(n, co, h * w) if bias is None else bias.reshape(1, co, 1).expand(n, co, h * w).clone()
    xs, ws = x.reshape(n, c, h * w), weight.reshape(co, c)
    for k in range(c):
        acc = acc + ws[:, k].reshape(1, co, 1) * xs[:, k].reshape(n, 1, h * w)
    return acc.reshape(n, co, h, w)


def wide_range(shape, generator, specials: bool = True) -> torch.Tensor:
    """Values over many orders of magnitude; with ``specials``, zeros of both signs, infinities and NaNs."""
    x = torch.randn(shape, generator=generator) * torch.exp(3 * torch.randn(shape, generator=generator))
    if specials:
        pick = torch.randint(0, 40, shape, generator=generator)
        x = torch.where(pick == 0, 0.0, torch.where(pick == 1, -0.0, x))
        x = torch.where(pick == 2, float("inf"), torch.where(pick == 3, float("nan"), x))
    return x


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 3), (1, 37, 33, 4), (2, 70, 64, 7), (1, 200, 97, 1)])
def test_every_isa_sums_in_channel_order(isa, shape, with_bias):
    n, c, co, hw = shape
    g = torch.Generator().manual_seed(c * 1000 + co)
    x = wide_range((n, c, hw, 1), g)
    weight = torch.randn(co, c, 1, 1, generator=g)
    bias = torch.randn(co, generator=g) if with_bias else None
    got = OrderedConv1x1(weight, bias)(x)
    assert got.shape == (n, co, hw, 1) and got.is_contiguous()
    assert torch.equal(float_bits(got), float_bits(channel_order_sums(x, weight, bias)))


@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_sums_the_densenet_transition_in_channel_order(isa, with_bias):
    """Where torch's conv takes its reference GEMM the ordered conv gives its bits, specials included."""
    n, c, co, hw = DENSENET_TRANSITION
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(co, c, 1, 1, generator=g) * 0.05
    bias = torch.randn(co, generator=g) if with_bias else None
    conv = OrderedConv1x1(weight, bias)
    probe = SumOrderProbe(lambda x: F.conv2d(x, weight, bias), conv)
    assert probe(torch.empty(n, c, hw, hw))
    for seed in range(3):
        x = wide_range((n, c, hw, hw), torch.Generator().manual_seed(seed), specials=seed > 0)
        assert torch.equal(float_bits(conv(x)), float_bits(F.conv2d(x, weight, bias)))


def test_probe_tells_another_order_apart():
    """A conv torch sums in another order (its BLAS or oneDNN kernel on a larger map) is not taken for one."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(128, 64, 1, 1, generator=g)
    conv = OrderedConv1x1(weight)
    probe = SumOrderProbe(lambda x: F.conv2d(x, weight), conv)
    x = torch.empty(1, 64, 28, 28)
    assert not probe(x)
    assert list(probe.answers) == [(x.shape, torch.get_num_threads())]  # asked once, kept


def native_shapes(monkeypatch, name: str, dims: slice) -> list[tuple]:
    """The calls of ``_C.<name>`` from now on, each recorded as its shape arguments ``dims``, and made."""
    calls = []
    native = getattr(_C, name)
    monkeypatch.setattr(_C, name, lambda *a: calls.append(a[dims]) or native(*a))
    return calls


def transition_step(packed):
    return next(s for s in packed._steps if s.output == "stage2_6_conv")


def test_packed_densenet_runs_the_ordered_conv_where_torch_sums_so(monkeypatch):
    torch.manual_seed(0)
    model = models.create("binary_densenet28", num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, 28, 28)
    packed = engine.pack(model, x[:1])
    calls = native_shapes(monkeypatch, "ordered_conv1x1_raw", slice(1, 4))  # (N, C, HW)
    with torch.no_grad():
        want = model(x)
        got = packed(x)
    assert torch.equal(float_bits(got), float_bits(want))
    assert (2, 544, 4) in calls  # the 2x2 transition, at least: torch's choice depends on the shape
    # a channels_last input keeps torch's conv (its oneDNN kernel sums otherwise): still the model's bits
    calls.clear()
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(float_bits(packed(xc)), float_bits(model(xc)))
    assert not calls


def test_a_written_weight_is_read_again():
    torch.manual_seed(0)
    model = models.create("binary_densenet28", num_classes=10, in_channels=3).eval()
    x = torch.randn(1, 3, 28, 28)
    packed = engine.pack(model, x)
    step = transition_step(packed)
    inner = torch.randn(1, 544, 2, 2)
    with torch.no_grad():
        before = step.run(inner)
        step.tensors["weight"].mul_(-2.0)
        after = step.run(inner)
        assert torch.equal(float_bits(after), float_bits(F.conv2d(inner, step.tensors["weight"])))
    assert not torch.equal(after, before)


def test_the_reference_backend_keeps_torch_conv(monkeypatch):
    from onebit.engine import ops

    torch.manual_seed(0)
    model = models.create("binary_densenet28", num_classes=10, in_channels=3).eval()
    x = torch.randn(1, 3, 28, 28)
    packed = engine.pack(model, x)
    calls = []
    monkeypatch.setattr(_C, "ordered_conv1x1_raw", lambda *a: calls.append(a))
    with ops.use_backend("reference"), torch.no_grad():
        assert torch.equal(float_bits(packed(x)), float_bits(model(x)))
    assert not calls


def test_bad_operands_are_named():
    with pytest.raises(ValueError, match=r"weight must be float32 \[Co, C, 1, 1\]"):
        OrderedConv1x1(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"bias must be float32 \[4\]"):
        OrderedConv1x1(torch.randn(4, 3, 1, 1), torch.randn(5))
    conv = OrderedConv1x1(torch.randn(4, 3, 1, 1))
    with pytest.raises(ValueError, match=r"NCHW memory, got torch.float32 of shape \[1, 3, 2, 2\] and strides"):
        conv(torch.randn(1, 3, 2, 2).contiguous(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        conv(torch.randn(1, 5, 2, 2))


# -- the tap-ordered conv (stems) --------------------------------------------------------------------------

#: stems torch sums as fused multiply-add chains in (kh, kw, c) order: N, C, H, kernel, stride, padding, Co
STEMS = [(1, 3, 224, 7, 2, 3, 64), (2, 3, 32, 3, 1, 1, 64), (1, 1, 28, 3, 1, 1, 32), (1, 3, 30, 7, 2, 3, 70)]


@pytest.mark.parametrize("stem", STEMS, ids=lambda s: f"{s[1]}x{s[2]}px-k{s[3]}s{s[4]}p{s[5]}-{s[6]}ch")
def test_every_isa_sums_a_stem_as_torch_does(isa, stem):
    n, c, h, k, stride, pad, co = stem
    g = torch.Generator().manual_seed(h + k)
    x = wide_range((n, c, h, h), g)
    weight = torch.randn(co, c, k, k, generator=g)
    conv = TapOrderedConv(weight, (stride, stride), (pad, pad))
    want = F.conv2d(x, weight, None, stride, pad)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = conv(x.contiguous(memory_format=layout))
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(float_bits(got), float_bits(want))


def test_padding_taps_are_skipped_as_torch_skips_them(isa):
    """A sum that underflows to -0.0 stays -0.0 past the padding (0 * w added for w > 0 would make it +0.0)."""
    weight = torch.full((1, 3, 7, 7), -1e-30)
    weight[:, :, 6, :] = 1.0  # the taps the bottom-right output finds in the padding: positive
    weight[:, :, :, 6] = 1.0
    x = torch.zeros(1, 3, 16, 16)
    x[0, 0, 11, 11] = 1e-30  # that output's first tap: 1e-30 * -1e-30 underflows to -0.0
    want = F.conv2d(x, weight, None, 2, 3)
    assert torch.signbit(want[0, 0, 7, 7]) and want[0, 0, 7, 7] == 0  # torch's sum: -0.0
    got = TapOrderedConv(weight, (2, 2), (3, 3))(x)
    assert torch.equal(float_bits(got), float_bits(want))


def test_a_timed_probe_takes_the_faster_only():
    import time

    weight = torch.randn(64, 3, 7, 7)
    conv = TapOrderedConv(weight, (2, 2), (3, 3))

    def torch_conv(x):
        return F.conv2d(x, weight, None, 2, 3)

    def slowed(x):
        time.sleep(0.01)
        return conv(x)

    layouts = (torch.contiguous_format, torch.channels_last)
    x = torch.empty(1, 3, 64, 64)
    assert SumOrderProbe(torch_conv, conv, layouts)(x)  # the same bits: taken when not timed
    assert not SumOrderProbe(torch_conv, slowed, layouts, timed=True)(x)  # the same bits, slower: not taken
    assert not SumOrderProbe(lambda x: torch_conv(x) * 1.0001, conv, layouts)(x)  # other bits: never taken


def stem_probe(step) -> SumOrderProbe:
    return next(c.cell_contents for c in step.run.__closure__ if isinstance(c.cell_contents, SumOrderProbe))


def test_packed_birealnet_asks_torch_for_its_stem():
    torch.manual_seed(0)
    model = models.create("birealnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 96, 96)
    packed = engine.pack(model, x)
    stem = packed._steps[0]
    assert stem.output == "stem_conv"
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.contiguous(memory_format=layout)
            assert torch.equal(float_bits(packed(xi)), float_bits(model(xi)))
    answers = stem_probe(stem).answers
    assert list(answers) == [(x.shape, torch.get_num_threads())]  # asked once: onebit's stem where it gains


def test_bad_stem_operands_are_named():
    with pytest.raises(ValueError, match=r"weight must be float32 \[Co, C, KH, KW\]"):
        TapOrderedConv(torch.randn(4, 3, 3), (1, 1), (1, 1))
    conv = TapOrderedConv(torch.randn(4, 3, 7, 7), (2, 2), (0, 0))
    with pytest.raises(
        ValueError, match=r"\[N, 3, H, W\] in NCHW .* as large as the kernel, got torch.float32 of shape"
    ):
        conv(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"in NCHW or channels_last memory"):
        conv(torch.randn(1, 3, 9, 18)[..., ::2])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        conv(torch.randn(1, 3, 9, 9).double())


def test_packed_birealnet_on_onebits_stem_gives_the_models_bits(monkeypatch):
    """With the probe's timing made to favour onebit's stem, the packed model runs it, bit for bit."""
    from onebit.engine import sum_order

    monkeypatch.setattr(sum_order, "TIMED_MARGIN", float("inf"))
    torch.manual_seed(0)
    model = models.create("birealnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    packed = engine.pack(model, x[:1])
    calls = native_shapes(monkeypatch, "tap_ordered_conv_raw", slice(1, 5))  # (N, C, H, W)
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            calls.clear()
            xi = x.contiguous(memory_format=layout)
            assert torch.equal(float_bits(packed(xi)), float_bits(model(xi)))
            assert (2, 3, 64, 64) in calls  # the stem ran onebit's conv on the call's input


def product_then_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fma: bool) -> torch.Tensor:
    """The definition element by element: ``x * w`` then ``+ b`` (or ``+ 0.0``) in numpy's float32, rounded twice;
    or the C library's ``fmaf``, rounded once."""
    import ctypes
    import ctypes.util

    import numpy as np

    fmaf = ctypes.CDLL(ctypes.util.find_library("m")).fmaf
    fmaf.restype, fmaf.argtypes = ctypes.c_float, [ctypes.c_float] * 3
    n, c, h, w = x.shape
    xs = x.contiguous().numpy().reshape(n, c, h * w)
    ws = weight.reshape(c).numpy()
    bs = bias.numpy() if bias is not None else np.zeros(c, dtype=np.float32)
    out = np.empty_like(xs)
    with np.errstate(all="ignore"):
        for k in range(c):
            if fma:
                out[:, k] = [[fmaf(v, ws[k], bs[k]) for v in row] for row in xs[:, k]]
            else:
                out[:, k] = (xs[:, k] * ws[k]).astype(np.float32) + bs[k]
    return torch.from_numpy(out.reshape(n, c, h, w))


@pytest.mark.parametrize("fma", [False, True], ids=["rounded twice", "fused"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_channelwise_1x1_conv_is_a_product_then_its_bias(isa, with_bias, fma):
    g = torch.Generator().manual_seed(5)
    x = wide_range((2, 24, 7, 5), g)
    weight = wide_range((24, 1, 1, 1), g, specials=False)
    weight[3] = -0.0  # -0.0 products, which the bias (or the +0.0 start) makes +0.0
    bias = wide_range((24,), g) if with_bias else None
    conv = ChannelwiseConv1x1(weight, bias, fma)
    want = product_then_bias(x, weight, bias, fma)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = conv(x.contiguous(memory_format=layout))
        assert got.is_contiguous(memory_format=layout)  # the input's layout, as torch's conv keeps it
        assert torch.equal(float_bits(got), float_bits(want))


def channelwise_probes(step) -> dict:
    """A channelwise conv step's rounding probes, by layout (in its runner's closure)."""
    return next(
        c.cell_contents
        for c in step.run.__closure__
        if isinstance(c.cell_contents, dict) and all(isinstance(p, RoundingProbe) for p in c.cell_contents.values())
    )


def reactnet_with_trained_shifts() -> torch.nn.Module:
    """birealnet_small_react with shifts of random scale and bias (at initialization they are 1 and 0, whose
    products are exact: every rounding gives the same bits)."""
    torch.manual_seed(0)
    model = models.create("birealnet_small_react").eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(".pre"):
                module.weight.normal_()
                module.bias.normal_()
    return model


def channelwise_calls(monkeypatch) -> list:
    """The channelwise convs run from now on, each recorded as (its input's layout is NCHW, fused)."""
    calls = []
    real = ChannelwiseConv1x1.run
    monkeypatch.setattr(
        ChannelwiseConv1x1, "run", lambda self, xi: calls.append((xi.is_contiguous(), self.fma)) or real(self, xi)
    )
    return calls


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_reactnet_runs_its_shifts_as_channelwise_convs_with_the_models_bits(monkeypatch, threads):
    model = reactnet_with_trained_shifts()
    x = torch.randn(2, 3, 28, 28)
    packed = engine.pack(model, x[:1])
    shifts = [s for s in packed._steps if s.module.endswith(".pre")]
    assert len(shifts) == 6
    calls = channelwise_calls(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for layout in (torch.contiguous_format, torch.channels_last):
                xi = x.contiguous(memory_format=layout)
                packed(xi)  # the first call of a shape asks torch (probes run the conv too)
                calls.clear()
                assert torch.equal(float_bits(packed(xi)), float_bits(model(xi)))
                # every shift in onebit's conv, rounded as torch's kernel rounds the model's layout (the input's)
                assert len(calls) == len(shifts)
                probe = channelwise_probes(shifts[0])[layout]
                rounding = probe.answers[((2, 32, 28, 28), threads)]
                assert [fused for _, fused in calls] == [rounding == "fused multiply-add"] * len(shifts)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 5, 5), (2, 3, 1, 1), (1, 17, 9, 7), (3, 64, 14, 14), (1, 40, 56, 56)])
def test_a_packed_depthwise_1x1_conv_gives_torchs_bits(monkeypatch, shape, with_bias, threads):
    """Whatever torch's kernel makes of the shape, layout and thread count, the packed conv gives its bits, by
    onebit's channelwise conv wherever torch rounds as one of its ways."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(c * 100 + h)
    conv = torch.nn.Conv2d(c, c, 1, groups=c, bias=with_bias).eval()
    with torch.no_grad():
        conv.weight.copy_(wide_range(conv.weight.shape, g, specials=False))
        if with_bias:
            conv.bias.copy_(wide_range((c,), g, specials=False))
    model = torch.nn.Sequential(conv)
    x = wide_range(shape, g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        packed = engine.pack(model, x)
        calls = channelwise_calls(monkeypatch)
        with torch.no_grad():
            for layout in (torch.contiguous_format, torch.channels_last):
                xi = x.contiguous(memory_format=layout)
                packed(xi)  # the first call of a shape asks torch (probes run the conv too)
                calls.clear()
                got, want = packed(xi), model(xi)
                assert got.stride() == want.stride()
                assert torch.equal(float_bits(got), float_bits(want))
                probes = channelwise_probes(packed._steps[0])
                rounding = probes[torch.contiguous_format if xi.is_contiguous() else torch.channels_last](xi)
                assert [fused for _, fused in calls] == ([rounding == "fused multiply-add"] if rounding else [])
                if not xi.is_contiguous():  # torch's channels_last kernel (1 x 1 maps take its NCHW one)
                    assert rounding == "multiply, then add"
    finally:
        torch.set_num_threads(before)


def test_an_nchw_model_gives_a_channelwise_conv_its_nchw_input_as_it_comes(monkeypatch):
    """The channelwise conv is as fast in NCHW as in channels_last: an NCHW model does not copy its input, even
    where channels_last would give the same bits (on one thread torch's two kernels round alike here)."""
    model = reactnet_with_trained_shifts()
    x = torch.randn(1, 3, 28, 28)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        packed = engine.pack(model, x)
        first = next(s for s in packed._steps if s.module == "stage1.0.pre")
        assert first.keeps_layout
        inputs = []
        real = first.run
        monkeypatch.setattr(first, "run", lambda xi, **kw: inputs.append(xi.stride()) or real(xi, **kw))
        with torch.no_grad():
            assert torch.equal(float_bits(packed(x)), float_bits(model(x)))
    finally:
        torch.set_num_threads(before)
    assert inputs == [(32 * 28 * 28, 28 * 28, 28, 1)]  # the stem's NCHW map, not a channels_last copy


def test_torchs_conv_is_kept_where_it_rounds_neither_way(monkeypatch):
    """A layout whose torch kernel rounds otherwise keeps torch's conv; asked with weights of wide range, so
    weights that round alike either way (ones) do not decide."""
    model = reactnet_with_trained_shifts()
    x = torch.randn(1, 3, 28, 28)
    real_conv = F.conv2d

    def torch_conv(xi, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        y = real_conv(xi, weight, bias, stride, padding, dilation, groups)
        if groups > 1 and xi.is_contiguous():  # an NCHW depthwise conv rounded some third way
            y = torch.nextafter(y, torch.full_like(y, float("inf")))
        return y

    monkeypatch.setattr(F, "conv2d", torch_conv)
    packed = engine.pack(model, x)
    calls = channelwise_calls(monkeypatch)
    ran = {}
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.contiguous(memory_format=layout)
            packed(xi)
            calls.clear()
            assert torch.equal(float_bits(packed(xi)), float_bits(model(xi)))
            ran[layout] = [nchw for nchw, _ in calls]
    assert ran[torch.contiguous_format] == []  # torch's conv, whose rounding is neither of onebit's
    assert ran[torch.channels_last] == [False] * 6  # onebit's channelwise conv


def test_a_channelwise_conv_takes_plain_maps_only_and_names_bad_operands():
    with pytest.raises(ValueError, match=r"weight must be contiguous float32 \[C, 1, 1, 1\]"):
        ChannelwiseConv1x1(torch.randn(4, 2, 1, 1))
    with pytest.raises(ValueError, match=r"bias must be contiguous float32 \[4\]"):
        ChannelwiseConv1x1(torch.randn(4, 1, 1, 1), torch.randn(5))
    conv = ChannelwiseConv1x1(torch.randn(4, 1, 1, 1))
    assert conv.takes(torch.randn(1, 4, 3, 3))
    assert not conv.takes(torch.randn(1, 4, 3, 6)[..., ::2])  # neither layout: torch's conv decides
    assert not conv.takes(torch.randn(1, 4, 3, 3).double())
    assert not conv.takes(torch.randn(1, 5, 3, 3))
    with pytest.raises(ValueError, match=r"\[N, 4, H, W\] in NCHW or channels_last memory"):
        conv(torch.randn(1, 4, 3, 6)[..., ::2])
    assert conv(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)
