"""The specification of onebit's native kernels (onebit.engine.kernels, onebit._C).

Every result is compared for exact equality with an independent reference made of
plain torch float ops: ``conv2d(pad(sign(x), pad_value), sign(w))`` in float64 (exact
for these integer sums), sign(x) = +1 for x >= 0 else -1, on every instruction set the
machine supports (forced with ``_C.set_isa``), including the portable reference kernels.
"""

from __future__ import annotations

import copy
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onebit import _C
from onebit.engine import kernels as K
from onebit.engine.reference import fused_multiply_add

ISAS = _C.supported_isas()
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("restore_isa_and_threads")  # tests switch ISAs and threads


def on_every_isa(fn):
    """Run fn() once per supported ISA; return {isa: result}."""
    results = {}
    for isa in ISAS:
        _C.set_isa(isa)
        results[isa] = fn()
    return results


# ---------------------------------------------------------------------------
# independent references (plain torch)


def sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0).to(torch.float64)


def reference_conv(x, w, stride, padding, dilation, groups, pad_value) -> torch.Tensor:
    """float64 [N, Co, OH, OW] exact integer sums."""
    ph, pw = padding
    xs = F.pad(sign(x), (pw, pw, ph, ph), value=float(pad_value))
    return F.conv2d(xs, sign(w), stride=stride, dilation=dilation, groups=groups)


def reference_pack(negative: torch.Tensor, groups: int) -> torch.Tensor:
    """bool [N, C, H, W] (True = -1) -> int64 [N, H, W, G, Wg], bit by bit."""
    n, c, h, w = negative.shape
    cg = c // groups
    wg = (cg + 63) // 64
    bits = negative.permute(0, 2, 3, 1).reshape(n, h, w, groups, cg).to(torch.int64)
    bits = F.pad(bits, (0, wg * 64 - cg)).reshape(n, h, w, groups, wg, 64)
    shifts = torch.arange(64, dtype=torch.int64)
    return (bits << shifts).sum(-1)  # int64 wraps: bit 63 becomes the sign bit, as intended


def reference_packed_input(x, padding, pad_value, groups) -> torch.Tensor:
    ph, pw = padding
    neg = F.pad(x < 0, (pw, pw, ph, ph), value=pad_value < 0)
    return reference_pack(neg, groups)


def layouts(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as x in another memory layout."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "permuted":  # memory order [H, N, W, C]
        return x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    if kind == "strided":  # every other element of a bigger tensor
        big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3] * 3)
        big[:, ::2, :, ::3] = x
        return big[:, ::2, :, ::3]
    raise AssertionError(kind)


LAYOUTS = ["contiguous", "channels_last", "permuted", "strided"]


# ---------------------------------------------------------------------------
# configurations


