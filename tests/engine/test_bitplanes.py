"""k-bit and ternary convolutions by bit planes: exact against a float64 convolution of the levels,
and k-bit / ternary layers packed bit-identical to the model (files, every ISA, onnxruntime)."""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import onebit
from onebit import _C, engine, quant
from onebit.engine import bitplanes as bitplanes_mod
from onebit.engine import kernels as K
from onebit.engine import ops
from onebit.engine.bitplanes import PlaneCode, bitplane_conv2d_int, stack_weight_planes
from onebit.nn import QActivation, QConv2d, QLinear
from onebit.quant import DoReFaSymmetric, Ternary

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="the native kernels are not built")

ACT_CODES = [
    PlaneCode.symmetric(1),
    PlaneCode.symmetric(2),
    PlaneCode.symmetric(3),
    PlaneCode.unsigned(1),
    PlaneCode.unsigned(2),
    PlaneCode.unsigned(4),
    PlaneCode.binary(),
]
WEIGHT_CODES = [PlaneCode.binary(), PlaneCode.ternary(), PlaneCode.symmetric(2), PlaneCode.symmetric(3)]


def random_levels(code: PlaneCode, shape, gen) -> torch.Tensor:
    lo, hi = code.levels
    v = torch.randint(lo, hi + 1, shape, generator=gen).float()
    if code.kind == "symmetric":
        v = torch.where(torch.remainder(v, 2) == 1, v, v + torch.where(v < hi, 1.0, -1.0))
    if code.kind == "binary":
        v = torch.where(v >= 0, 1.0, -1.0)
    return v


@pytest.mark.parametrize("code", ACT_CODES + [PlaneCode.ternary()], ids=lambda c: f"{c.kind}{c.bits}")
def test_planes_sum_back_to_every_level(code):
    lo, hi = code.levels
    levels = torch.arange(lo, hi + 1).float()
    if code.kind == "symmetric":
        levels = levels[torch.remainder(levels, 2) == 1]
    if code.kind == "binary":
        levels = torch.tensor([-1.0, 1.0])
    planes = code.split(levels)
    assert planes.shape[0] == code.planes and set(planes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(code.join(planes), levels.double())


def test_levels_outside_the_code_are_refused():
    with pytest.raises(ValueError, match="level 2.0 is not a symmetric 2-bit"):
        PlaneCode.symmetric(2).split(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="level 0.5 is not a ternary"):
        PlaneCode.ternary().split(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="bits must be an integer in"):
        PlaneCode.unsigned(0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ACT_CODES),
    st.sampled_from(WEIGHT_CODES),
    st.integers(1, 2),
    st.sampled_from([1, 2]),
    st.integers(1, 70),
    st.integers(1, 9),
    st.sampled_from([1, 3]),
    st.integers(0, 2),
    st.integers(1, 2),
    st.integers(0, 2**31 - 1),
)
def test_bitplane_conv_equals_the_float64_conv_of_the_levels(act, wcode, n, groups, cg, cog, k, pad, stride, seed):
    gen = torch.Generator().manual_seed(seed)
    cin, cout = cg * groups, cog * groups
    h = w = 7
    x_int = random_levels(act, (n, cin, h, w), gen)
    levels = random_levels(wcode, (cout, cg, k, k), gen)
    expected = F.conv2d(x_int.double(), levels.double(), None, stride, pad, 1, groups)
    stacked = stack_weight_planes(levels, wcode, act.planes, groups)
    packed = K.pack_weights(stacked, act.planes * groups)
    sums = wcode.split(levels).sum(dim=(2, 3, 4)).double()
    got = bitplane_conv2d_int(
        x_int,
        packed,
        sums,
        act=act,
        weight=wcode,
        in_channels=cin,
        out_channels=cout,
        kernel_size=(k, k),
        stride=(stride, stride),
        padding=(pad, pad),
        groups=groups,
    )
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), expected)


# ---------------------------------------------------------------------------
# k-bit and ternary layers, packed: bit-identical to the model

INPUTS = {
    "dorefa1": lambda: quant.DoReFa(1),
    "dorefa2": lambda: quant.DoReFa(2),
    "dorefa4": lambda: quant.DoReFa(4),
    "sym1": lambda: DoReFaSymmetric(1, 1.0),
    "sym2": lambda: DoReFaSymmetric(2, 1.3),
    "sym3": lambda: DoReFaSymmetric(3, 0.8),
    "sym2_learned": lambda: DoReFaSymmetric(2, 1.7, learnable=True),
}
WEIGHTS = {
    "sign": lambda: quant.get("ste_sign"),
    "magnitude": lambda: quant.get("magnitude_aware_sign"),
    "ternary": lambda: Ternary(),
    "ternary_channel": lambda: Ternary(per_channel=True),
    "dorefa_weight2": lambda: quant.DoReFaWeight(2),
    "dorefa_weight3": lambda: quant.DoReFaWeight(3),
}