@st.composite
def conv_configs(draw, max_channels=300):
    groups = draw(st.sampled_from([1, 1, 1, 2, 3, 4]))
    cin = groups * draw(st.integers(1, max(1, max_channels // groups)))
    cout = groups * draw(st.integers(1, max(1, max_channels // groups)))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    # spatial size: at least one output, small enough to stay fast
    min_h, min_w = max(1, dh * (kh - 1) + 1 - 2 * ph), max(1, dw * (kw - 1) + 1 - 2 * pw)
    h = draw(st.integers(min_h, max(min_h, 11)))
    w = draw(st.integers(min_w, max(min_w, 11)))
    return dict(
        n=draw(st.integers(1, 3)),
        cin=cin,
        cout=cout,
        h=h,
        w=w,
        kernel=(kh, kw),
        stride=(sh, sw),
        dilation=(dh, dw),
        padding=(ph, pw),
        groups=groups,
        pad_value=draw(st.sampled_from([0.0, 1.0, -1.0])),
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make(cfg):
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(cfg["n"], cfg["cin"], cfg["h"], cfg["w"], generator=gen)
    x[torch.rand(x.shape, generator=gen) < 0.05] = 0.0  # exact zeros are +1
    w = torch.randn(cfg["cout"], cfg["cin"] // cfg["groups"], *cfg["kernel"], generator=gen)
    return layouts(x, cfg["layout"]), w, gen


def conv_kwargs(cfg):
    return dict(
        in_channels=cfg["cin"],
        out_channels=cfg["cout"],
        kernel_size=cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        pad_value=cfg["pad_value"],
    )


# ---------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
@pytest.mark.parametrize("channels,groups", [(1, 1), (63, 1), (64, 1), (65, 1), (200, 1), (300, 3), (128, 2), (6, 6)])
def test_pack_activations_exact(layout, pad_value, channels, groups):
    x = torch.randn(2, channels, 5, 19)  # 19 pixels: a full SIMD chunk plus a tail
    x[0, :, 0, 0] = 0.0
    x[0, :, 0, 1] = -0.0
    x[0, :, 0, 2] = float("nan")
    x[0, :, 0, 3] = float("inf")
    x[0, :, 0, 4] = -float("inf")
    x[0, :, 0, 5] = -1e-45
    x = layouts(x, layout)
    expected = reference_packed_input(x, (1, 2), pad_value, groups)
    for isa, got in on_every_isa(lambda: K.pack_activations(x, (1, 2), pad_value, groups)).items():
        assert got.dtype == torch.int64 and got.is_contiguous()
        assert torch.equal(got, expected), isa


def test_pack_special_values():
    x = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), 1e-45, -1e-45, float("inf"), -float("inf")])
    x = x.view(1, 8, 1, 1)
    expected = (1 << 5) | (1 << 7)  # only -1e-45 and -inf are negative; -0.0 and NaNs are +1
    for isa, got in on_every_isa(lambda: K.pack_activations(x)).items():
        assert got.item() == expected, isa


def test_unused_high_bits_stay_zero():
    x = -torch.rand(1, 70, 3, 3) - 0.5  # every real channel is -1
    for isa, got in on_every_isa(lambda: K.pack_activations(x, (2, 2), -1.0, 1)).items():
        assert got.shape == (1, 7, 7, 1, 2)
        assert bool((got[..., 0] == -1).all()), isa  # 64 bits set
        assert bool((got[..., 1] == (1 << 6) - 1).all()), isa  # 6 real channels, 58 unused bits 0
    w = -torch.ones(5, 70, 3, 3)
    assert bool((K.pack_weights(w)[..., 1] == (1 << 6) - 1).all())


def test_pack_weights_and_features():
    w = torch.randn(20, 130, 3, 2)
    wp = K.pack_weights(w)
    assert wp.shape == (20, 3, 2, 3)
    assert torch.equal(wp, reference_pack(w < 0, 1).view(20, 3, 2, 3))
    lin = torch.randn(7, 100)
    assert torch.equal(K.pack_weights(lin), reference_pack(lin[:, :, None, None] < 0, 1).view(7, 2))
    for feats in (torch.randn(4, 100), torch.randn(100, 4).t()):  # contiguous and transposed
        assert torch.equal(K.pack_features(feats), reference_pack(feats[:, :, None, None] < 0, 1).view(4, 2))


def test_pack_batch_zero():
    assert K.pack_activations(torch.randn(0, 3, 4, 4), 1).shape == (0, 6, 6, 1, 1)


# ---------------------------------------------------------------------------
# convolution: exact against the float reference on every ISA


def conv_input(x, cfg, fused: bool):
    """The conv's input: packed beforehand, or the float tensor itself (packed inside the call)."""
    return x if fused else K.pack_activations(x, cfg["padding"], cfg["pad_value"], cfg["groups"])


@SETTINGS
@given(conv_configs(), st.booleans())
def test_conv_int_exact(cfg, fused):
    x, w, _ = make(cfg)
    expected = reference_conv(x, w, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["pad_value"])
    wp = K.pack_weights(w, cfg["groups"])

    def run():
        return K.binary_conv2d_int(conv_input(x, cfg, fused), wp, **conv_kwargs(cfg))

    for isa, got in on_every_isa(run).items():
        assert got.dtype == torch.int32 and got.shape == expected.shape, isa
        assert torch.equal(got.to(torch.float64), expected), isa


@SETTINGS
@given(conv_configs(), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([None] + LAYOUTS))
def test_conv_float_scale_bias_residual_exact(cfg, use_scale, use_bias, fused, residual_layout):
    x, w, gen = make(cfg)
    acc = reference_conv(x, w, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["pad_value"])
    scale = torch.randn(cfg["cout"], generator=gen) if use_scale else None
    bias = torch.randn(cfg["cout"], generator=gen) if use_bias else None
    residual = None
    if residual_layout is not None:  # a shortcut added as the output is written
        residual = layouts(torch.randn(acc.shape, generator=gen), residual_layout)
    expected = acc.to(torch.float32)
    if scale is not None:
        expected = expected * scale.view(1, -1, 1, 1)
    if bias is not None:
        expected = expected + bias.view(1, -1, 1, 1)
    if residual is not None:
        expected = expected + residual
    wp = K.pack_weights(w, cfg["groups"])
    results = on_every_isa(
        lambda: K.binary_conv2d(
            conv_input(x, cfg, fused), wp, scale=scale, bias=bias, residual=residual, **conv_kwargs(cfg)
        )
    )
    for isa, got in results.items():
        assert got.dtype == torch.float32 and got.shape == expected.shape, isa
        assert torch.equal(got, expected), isa


@SETTINGS
@given(conv_configs(), st.booleans(), st.booleans(), st.booleans())
def test_conv_float_batchnorm_epilogue_exact(cfg, fma, fused_input, with_residual):
    # a BatchNorm applied as the output is written: y * bn_scale + bn_shift rounded once (fma) or twice
    x, w, gen = make(cfg)
    acc = reference_conv(x, w, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["pad_value"])
    scale, bias = torch.rand(cfg["cout"], generator=gen) + 0.5, torch.randn(cfg["cout"], generator=gen)
    bn_scale, bn_shift = torch.randn(cfg["cout"], generator=gen), torch.randn(cfg["cout"], generator=gen) * 5
    residual = torch.randn(acc.shape, generator=gen) if with_residual else None
    y = acc.to(torch.float32) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    s, t = bn_scale.view(1, -1, 1, 1), bn_shift.view(1, -1, 1, 1)
    expected = fused_multiply_add(y, s, t) if fma else y * s + t
    if residual is not None:
        expected = expected + residual
    wp = K.pack_weights(w, cfg["groups"])
    results = on_every_isa(
        lambda: K.binary_conv2d(
            conv_input(x, cfg, fused_input),
            wp,
            scale=scale,
            bias=bias,
            residual=residual,
            bn_scale=bn_scale,
            bn_shift=bn_shift,
            bn_fma=fma,
            **conv_kwargs(cfg),
        )
    )
    for isa, got in results.items():
        assert torch.equal(got, expected), isa


def test_batchnorm_epilogue_rounds_once_or_twice_as_asked():
    # hand-worked: y = (1 + 2^-23) 2^-12 (acc = 1 times that scale), y * s = 2^-24 - 2^-70 with
    # s = (1 - 2^-23) 2^-12, and t = 1 + 2^-23. Rounded once: 1 + 2^-23 (just below the midpoint
    # 1 + 2^-23 + 2^-24). Rounded twice: y * s -> 2^-24, then the midpoint ties to even: 1 + 2^-22.
    # (float64 arithmetic would also give 1 + 2^-22: it rounds to the midpoint first.)
    y_scale = torch.tensor([(1 + 2**-23) * 2**-12])
    s, t = torch.tensor([(1 - 2**-23) * 2**-12]), torch.tensor([1 + 2**-23])
    x, wp = torch.ones(1, 1, 1, 1), K.pack_weights(torch.ones(1, 1, 1, 1))
    conv = dict(in_channels=1, out_channels=1, kernel_size=1)
    for fma, want in ((True, 1 + 2**-23), (False, 1 + 2**-22)):
        results = on_every_isa(
            lambda fma=fma: K.binary_conv2d(x, wp, scale=y_scale, bn_scale=s, bn_shift=t, bn_fma=fma, **conv)
        )
        for isa, got in results.items():
            assert got.item() == want, (isa, fma)
    assert fused_multiply_add(y_scale, s, t).item() == 1 + 2**-23
    assert ((y_scale.double() * s.double() + t.double()).float()).item() == 1 + 2**-22


def test_batchnorm_epilogue_needs_scale_and_shift_together():
    x, wp = torch.ones(1, 4, 3, 3), K.pack_weights(torch.ones(2, 4, 1, 1))
    conv = dict(in_channels=4, out_channels=2, kernel_size=1)
    with pytest.raises(ValueError, match="bn_scale and bn_shift go together"):
        K.binary_conv2d(x, wp, bn_scale=torch.ones(2), **conv)
    with pytest.raises(ValueError, match="bn_shift must have shape"):
        K.binary_conv2d(x, wp, bn_scale=torch.ones(2), bn_shift=torch.ones(3), **conv)


@st.composite
def threshold_configs(draw):
    cfg = draw(conv_configs(max_channels=200))
    cout = cfg["cout"]
    divisors = [d for d in range(1, cout + 1) if cout % d == 0 and d <= 8]
    cfg["out_groups"] = draw(st.sampled_from(divisors))
    cfg["out_padding"] = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    cfg["out_pad_value"] = draw(st.sampled_from([0.0, 1.0, -1.0]))
    return cfg


@SETTINGS
@given(threshold_configs(), st.booleans())
def test_conv_threshold_exact(cfg, fused):
    x, w, gen = make(cfg)
    acc = reference_conv(x, w, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["pad_value"])
    k = cfg["cin"] // cfg["groups"] * cfg["kernel"][0] * cfg["kernel"][1]
    co = cfg["cout"]
    thresholds = torch.randint(-k - 1, k + 2, (co,), generator=gen, dtype=torch.int32)
    direction = torch.where(torch.rand(co, generator=gen) < 0.5, 1, -1).to(torch.int8)
    thr = thresholds.view(1, -1, 1, 1).to(torch.float64)
    below = (direction == 1).view(1, -1, 1, 1)
    negative = torch.where(below, acc < thr, acc > thr)
    oph, opw = cfg["out_padding"]
    negative = F.pad(negative, (opw, opw, oph, oph), value=cfg["out_pad_value"] < 0)
    expected = reference_pack(negative, cfg["out_groups"])

    wp = K.pack_weights(w, cfg["groups"])
    threshold = dict(
        thresholds=thresholds,
        direction=direction,
        out_padding=cfg["out_padding"],
        out_pad_value=cfg["out_pad_value"],
        out_groups=cfg["out_groups"],
        **conv_kwargs(cfg),
    )
    layer = K.ThresholdConvLayer(wp, cache=K.WeightCache(), **threshold)  # its operands bound

    def run():
        return K.binary_conv2d_threshold(conv_input(x, cfg, fused), wp, **threshold), layer(conv_input(x, cfg, fused))

    for isa, (got, bound) in on_every_isa(run).items():
        assert got.shape == expected.shape, isa
        assert torch.equal(got, expected), isa
        assert torch.equal(bound, expected), isa


def test_threshold_int64_thresholds_are_clamped_exactly():
    x, w = torch.randn(1, 64, 6, 6), torch.randn(16, 64, 3, 3)
    xp, wp = K.pack_activations(x, 1), K.pack_weights(w)
    conv = dict(in_channels=64, out_channels=16, kernel_size=3, padding=1)
    d = torch.where(torch.arange(16) % 2 == 0, 1, -1).to(torch.int8)
    big = torch.tensor([2**40, -(2**40)] * 8, dtype=torch.int64)
    clamped = torch.tensor([2**31 - 1, -(2**31)] * 8, dtype=torch.int32)
    a = K.binary_conv2d_threshold(xp, wp, thresholds=big, direction=d, **conv)
    b = K.binary_conv2d_threshold(xp, wp, thresholds=clamped, direction=d, **conv)
    assert torch.equal(a, b)
    # even channels (below a huge threshold): all -1; odd (above a hugely negative one): all -1
    assert bool((a == 0xFFFF).all())


def test_threshold_bool_direction_is_negate_above():
    x, w = torch.randn(1, 64, 6, 6), torch.randn(16, 64, 3, 3)
    xp, wp = K.pack_activations(x, 1), K.pack_weights(w)
    conv = dict(in_channels=64, out_channels=16, kernel_size=3, padding=1)
    thr = torch.zeros(16, dtype=torch.int32)
    above = torch.arange(16) % 2 == 0
    a = K.binary_conv2d_threshold(xp, wp, thresholds=thr, direction=above, **conv)
    b = K.binary_conv2d_threshold(xp, wp, thresholds=thr, direction=torch.where(above, -1, 1).to(torch.int8), **conv)
    assert torch.equal(a, b)


@pytest.mark.parametrize("features,out", [(1, 1), (64, 10), (100, 65), (700, 300)])
def test_linear_exact(features, out):
    x, w = torch.randn(5, features), torch.randn(out, features)
    acc = sign(x) @ sign(w).t()
    scale, bias = torch.randn(out), torch.randn(out)
    xp, wp = K.pack_features(x), K.pack_weights(w)
    thr = torch.randint(-features, features + 1, (out,), dtype=torch.int32)
    direction = torch.where(torch.rand(out) < 0.5, 1, -1).to(torch.int8)
    negative = torch.where(direction == 1, acc < thr, acc > thr)
    expected_bits = reference_pack(negative[:, :, None, None], 1).view(5, -1)
    for isa in ISAS:
        _C.set_isa(isa)
        assert torch.equal(K.binary_linear_int(xp, wp, in_features=features).to(torch.float64), acc), isa
        got = K.binary_linear(xp, wp, in_features=features, scale=scale, bias=bias)
        assert torch.equal(got, acc.float() * scale + bias), isa
        bits = K.binary_linear_threshold(xp, wp, in_features=features, thresholds=thr, direction=direction)
        assert torch.equal(bits, expected_bits), isa


# ---------------------------------------------------------------------------
# reference kernel == optimized kernels; threads; concurrency


# ---------------------------------------------------------------------------
# register tiles: every tile of every ISA this CPU runs, exact against the reference

TILES = [(isa, tile) for isa in ISAS for tile in _C.tiles(isa)]


@pytest.fixture
def forced_tile():
    """Force a tile with force(isa, tile); every ISA is back on 'auto' afterwards."""

    def force(isa, tile):
        _C.set_isa(isa)
        _C.set_tile(isa, tile)

    yield force
    for isa in ISAS:
        _C.set_tile(isa, "auto")


@pytest.mark.parametrize("isa,tile", TILES)
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(cfg=threshold_configs(), fused=st.booleans(), threads=st.sampled_from([1, 2]))
def test_every_tile_is_exact(forced_tile, isa, tile, cfg, fused, threads):
    x, w, gen = make(cfg)
    acc = reference_conv(x, w, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["pad_value"])
    co = cfg["cout"]
    scale, bias = torch.randn(co, generator=gen), torch.randn(co, generator=gen)
    residual = torch.randn(acc.shape, generator=gen)
    k = cfg["cin"] // cfg["groups"] * cfg["kernel"][0] * cfg["kernel"][1]
    thresholds = torch.randint(-k - 1, k + 2, (co,), generator=gen, dtype=torch.int32)
    direction = torch.where(torch.rand(co, generator=gen) < 0.5, 1, -1).to(torch.int8)
    below = (direction == 1).view(1, -1, 1, 1)
    thr = thresholds.view(1, -1, 1, 1).to(torch.float64)
    oph, opw = cfg["out_padding"]
    negative = F.pad(torch.where(below, acc < thr, acc > thr), (opw, opw, oph, oph), value=cfg["out_pad_value"] < 0)
    wp = K.pack_weights(w, cfg["groups"])
    source = conv_input(x, cfg, fused)
    forced_tile(isa, tile)
    torch.set_num_threads(threads)
    got_int = K.binary_conv2d_int(source, wp, **conv_kwargs(cfg))
    got_float = K.binary_conv2d(source, wp, scale=scale, bias=bias, residual=residual, **conv_kwargs(cfg))
    got_bits = K.binary_conv2d_threshold(
        source,
        wp,
        thresholds=thresholds,
        direction=direction,
        out_padding=cfg["out_padding"],
        out_pad_value=cfg["out_pad_value"],
        out_groups=cfg["out_groups"],
        **conv_kwargs(cfg),
    )
    assert torch.equal(got_int.to(torch.float64), acc)
    assert torch.equal(got_float, acc.to(torch.float32) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1) + residual)
    assert torch.equal(got_bits, reference_pack(negative, cfg["out_groups"]))


@pytest.mark.parametrize("isa,tile", TILES)
def test_every_tile_on_the_benchmark_layers(forced_tile, isa, tile):
    """Full-size layers: several channel blocks, many pixel tiles, one or two 31-step byte flushes."""
    gen = torch.Generator().manual_seed(5)
    for n, c, size in [(2, 256, 9), (1, 64, 20), (1, 96, 7)]:
        x, w = torch.randn(n, c, size, size, generator=gen), torch.randn(c, c, 3, 3, generator=gen)
        expected = reference_conv(x, w, (1, 1), (1, 1), (1, 1), 1, 0.0)
        forced_tile(isa, tile)
        got = K.binary_conv2d_int(x, K.pack_weights(w), in_channels=c, out_channels=c, kernel_size=3, padding=1)
        assert torch.equal(got.to(torch.float64), expected), (n, c, size)


def test_tiles_are_listed_forced_and_reported(forced_tile):
    assert _C.tiles("reference") == []
    for isa in ISAS:
        if isa == "reference":
            continue
        names = _C.tiles(isa)
        assert names and len(set(names)) == len(names), isa
        assert _C.tile(isa) == "auto"
        x, w = torch.randn(1, 32, 6, 6), torch.randn(32, 32, 3, 3)
        plan = K._conv_plan(K._MODE_INT, x, K.pack_weights(w), 32, 32, 3, 1, 1, 1, 1, 0.0).native
        _C.set_isa(isa)
        assert plan.tile == ""  # not run on this ISA yet
        K.binary_conv2d_int(x, K.pack_weights(w), in_channels=32, out_channels=32, kernel_size=3, padding=1)
        assert plan.tile in names  # chosen by timing
        assert any(i == isa and "32->32 @6x6" in shape and t in names for i, shape, t in _C.tile_choices())
        forced_tile(isa, names[-1])
        assert _C.tile(isa) == names[-1] and plan.tile == names[-1]


TILED_ISAS = [isa for isa in ISAS if _C.tiles(isa)]  # this CPU's ISAs with register tiles, fastest first


def test_bad_tile_names_raise_naming_the_valid_ones():
    isa = TILED_ISAS[0]
    with pytest.raises(ValueError, match="expected one of " + ", ".join(_C.tiles(isa))):
        _C.set_tile(isa, "9x9")
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        _C.set_tile("sse9", "2x16")
    with pytest.raises(ValueError, match="no register tiles"):
        _C.set_tile("reference", "1x1")


def _last_tiles() -> str:
    """ONEBIT_TILE forcing every tiled ISA of this CPU onto its last tile (not the default, where it has two)."""
    return ",".join(f"{isa}:{_C.tiles(isa)[-1]}" for isa in TILED_ISAS)


@pytest.mark.parametrize("kind", ["ok", "unknown tile", "no tile"])
def test_onebit_tile_environment_variable(kind):
    import subprocess
    import sys

    isa = TILED_ISAS[0]
    value = {"ok": _last_tiles(), "unknown tile": f"{isa}:5x5", "no tile": isa}[kind]
    code = f"from onebit import _C; print(_C.tile({isa!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, ONEBIT_TILE=value), capture_output=True, text=True
    )
    if kind == "ok":
        assert result.returncode == 0 and result.stdout.strip() == _C.tiles(isa)[-1], result.stderr
    else:
        assert result.returncode != 0 and "ONEBIT_TILE=" + value in result.stderr


BIG = dict(n=2, cin=200, cout=96, h=17, w=15, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), padding=(1, 1), groups=1)


@pytest.mark.parametrize("pad_value", [0.0, -1.0])
def test_reference_kernel_equals_optimized(pad_value):
    cfg = dict(BIG, pad_value=pad_value, layout="contiguous", seed=1)
    x, w, _ = make(cfg)
    xp = K.pack_activations(x, cfg["padding"], pad_value)
    wp = K.pack_weights(w)
    results = on_every_isa(lambda: K.binary_conv2d_int(xp, wp, **conv_kwargs(cfg)))
    for isa, got in results.items():
        assert torch.equal(got, results["reference"]), isa


def _all_outputs(x, w, cfg, thr, direction):
    xp = K.pack_activations(x, cfg["padding"], cfg["pad_value"], cfg["groups"])
    wp = K.pack_weights(w, cfg["groups"])
    conv = conv_kwargs(cfg)
    return (
        xp,
        *(
            out
            for source in (xp, x, x.contiguous(memory_format=torch.channels_last))  # packed, or packed in the call
            for out in (
                K.binary_conv2d_int(source, wp, **conv),
                K.binary_conv2d(source, wp, scale=thr.float(), **conv),
                K.binary_conv2d_threshold(source, wp, thresholds=thr, direction=direction, out_padding=1, **conv),
            )
        ),
    )


@pytest.mark.parametrize("cout,out_check", [(96, None), (40, None), (13, None)])
def test_one_and_two_threads_identical(cout, out_check):
    cfg = dict(BIG, cout=cout, n=3, h=30, w=31, pad_value=0.0, layout="contiguous", seed=2)
    x, w, gen = make(cfg)
    x = torch.randn(3, 200, 60, 61, generator=gen)[:, :, ::2, ::2]  # also a strided, multi-threaded pack
    cfg["h"], cfg["w"] = x.shape[2], x.shape[3]
    thr = torch.randint(-50, 50, (cout,), dtype=torch.int32, generator=gen)
    direction = torch.where(torch.rand(cout, generator=gen) < 0.5, 1, -1).to(torch.int8)
    for isa in ISAS:
        if isa == "reference":
            continue
        _C.set_isa(isa)
        torch.set_num_threads(1)
        one = _all_outputs(x, w, cfg, thr, direction)
        torch.set_num_threads(2)
        two = _all_outputs(x, w, cfg, thr, direction)
        for a, b in zip(one, two):
            assert torch.equal(a, b), isa
        fused = one[4:] + two[4:]  # x as is and channels_last, at 1 and 2 threads
        for k, out in enumerate(fused):
            assert torch.equal(out, one[1 + k % 3]), (isa, k)


def test_concurrent_python_threads():
    cfg = dict(BIG, pad_value=0.0, layout="channels_last", seed=3)
    x, w, _ = make(cfg)
    expected = reference_conv(x, w, cfg["stride"], cfg["padding"], cfg["dilation"], 1, 0.0)
    wp = K.pack_weights(w)
    torch.set_num_threads(2)
    errors = []

    def worker():
        try:
            for _ in range(10):
                xp = K.pack_activations(x, cfg["padding"], 0.0)
                got = K.binary_conv2d_int(xp, wp, **conv_kwargs(cfg))
                if not torch.equal(got.to(torch.float64), expected):
                    errors.append("mismatch")
        except Exception as error:  # pragma: no cover - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_runs_kernels():
    """The pool's workers do not survive fork(); the child must get fresh ones, not hang."""
    cfg = dict(BIG, pad_value=0.0, layout="contiguous", seed=4)
    x, w, _ = make(cfg)
    wp = K.pack_weights(w)
    torch.set_num_threads(2)
    expected = K.binary_conv2d_int(K.pack_activations(x, (1, 1)), wp, **conv_kwargs(cfg)).numpy().tobytes()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        # Only onebit's kernels and numpy here: torch's own OpenMP pool is not fork-safe.
        try:
            got = K.binary_conv2d_int(K.pack_activations(x, (1, 1)), wp, **conv_kwargs(cfg))
            os._exit(0 if got.numpy().tobytes() == expected else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# ---------------------------------------------------------------------------
# errors: clear ValueErrors, never a crash


def _good():
    x = torch.randn(1, 70, 6, 6)
    w = torch.randn(8, 70, 3, 3)
    return K.pack_activations(x, 1), K.pack_weights(w), dict(in_channels=70, out_channels=8, kernel_size=3, padding=1)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda xp, wp, c: (xp.float(), wp, c), "xp must have dtype torch.int64"),
        (lambda xp, wp, c: (xp[..., :1], wp, c), "must be contiguous|expected"),
        (lambda xp, wp, c: (xp.view(1, 8, 8, 2), wp, c), "4 dimensions|5 dimensions"),
        (lambda xp, wp, c: (xp, wp, dict(c, in_channels=200)), "words=4"),
        (lambda xp, wp, c: (xp, wp, dict(c, out_channels=9)), "out_channels=9"),
        (lambda xp, wp, c: (xp, wp, dict(c, kernel_size=5)), "KH=5"),
        (lambda xp, wp, c: (xp, wp, dict(c, groups=3)), "groups=3 must divide"),
        (lambda xp, wp, c: (xp, wp, dict(c, groups=2)), "groups=2"),
        (lambda xp, wp, c: (xp, wp, dict(c, padding=4)), "cannot hold padding"),
        (lambda xp, wp, c: (xp, wp, dict(c, padding=0, dilation=4)), "too small"),
        (lambda xp, wp, c: (xp, wp, dict(c, stride=0)), "stride must be >= 1"),
        (lambda xp, wp, c: (xp, wp, dict(c, pad_value=0.5)), "pad_value must be"),
        (lambda xp, wp, c: (xp, wp, dict(c, kernel_size=(3, 3, 3))), "kernel_size must be"),
        (lambda xp, wp, c: (xp, wp.to(torch.int32), c), "wp must have dtype torch.int64"),
        (lambda xp, wp, c: (xp, wp, dict(c, scale=torch.ones(7))), "scale must have shape \\[8\\]"),
        (lambda xp, wp, c: (xp, wp, dict(c, bias=torch.ones(8, dtype=torch.float64))), "bias must have dtype"),
    ],
)
def test_conv_bad_arguments_raise_value_error(mutate, match):
    xp, wp, conv = _good()
    xp, wp, conv = mutate(xp, wp, conv)
    with pytest.raises(ValueError, match=match):
        K.binary_conv2d(xp, wp, **conv)