def pack_strict(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FallbackWarning
        return engine.pack(model, x, strict=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(INPUTS)),
    st.sampled_from(sorted(WEIGHTS)),
    st.sampled_from([1, 2]),
    st.integers(1, 3),
    st.sampled_from([1, 3]),
    st.integers(0, 1),
    st.integers(1, 2),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_kbit_conv_packs_bit_identical_in_both_layouts(act, wq, groups, n, k, pad, stride, bias, channels_last, seed):
    torch.manual_seed(seed)
    layer = QConv2d(
        6 * groups,
        4 * groups,
        k,
        stride=stride,
        padding=pad,
        groups=groups,
        bias=bias,
        input_quantizer=INPUTS[act](),
        weight_quantizer=WEIGHTS[wq](),
    )
    model = nn.Sequential(nn.BatchNorm2d(6 * groups), layer, nn.ReLU()).eval()
    with torch.no_grad():
        model[0].running_var.uniform_(0.3, 2.0)
        model[0].running_mean.normal_(0.0, 0.5)
    x = torch.randn(n, 6 * groups, 7, 6) * 1.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = pack_strict(model, x)
    assert [node["op"] for node in packed.graph["nodes"]].count("bitplane_conv2d") == 1
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


@pytest.mark.parametrize("act", ["dorefa2", "sym2", "sym3"])
@pytest.mark.parametrize("wq", ["magnitude", "ternary", "dorefa_weight2"])
def test_kbit_linear_packs_bit_identical(act, wq):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Flatten(),
        QLinear(48, 12, input_quantizer=INPUTS[act](), weight_quantizer=WEIGHTS[wq]()),
        QLinear(12, 5, bias=False, input_quantizer=INPUTS[act](), weight_quantizer=WEIGHTS[wq]()),
    ).eval()
    x = torch.randn(5, 3, 4, 4)
    packed = pack_strict(model, x)
    assert [node["op"] for node in packed.graph["nodes"]].count("bitplane_conv2d") == 2
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def same_with_nans(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN where the other is NaN."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def with_nans(x: torch.Tensor, gen: torch.Generator, count: int) -> torch.Tensor:
    """``x`` with ``count`` NaN (and as many infinities, which the quantizers clamp) at random positions."""
    x = x.clone()
    flat = x.view(-1)
    for value in (float("inf"), -float("inf"), float("nan")):
        for _ in range(count if value != value else max(1, count // 2)):
            flat[torch.randint(0, flat.numel(), (1,), generator=gen)] = value
    return x


@pytest.mark.usefixtures("restore_isa_and_threads")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(INPUTS)),
    st.sampled_from(sorted(WEIGHTS)),
    st.sampled_from([1, 2, 3]),
    st.integers(1, 3),
    st.tuples(st.integers(1, 4), st.integers(1, 4)),
    st.integers(0, 2),
    st.integers(1, 2),
    st.integers(1, 2),
    st.sampled_from(["nchw", "channels_last", "strided"]),
    st.integers(1, 4),
    st.integers(0, 2**31 - 1),
)
def test_nan_inputs_give_nan_where_the_model_gives_nan(
    act, wq, groups, n, k, pad, stride, dilation, layout, nans, seed
):
    """A NaN input is NaN after every k-bit input quantizer: the model's float conv of the integers is
    NaN at every output reading it (any weight level, 0 included); the packed layer too, in every layout."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layer = QConv2d(
        5 * groups,
        3 * groups,
        k,
        stride=stride,
        padding=pad,
        dilation=dilation,
        groups=groups,
        input_quantizer=INPUTS[act](),
        weight_quantizer=WEIGHTS[wq](),
    )
    model = nn.Sequential(layer).eval()
    h, w = dilation * (k[0] - 1) + 1 + torch.randint(0, 5, (1,), generator=gen).item(), dilation * (k[1] - 1) + 3
    x = with_nans(torch.randn(n, 5 * groups, h, w, generator=gen) * 1.5, gen, nans)
    x = {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": torch.zeros(n, 5 * groups, h, 2 * w).index_copy_(3, torch.arange(0, 2 * w, 2), x)[..., ::2],
    }[layout]
    packed = pack_strict(model, torch.randn(1, 5 * groups, h, w))
    assert [node["op"] for node in packed.graph["nodes"]] == ["bitplane_conv2d"]
    with torch.no_grad():
        want = model(x)
        assume(bool(torch.isnan(want).any()))  # a NaN some output reads (a stride may skip it)
        for isa in _C.supported_isas():
            _C.set_isa(isa)
            assert same_with_nans(packed(x), want), isa
        with engine.use_backend("reference"):
            assert same_with_nans(packed(x), want)


@pytest.mark.parametrize("act", ["dorefa2", "sym2", "sym3"])
@pytest.mark.parametrize("wq", ["sign", "ternary", "dorefa_weight2"])
def test_nan_tokens_give_nan_rows_in_kbit_linear_layers(act, wq):
    torch.manual_seed(4)
    model = nn.Sequential(QLinear(40, 12, input_quantizer=INPUTS[act](), weight_quantizer=WEIGHTS[wq]())).eval()
    x = torch.randn(6, 40)
    x[1, 7] = x[4, 0] = float("nan")
    x[2, 3] = float("inf")
    packed = pack_strict(model, x)
    with torch.no_grad():
        want = model(x)
        assert torch.isnan(want).any(dim=1).tolist() == [False, True, False, False, True, False]
        for backend in ("native", "reference"):
            with engine.use_backend(backend):
                assert same_with_nans(packed(x), want), backend


@pytest.mark.usefixtures("restore_isa_and_threads")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_the_plane_packer_says_whether_its_input_holds_a_nan(layout):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 70, 5, 2 * 6, generator=gen)
    x = {
        "nchw": x[..., :6].contiguous(),
        "channels_last": x[..., :6].contiguous(memory_format=torch.channels_last),
        "strided": x[..., ::2],
    }[layout]
    for isa in _C.supported_isas():
        _C.set_isa(isa)
        for symmetric in (True, False):
            for poke in (None, (0, 0, 0, 0), (1, 69, 4, 5), (1, 33, 2, 3)):
                y = x.clone() if layout != "strided" else x * 1.0
                y = y.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else y
                if layout == "strided":
                    y = torch.zeros(2, 70, 5, 12).index_copy_(3, torch.arange(0, 12, 2), y)[..., ::2]
                if poke is not None:
                    y[poke] = float("nan")
                y[0, 1, 1, 1] = float("inf")
                planes, nan = K.pack_integer_planes_nan(y, (1, 1), 2, symmetric=symmetric, bits=2, clip=1.0)
                assert nan is (poke is not None), (isa, symmetric, poke)
                if poke is None:
                    assert torch.equal(planes, K.pack_integer_planes(y, (1, 1), 2, symmetric=symmetric, bits=2))


def kbit_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        QConv2d(3, 16, 3, padding=1, bias=True, input_quantizer=DoReFaSymmetric(2, 1.5), weight_quantizer=Ternary()),
        nn.BatchNorm2d(16),
        QActivation(DoReFaSymmetric(2, 1.0)),
        QConv2d(
            16, 16, 3, padding=1, groups=2, input_quantizer=quant.DoReFa(2), weight_quantizer=quant.DoReFaWeight(2)
        ),
        nn.Flatten(),
        QLinear(16 * 8 * 8, 10, input_quantizer=DoReFaSymmetric(2, 1.0), weight_quantizer=Ternary()),
    ).eval()


@pytest.mark.usefixtures("restore_isa_and_threads")
def test_kbit_net_on_every_isa_and_the_reference_backend():
    model, x = kbit_net(), torch.randn(3, 3, 8, 8)
    packed = pack_strict(model, x)
    with torch.no_grad():
        want = model(x)
        for isa in _C.supported_isas():
            _C.set_isa(isa)
            assert torch.equal(packed(x), want), isa
        with engine.use_backend("reference"):
            assert torch.equal(packed(x), want)


def test_kbit_file_round_trip_and_bits_per_weight():
    model, x = kbit_net(), torch.randn(2, 3, 8, 8)
    packed = pack_strict(model, x)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kbit.onebit")
        packed.save(path)
        loaded = engine.load(path)
        size = os.path.getsize(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (QConv2d, QLinear)))
    # ternary and 2-bit weights: 2 planes, 2 bits a weight (plus BatchNorm, sums, the graph)
    assert size < weights * 2 / 8 + 8000, size


def test_kbit_layers_in_onnxruntime_bit_identical():
    ort = pytest.importorskip("onnxruntime")
    model, x = kbit_net(), torch.randn(3, 3, 8, 8)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kbit.onnx")
        onebit.export_onnx(model, x, path)
        session = ort.InferenceSession(path)
        y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(y), model(x))


def test_wide_kbit_layers_run_as_the_model_computes_them():
    # 8-bit activations: more planes than pay; the float conv of the integers, divided as the layer divides
    torch.manual_seed(1)
    model = nn.Sequential(
        QConv2d(4, 6, 3, padding=1, input_quantizer=quant.DoReFa(8), weight_quantizer=Ternary())
    ).eval()
    x = torch.randn(2, 4, 6, 6)
    packed = engine.pack(model, x)
    ops_ = [node["op"] for node in packed.graph["nodes"]]
    assert ops_ == ["quantize_int", "qconv2d"]
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


# ---------------------------------------------------------------------------
# the native plane packer and plane-pair sum, against the tensor-op path


@pytest.mark.usefixtures("restore_isa_and_threads")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ACT_CODES[:-1]),
    st.integers(1, 3),
    st.integers(1, 150),
    st.sampled_from([1, 2, 3]),
    st.integers(1, 6),
    st.integers(1, 9),
    st.integers(0, 2),
    st.sampled_from(["nchw", "channels_last", "strided"]),
    st.sampled_from([1, 2]),
    st.floats(0.25, 3.0),
    st.integers(0, 2**31 - 1),
)
def test_native_plane_packer_equals_the_planes_of_the_quantizer_integers(
    act, n, cg, groups, h, w, pad, layout, threads, clip, seed
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cg * groups, h, w, generator=gen) * 1.5
    x[torch.rand(x.shape, generator=gen) < 0.1] = 0.0
    x = {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": torch.randn(n, cg * groups, h, 2 * w, generator=gen)[..., ::2],
    }[layout]
    kind = "dorefa_sym" if act.kind == "symmetric" else "dorefa"
    x_int = bitplanes_mod.integer_input(x, kind, act.bits, clip)
    want = K.pack_activations(
        bitplanes_mod.activation_planes(x_int, act), (pad, pad), act.pad_value, act.planes * groups
    )
    torch.set_num_threads(threads)
    for isa in _C.supported_isas():
        _C.set_isa(isa)
        got = K.pack_integer_planes(x, (pad, pad), groups, symmetric=act.kind == "symmetric", bits=act.bits, clip=clip)
        assert torch.equal(got, want), isa


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ACT_CODES[:-1]),
    st.sampled_from(WEIGHT_CODES),
    st.sampled_from([1, 2]),
    st.integers(1, 40),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_native_plane_sum_equals_the_tensor_op_sum(act, wcode, groups, cog, affine, seed):
    gen = torch.Generator().manual_seed(seed)
    pa, pw, co, d = act.planes, wcode.planes, cog * groups, act.divisor * wcode.divisor
    sums = torch.randint(-50, 50, (pw, co), generator=gen, dtype=torch.int32)
    offset = None
    if act.offset:
        offset = (act.offset * (sums.to(torch.int64) * torch.tensor(wcode.coeffs).view(-1, 1)).sum(0)).to(torch.int32)
    coeff = torch.tensor([[ci * dj for dj in wcode.coeffs] for ci in act.coeffs])  # coeff[0, 0] = 1
    pairs = torch.randint(-300, 300, (2, 3, 4, pa, groups, pw, cog), generator=gen)

    def plane_sum(p):  # [N, OH, OW, C_out]: sum_ij coeff_ij y_ij + offset, by tensor ops
        total = torch.einsum("nxypgjc,pj->nxygc", p, coeff).reshape(2, 3, 4, co)
        return total if offset is None else total + offset

    pairs[:, :, :, 0, :, 0, :] -= torch.remainder(plane_sum(pairs), d).reshape(2, 3, 4, groups, cog)  # a multiple of d
    divisor = float(torch.rand(1, generator=gen).item() * 3 + 0.5)
    scale = torch.rand(co, generator=gen) + 0.5 if affine else None
    bias = torch.randn(co, generator=gen) if affine else None
    want = (plane_sum(pairs) // d).float().permute(0, 3, 1, 2) / divisor
    if affine:
        want = want * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    y = pairs.reshape(2, 3, 4, -1).permute(0, 3, 1, 2).to(torch.int32).contiguous(memory_format=torch.channels_last)
    got = K.combine_planes(
        y,
        coeff.flatten().to(torch.int32),
        offset,
        act_planes=pa,
        groups=groups,
        weight_planes=pw,
        exact_divisor=d,
        divisor=divisor,
        scale=scale,
        bias=bias,
    )
    assert torch.equal(got, want)


def test_kbit_packed_model_through_torch_export():
    model, x = kbit_net(), torch.randn(2, 3, 8, 8)
    packed = pack_strict(model, x)
    program = torch.export.export(packed, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
        x[1, 2, 3, 4] = float("nan")  # the exported program keeps the model's NaN too
        assert bool(torch.isnan(model(x)).any()) and same_with_nans(program.module()(x), model(x))