def test_threshold_bad_arguments():
    xp, wp, conv = _good()
    thr = torch.zeros(8, dtype=torch.int32)
    d = torch.ones(8, dtype=torch.int8)
    with pytest.raises(ValueError, match="thresholds must be integers"):
        K.binary_conv2d_threshold(xp, wp, thresholds=thr.float(), direction=d, **conv)
    with pytest.raises(ValueError, match=r"thresholds must have shape \[8\]"):
        K.binary_conv2d_threshold(xp, wp, thresholds=thr[:7], direction=d, **conv)
    with pytest.raises(ValueError, match="direction must hold only"):
        K.binary_conv2d_threshold(xp, wp, thresholds=thr, direction=torch.zeros(8, dtype=torch.int32), **conv)
    with pytest.raises(ValueError, match=r"direction\[3\] = 0"):
        K.binary_conv2d_threshold(
            xp, wp, thresholds=thr, direction=torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.int8), **conv
        )
    with pytest.raises(ValueError, match="out_groups=3 must divide"):
        K.binary_conv2d_threshold(xp, wp, thresholds=thr, direction=d, out_groups=3, **conv)
    with pytest.raises(ValueError, match="out_pad_value"):
        K.binary_conv2d_threshold(xp, wp, thresholds=thr, direction=d, out_pad_value=2.0, **conv)


def test_pack_bad_arguments():
    with pytest.raises(ValueError, match="x must have dtype torch.float32"):
        K.pack_activations(torch.zeros(1, 3, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 dimensions"):
        K.pack_activations(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="groups=2 must divide"):
        K.pack_activations(torch.zeros(1, 3, 4, 4), groups=2)
    with pytest.raises(ValueError, match="pad_value"):
        K.pack_activations(torch.zeros(1, 3, 4, 4), 1, 0.3)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        K.pack_activations(torch.zeros(1, 3, 4, 4), -1)
    with pytest.raises(ValueError, match="torch.Tensor"):
        K.pack_activations([[1.0]])
    with pytest.raises(ValueError, match="features"):
        K.binary_linear(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), in_features=200)


def test_native_layer_revalidates():
    """The low-level binding checks the numbers itself (ValueError, no crash)."""
    xp, wp, _ = _good()
    with pytest.raises(ValueError, match="words per pixel"):
        _C.conv2d_raw(
            xp.data_ptr(),
            1,
            8,
            8,
            2,
            wp.data_ptr(),
            2,
            200,
            8,
            3,
            3,
            1,
            1,
            1,
            1,
            1,
            1,
            1,
            0,
            0,
            wp.data_ptr(),
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            0,
            1,
        )
    with pytest.raises(ValueError, match="mode"):
        _C.conv2d_raw(
            xp.data_ptr(),
            1,
            8,
            8,
            2,
            wp.data_ptr(),
            2,
            70,
            8,
            3,
            3,
            1,
            1,
            1,
            1,
            1,
            1,
            1,
            0,
            7,
            wp.data_ptr(),
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            0,
            1,
        )
    with pytest.raises(ValueError, match="unknown ISA"):
        _C.set_isa("sse9")


# ---------------------------------------------------------------------------
# tracing: the fake implementations


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        w1, w2 = torch.randn(32, 16, 3, 3), torch.randn(8, 32, 3, 3)
        self.register_buffer("w1", K.pack_weights(w1))
        self.register_buffer("w2", K.pack_weights(w2))
        self.register_buffer("thr", torch.zeros(32, dtype=torch.int32))
        self.register_buffer("dir", torch.ones(32, dtype=torch.int8))
        self.register_buffer("scale", torch.rand(8))

    def forward(self, x):
        xp = K.pack_activations(x, 1, 0.0)
        conv = dict(kernel_size=3, padding=1)
        h = K.binary_conv2d_threshold(
            xp, self.w1, in_channels=16, out_channels=32, thresholds=self.thr, direction=self.dir, out_padding=1, **conv
        )
        return K.binary_conv2d(h, self.w2, in_channels=32, out_channels=8, scale=self.scale, **conv)


def test_torch_export_and_compile_trace_the_ops():
    model = _Block()
    x = torch.randn(2, 16, 9, 9)
    expected = model(x)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"onebit.pack_activations.default", "onebit.binary_conv2d_threshold.default"} <= targets, targets
    assert "onebit.binary_conv2d.default" in targets
    assert torch.equal(exported.module()(x), expected)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_trace_records_the_ops():
    w = K.pack_weights(torch.randn(8, 16, 3, 3))

    def f(x):
        return K.binary_conv2d(K.pack_activations(x, 1), w, in_channels=16, out_channels=8, kernel_size=3, padding=1)

    traced = torch.jit.trace(f, (torch.randn(2, 16, 5, 5),))
    assert "onebit::binary_conv2d" in str(traced.graph)
    x = torch.randn(2, 16, 5, 5)
    assert torch.equal(traced(x), f(x))


def test_opcheck():
    xp, wp, conv = _good()
    args = (xp, wp, 70, 8, [3, 3], [1, 1], [1, 1], [1, 1], 1, 0.0)
    torch.library.opcheck(torch.ops.onebit.binary_conv2d_int.default, args)
    torch.library.opcheck(torch.ops.onebit.binary_conv2d.default, args + (torch.rand(8), None))
    thr, d = torch.zeros(8, dtype=torch.int32), torch.ones(8, dtype=torch.int8)
    torch.library.opcheck(torch.ops.onebit.binary_conv2d_threshold.default, args + (thr, d, [1, 1], -1.0, 2))
    torch.library.opcheck(torch.ops.onebit.pack_activations.default, (torch.randn(2, 5, 3, 3), [1, 0], -1.0, 1))
    # linear layers: 1x1 images, where channels_last strides are easy to get subtly wrong
    xl, wl = (
        K.pack_features(torch.randn(3, 100)).view(3, 1, 1, 1, 2),
        K.pack_weights(torch.randn(5, 100)).view(5, 1, 1, 2),
    )
    lin = (xl, wl, 100, 5, [1, 1], [1, 1], [0, 0], [1, 1], 1, 0.0)
    torch.library.opcheck(torch.ops.onebit.binary_conv2d.default, lin + (None, torch.rand(5)))
    torch.library.opcheck(torch.ops.onebit.binary_conv2d_int.default, lin)


def test_linear_traces():
    w = torch.randn(10, 100)
    wp, scale = K.pack_weights(w), torch.rand(10)

    def f(x):
        return K.binary_linear(K.pack_features(x), wp, in_features=100, scale=scale)

    x = torch.randn(4, 100)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), f(x))


# ---------------------------------------------------------------------------
# prepared weights kept between calls


def test_weight_cache_reuses_and_refreshes_prepared_weights():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(70, 40, 3, 3, generator=gen)
    wp = K.pack_weights(w)
    conv = dict(in_channels=40, out_channels=70, kernel_size=3, padding=1)
    cache = K.WeightCache()
    # several input shapes (several plans), every ISA, in turn: each call equals an uncached one
    inputs = [torch.randn(n, 40, s, s, generator=gen) for n, s in [(1, 9), (2, 5), (1, 12), (3, 7), (1, 6), (1, 9)]]
    for _ in range(2):
        for isa in ISAS:
            _C.set_isa(isa)
            for x in inputs:
                expected = reference_conv(x, w, (1, 1), (1, 1), (1, 1), 1, 0.0)
                got = K.binary_conv2d_int(x, wp, cache=cache, **conv)
                assert torch.equal(got.to(torch.float64), expected), isa
    assert 1 <= cache.entries <= 4  # a few entries, the most recently used
    # a write to the weights (their version changes) is seen by the next call
    x = inputs[0]
    before = K.binary_conv2d_int(x, wp, cache=cache, **conv)
    wp[:7] = ~wp[:7] & K.pack_weights(torch.ones(7, 40, 3, 3) * -1)  # flip output channels 0..6
    w[:7] = -w[:7]
    after = K.binary_conv2d_int(x, wp, cache=cache, **conv)
    assert torch.equal(after.to(torch.float64), reference_conv(x, w, (1, 1), (1, 1), (1, 1), 1, 0.0))
    assert torch.equal(after[:, :7], -before[:, :7]) and torch.equal(after[:, 7:], before[:, 7:])


def test_residual_must_match_the_output():
    x, wp = torch.randn(1, 8, 5, 5), K.pack_weights(torch.randn(4, 8, 3, 3))
    conv = dict(in_channels=8, out_channels=4, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        K.binary_conv2d(x, wp, residual=torch.zeros(1, 4, 5, 4), **conv)
    with pytest.raises(ValueError, match="residual must have dtype torch.float32"):
        K.binary_conv2d(x, wp, residual=torch.zeros(1, 4, 5, 5, dtype=torch.float64), **conv)
    with pytest.raises(ValueError, match="residual must be on the CPU"):
        K.binary_conv2d(x, wp, residual=torch.zeros(1, 4, 5, 5, device="meta"), **conv)


def test_weight_cache_rejects_other_objects():
    wp = K.pack_weights(torch.randn(8, 8, 1, 1))
    with pytest.raises(ValueError, match="WeightCache"):
        K.binary_conv2d_int(torch.randn(1, 8, 2, 2), wp, in_channels=8, out_channels=8, kernel_size=1, cache={})


# ----------------------------------------------------------------------------- max pooling on bits


def _packed_signs(negative: torch.Tensor, groups: int) -> torch.Tensor:
    """Packed [N, H, W, G, Wg] bits of a bool [N, C, H, W] (bit set = negative)."""
    return K.pack_activations(torch.where(negative, -1.0, 1.0), groups=groups)


@SETTINGS
@given(
    st.integers(1, 2),
    st.integers(1, 150),
    st.sampled_from([1, 2, 3]),
    st.integers(1, 7),
    st.integers(1, 7),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.booleans(),
    st.integers(0, 1),
    st.data(),
)
def test_max_pool_bits_equals_the_bits_of_max_pooled_accumulators(
    n, cg, groups, h, w, kh, kw, dil, ceil, out_pad, data
):
    """Pooling the thresholded bits == thresholding the max-pooled integer accumulators (torch)."""
    stride = data.draw(st.integers(1, 3))
    ph, pw = data.draw(st.integers(0, kh // 2)), data.draw(st.integers(0, kw // 2))
    if (h + 2 * ph - dil * (kh - 1) - 1) < 0 or (w + 2 * pw - dil * (kw - 1) - 1) < 0:
        return  # the window does not fit
    c = cg * groups
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    acc = torch.randint(-6, 7, (n, c, h, w), generator=g).double()
    thr = torch.randint(-3, 4, (c,), generator=g).double().view(1, c, 1, 1)
    down = torch.rand(c, generator=g) < 0.5  # direction -1: negative where acc > thr
    negative = lambda a: torch.where(down.view(1, c, 1, 1), a > thr, a < thr)  # noqa: E731
    pooled = F.max_pool2d(acc, (kh, kw), stride, (ph, pw), dil, ceil_mode=ceil)
    expected = _packed_signs(negative(pooled), groups)
    or_mask = _packed_signs(down.view(1, c, 1, 1), groups)[0, 0, 0]
    pad_words = _packed_signs(torch.rand(1, c, 1, 1, generator=g) < 0.5, groups)[0, 0, 0]
    if out_pad:
        border = pad_words.expand(n, expected.shape[1] + 2, expected.shape[2] + 2, *pad_words.shape).clone()
        border[:, 1:-1, 1:-1] = expected
        expected = border
    bits = _packed_signs(negative(acc), groups)
    pool = dict(
        kernel_size=(kh, kw),
        stride=stride,
        padding=(ph, pw),
        dilation=dil,
        ceil_mode=ceil,
        out_padding=out_pad,
        channels=c,
    )
    assert torch.equal(K.max_pool_bits(bits, or_mask, pad_words, **pool), expected)
    assert torch.equal(K.MaxPoolBitsLayer(or_mask, pad_words, **pool)(bits), expected)  # its operands bound


def test_max_pool_bits_rejects_bad_arguments_by_name():
    xp = torch.zeros(1, 4, 4, 1, 1, dtype=torch.int64)
    masks = torch.zeros(1, 1, dtype=torch.int64)
    pool = dict(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False, out_padding=0, channels=8)
    with pytest.raises(ValueError, match="or_mask must have shape"):
        K.max_pool_bits(xp, torch.zeros(2, 1, dtype=torch.int64), masks, **pool)
    with pytest.raises(ValueError, match="xp must have dtype"):
        K.max_pool_bits(xp.int(), masks, masks, **pool)
    with pytest.raises(ValueError, match="do not fill"):
        K.max_pool_bits(xp, masks, masks, **{**pool, "channels": 65})
    with pytest.raises(ValueError, match="too small"):
        K.max_pool_bits(xp, masks, masks, **{**pool, "kernel_size": 5})
    layer = K.MaxPoolBitsLayer(masks, masks, **pool)  # the same messages, from the first call of a shape
    with pytest.raises(ValueError, match="xp must have dtype"):
        layer(xp.int())
    with pytest.raises(ValueError, match="too small"):
        layer(xp[:, :1])
    with pytest.raises(ValueError, match="or_mask must have shape"):
        layer(torch.zeros(1, 4, 4, 2, 1, dtype=torch.int64))
    assert torch.equal(layer(xp), K.max_pool_bits(xp, masks, masks, **pool))
    assert torch.equal(layer(xp.transpose(1, 2)), K.max_pool_bits(xp.transpose(1, 2), masks, masks, **pool))


def _conv_case(cout, cin, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, 3, 3, generator=gen)
    x = torch.randn(2, cin, 6, 6, generator=gen)
    return w, x, dict(in_channels=cin, out_channels=cout, kernel_size=3, padding=1)


@pytest.mark.parametrize(
    "write",
    ["data_bitwise_not", "data_copy", "numpy_whole", "numpy_one_word_small", "detach_in_place"],
)
def test_weight_cache_sees_writes_that_bypass_the_version_counter(write):
    cout = 8 if write == "numpy_one_word_small" else 96  # 72 words (all probed) or 864 words
    w, x, conv = _conv_case(cout, 40, 21)
    wp = K.pack_weights(w)
    cache = K.WeightCache()
    K.binary_conv2d_int(x, wp, cache=cache, **conv)  # prepared and cached
    version = wp._version
    flipped = -w
    if write == "data_bitwise_not":
        wp.data.bitwise_not_()
        wp.data &= K.pack_weights(-torch.ones_like(w))  # keep the unused high bits clear
    elif write == "data_copy":
        wp.data.copy_(K.pack_weights(flipped))
    elif write == "numpy_whole":
        wp.numpy()[...] = K.pack_weights(flipped).numpy()
    elif write == "numpy_one_word_small":
        flipped = w.clone()
        flipped[3, :, 1, 2] = -w[3, :, 1, 2]
        wp.numpy()[3, 1, 2] = K.pack_weights(flipped).numpy()[3, 1, 2]
    else:
        wp.detach().copy_(K.pack_weights(flipped))  # detach shares the counter: an ordinary write
    if write != "detach_in_place":
        assert wp._version == version  # the counter did not see it
    got = K.binary_conv2d_int(x, wp, cache=cache, **conv)
    assert torch.equal(got.to(torch.float64), reference_conv(x, flipped, (1, 1), (1, 1), (1, 1), 1, 0.0))


def test_weight_cache_clear_after_a_small_write_through_an_alias_into_a_large_weight():
    w, x, conv = _conv_case(96, 40, 22)
    wp = K.pack_weights(w)
    cache = K.WeightCache()
    before = K.binary_conv2d_int(x, wp, cache=cache, **conv)
    flipped = w.clone()
    flipped[5, :, 0, 1] = -w[5, :, 0, 1]
    word = K.pack_weights(flipped).numpy()[5, 0, 1]
    wp.numpy()[5, 0, 1] = word  # one word of 864, not probed: the documented case for clear()
    stale = K.binary_conv2d_int(x, wp, cache=cache, **conv)
    assert torch.equal(stale, before)
    cache.clear()
    got = K.binary_conv2d_int(x, wp, cache=cache, **conv)
    assert torch.equal(got.to(torch.float64), reference_conv(x, flipped, (1, 1), (1, 1), (1, 1), 1, 0.0))


@pytest.mark.parametrize(
    "bad",
    [
        dict(in_channels=200),
        dict(out_channels=9),
        dict(kernel_size=5),
        dict(groups=3),
        dict(padding=4),
        dict(padding=0, dilation=4),
        dict(stride=0),
        dict(pad_value=0.5),
        dict(kernel_size=(3, 3, 3)),
    ],
)
def test_native_reference_and_fake_paths_raise_the_same_message(bad):
    """One argument check (onebit.engine.geometry) for every path of a binary convolution."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from onebit.engine import ops

    xp, wp, conv = _good()
    conv = dict(conv, **bad)
    messages = []
    for backend in ("native", "reference"):
        with ops.use_backend(backend), pytest.raises(ValueError) as error:
            ops.binary_conv2d(xp, wp, **conv)
        messages.append(str(error.value))
    with FakeTensorMode() as mode, pytest.raises(ValueError) as error:
        K.binary_conv2d(mode.from_tensor(xp), mode.from_tensor(wp), **conv)
    messages.append(str(error.value))
    assert messages[0] == messages[1] == messages[2], messages


# ----------------------------------------------------------------------------- a conv with its operands bound


@pytest.mark.parametrize("layout", ["packed", "nchw", "channels_last", "permuted"])
@pytest.mark.parametrize("epilogue", ["none", "scale_bias", "batchnorm_residual"])
def test_conv_layer_equals_binary_conv2d(layout, epilogue):
    """ConvLayer(wp, ...)(x, residual) is binary_conv2d(x, wp, ..., residual=residual), bit for bit,
    and both equal the float64 reference conv followed by the epilogue's float32 roundings."""
    w, x, conv = _conv_case(24, 40, 31)
    conv = dict(conv, stride=2, pad_value=-1.0)
    gen = torch.Generator().manual_seed(3)
    wp = K.pack_weights(w)
    operands = {}
    if epilogue != "none":
        operands = dict(scale=torch.rand(24, generator=gen) + 0.5, bias=torch.randn(24, generator=gen))
    if epilogue == "batchnorm_residual":
        operands.update(bn_scale=torch.randn(24, generator=gen), bn_shift=torch.randn(24, generator=gen), bn_fma=True)
    source = {
        "packed": K.pack_activations(x, 1, -1.0),
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "permuted": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
    }[layout]
    residual = torch.randn(2, 24, 3, 3, generator=gen) if epilogue == "batchnorm_residual" else None
    layer = K.ConvLayer(wp, cache=K.WeightCache(), **operands, **conv)
    got = layer(source, residual)
    assert torch.equal(got, K.binary_conv2d(source, wp, residual=residual, **operands, **conv))
    if residual is not None:  # a channels_last shortcut is read in place, any other layout through a copy
        assert torch.equal(layer(source, residual.contiguous(memory_format=torch.channels_last)), got)
        assert torch.equal(layer(source, residual.transpose(2, 3).contiguous().transpose(2, 3)), got)
    expected = reference_conv(x, w, (2, 2), (1, 1), (1, 1), 1, -1.0).to(torch.float32)
    if epilogue != "none":
        expected = expected * operands["scale"].view(1, -1, 1, 1) + operands["bias"].view(1, -1, 1, 1)
    if epilogue == "batchnorm_residual":
        from onebit.engine.reference import fused_multiply_add  # one rounding, emulated exactly

        bn_scale, bn_shift = operands["bn_scale"].view(1, -1, 1, 1), operands["bn_shift"].view(1, -1, 1, 1)
        expected = fused_multiply_add(expected, bn_scale, bn_shift) + residual
    assert torch.equal(got, expected)


NCHW_WRITER_CASES = [  # (N, Cin, Co, H, W, kernel, padding, dilation, groups, pad_value)
    (1, 64, 64, 8, 16, 3, 1, 1, 1, 0.0),  # one input word a pixel: the packed input as it is
    (2, 130, 37, 7, 8, 3, 1, 1, 1, 0.0),  # 3 words a pixel (made word-planar); 7 x 8 planes: pairs across images
    (1, 48, 20, 5, 12, 3, 0, (1, 2), 2, 0.0),  # groups, dilation, no padding; 8 columns out
    (3, 70, 9, 4, 16, (3, 5), (1, 2), 1, 1, -1.0),  # -1 padding (no corrections); 9 channels: 2 + 1 odd tiles
    (1, 31, 33, 9, 24, 1, 0, 1, 1, 0.0),  # 1x1; 27 groups: an odd one at the end
]


@pytest.mark.parametrize("case", NCHW_WRITER_CASES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("epilogue", ["none", "scale_bias", "batchnorm_residual"])
def test_an_nchw_output_whose_rows_are_whole_8_pixel_groups_is_written_by_the_nchw_kernel(case, threads, epilogue):
    """Stride 1 and output rows of whole 8-pixel groups: on AVX-512 a kernel that holds pixels in its
    lanes writes the NCHW output itself (no transposes); its values are the float64 reference conv's
    with the epilogue's float32 roundings, as the channels_last output's, on every ISA."""
    n, cin, cout, h, w, kernel, padding, dilation, groups, pad_value = case
    gen = torch.Generator().manual_seed(cin * cout)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    weights = torch.randn(cout, cin // groups, kh, kw, generator=gen)
    x = torch.randn(n, cin, h, w, generator=gen)
    conv = dict(
        in_channels=cin,
        out_channels=cout,
        kernel_size=(kh, kw),
        padding=padding,
        dilation=dilation,
        groups=groups,
        pad_value=pad_value,
    )
    wp, operands = K.pack_weights(weights, groups=groups), {}
    if epilogue != "none":
        operands = dict(scale=torch.rand(cout, generator=gen) + 0.5, bias=torch.randn(cout, generator=gen))
    if epilogue == "batchnorm_residual":
        operands.update(bn_scale=torch.randn(cout, generator=gen), bn_shift=torch.randn(cout, generator=gen))
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    expected = reference_conv(x, weights, (1, 1), (ph, pw), (dh, dw), groups, pad_value).to(torch.float32)
    assert expected.shape[-1] % 8 == 0
    residual = torch.randn(expected.shape, generator=gen) if epilogue == "batchnorm_residual" else None
    if epilogue != "none":
        expected = expected * operands["scale"].view(1, -1, 1, 1) + operands["bias"].view(1, -1, 1, 1)
    if epilogue == "batchnorm_residual":
        bn_scale, bn_shift = operands["bn_scale"].view(1, -1, 1, 1), operands["bn_shift"].view(1, -1, 1, 1)
        expected = expected * bn_scale + bn_shift + residual
    layer = K.ConvLayer(wp, **operands, **conv)
    plan = K.conv_plan(K.MODE_FLOAT, x, wp, *layer.conv).native
    torch.set_num_threads(threads)
    for isa in ISAS:
        _C.set_isa(isa)
        assert bool(plan.nchw_kernel) == (isa == "avx512"), isa
        got = layer(x, residual, torch.contiguous_format)
        assert got.is_contiguous()
        assert torch.equal(got, expected), isa
        assert torch.equal(layer(x, residual), got), isa  # the channels_last output: the same values
        if residual is not None:  # a channels_last residual: the tile and its transposes write the output
            residual_cl = residual.contiguous(memory_format=torch.channels_last)
            assert torch.equal(layer(x, residual_cl, torch.contiguous_format), got), isa


def test_the_nchw_kernel_takes_only_stride_1_rows_of_whole_groups_and_few_border_classes():
    """Where a row would wrap within a group, for strides, and for more than 16 border classes (a 5x5
    kernel padded by 2) the channels_last tiles run and transpose their runs: no NCHW kernel."""
    if "avx512" not in ISAS:
        pytest.skip("the NCHW kernel is AVX-512 code")
    _C.set_isa("avx512")
    wp = K.pack_weights(torch.randn(8, 16, 3, 3))
    x = torch.randn(1, 16, 14, 16)

    def kernel(x, wp, **conv):
        conv = dict(dict(in_channels=x.shape[1], out_channels=wp.shape[0], kernel_size=3, padding=1), **conv)
        return K.conv_plan(K.MODE_FLOAT, x, wp, *K.ConvLayer(wp, **conv).conv).native.nchw_kernel

    assert kernel(x, wp) == "nchw 48x4"
    assert kernel(x[..., :14], wp) == ""  # 14 columns out
    assert kernel(x, wp, stride=(1, 2)) == "" and kernel(x, wp, stride=(2, 1)) == ""
    assert kernel(x, K.pack_weights(torch.randn(8, 16, 5, 5)), kernel_size=5, padding=2) == ""  # 25 classes
    assert kernel(x[..., :12], K.pack_weights(torch.randn(8, 16, 5, 5)), kernel_size=5, padding=0) == "nchw 48x4"


def test_conv_layer_checks_its_operands_once_and_its_input_on_every_call():
    w, x, conv = _conv_case(8, 16, 32)
    wp = K.pack_weights(w)
    with pytest.raises(ValueError, match="scale"):
        K.ConvLayer(wp, scale=torch.ones(7), **conv)
    with pytest.raises(ValueError, match="bn_scale and bn_shift go together"):
        K.ConvLayer(wp, bn_scale=torch.ones(8), **conv)
    with pytest.raises(ValueError, match="wp"):
        K.ConvLayer(wp.float(), **conv)
    with pytest.raises(ValueError, match="groups"):
        K.ConvLayer(wp, **dict(conv, groups=3))
    layer = K.ConvLayer(wp, **conv)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        layer(x, torch.zeros(2, 8, 5, 6))
    with pytest.raises(ValueError, match="16"):
        layer(x[:, :15])
    packed = K.pack_activations(x, 1)
    for shortcut in (None, torch.zeros(2, 8, 6, 6)):
        with pytest.raises(ValueError, match="contiguous"):
            layer(packed.transpose(1, 2), shortcut)
    with pytest.raises(ValueError, match="residual must have the output's shape"):  # an empty batch too
        layer(x[:0], torch.zeros(1, 8, 6, 6))
    for n, size in [(1, 4), (3, 7), (2, 6)]:  # several input shapes, one layer
        other = torch.randn(n, 16, size, size)
        assert torch.equal(layer(other), K.binary_conv2d(other, wp, **conv))


def test_threshold_conv_layer_checks_its_operands_once_and_its_input_on_every_call():
    w, x, conv = _conv_case(8, 16, 35)
    wp, thresholds, direction = K.pack_weights(w), torch.zeros(8, dtype=torch.int32), torch.ones(8, dtype=torch.int8)
    with pytest.raises(ValueError, match="thresholds"):
        K.ThresholdConvLayer(wp, thresholds=thresholds[:7], direction=direction, **conv)
    with pytest.raises(ValueError, match="integers"):
        K.ThresholdConvLayer(wp, thresholds=thresholds.float(), direction=direction, **conv)
    with pytest.raises(ValueError, match="wp"):
        K.ThresholdConvLayer(wp.float(), thresholds=thresholds, direction=direction, **conv)
    layer = K.ThresholdConvLayer(wp, thresholds=thresholds, direction=direction, out_groups=3, **conv)
    with pytest.raises(ValueError, match="out_groups"):  # the output's numbers: at the first call of a shape
        layer(x)
    layer = K.ThresholdConvLayer(wp, thresholds=thresholds, direction=direction, out_padding=1, **conv)
    with pytest.raises(ValueError, match="16"):
        layer(x[:, :15])
    with pytest.raises(ValueError, match="contiguous"):
        layer(K.pack_activations(x, 1).transpose(1, 2))
    bad = K.ThresholdConvLayer(wp, thresholds=thresholds, direction=direction.clone().fill_(2), **conv)
    with pytest.raises(ValueError, match="direction"):  # a direction's values: read by the kernel, every call
        bad(x)
    expected = K.binary_conv2d_threshold(x, wp, thresholds=thresholds, direction=direction, out_padding=1, **conv)
    assert torch.equal(layer(x), expected)
    assert torch.equal(copy.deepcopy(layer)(x), expected)  # a copy binds its own tensors' addresses
    for n, size in [(1, 4), (3, 7)]:  # several input shapes, one layer
        other = torch.randn(n, 16, size, size)
        assert torch.equal(
            layer(other),
            K.binary_conv2d_threshold(other, wp, thresholds=thresholds, direction=direction, out_padding=1, **conv),
        )


def test_conv_layer_on_inference_tensors_prepares_its_weights_every_call():
    w, x, conv = _conv_case(8, 16, 34)
    with torch.inference_mode():
        wp = K.pack_weights(w)  # counts no writes: a cache could not see them
    layer = K.ConvLayer(wp, cache=K.WeightCache(), **conv)
    assert layer.cache is None
    assert torch.equal(layer(x), K.binary_conv2d(x, wp, **conv))


def test_conv_layer_under_fake_tensors_takes_the_custom_op():
    """A traced call (fake tensors) gets the output's shape and layout from the op's fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, x, conv = _conv_case(8, 16, 33)
    layer = K.ConvLayer(K.pack_weights(w), scale=torch.ones(8), **conv)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = layer(mode.from_tensor(x))
    assert out.shape == (2, 8, 6, 6) and out.stride() == (288, 1, 48, 8)


def test_conv_layer_copies_and_pickles_read_their_own_tensors():
    import copy
    import io

    w, x, conv = _conv_case(8, 16, 35)
    gen = torch.Generator().manual_seed(4)
    wp, scale = K.pack_weights(w), torch.rand(8, generator=gen) + 0.5
    layer = K.ConvLayer(wp, scale=scale, cache=K.WeightCache(), **conv)
    expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(layer), torch.load(buffer, weights_only=False)]
    wp.bitwise_not_()  # the original's weights change (all signs flip); the copies keep theirs
    wp &= K.pack_weights(-torch.ones_like(w))
    scale.mul_(2)
    for clone in copies:
        assert clone.cache is not None and clone.cache is not layer.cache
        assert torch.equal(clone(x), expected)
    assert torch.equal(layer(x), -2 * expected)
