"""Beyond one bit: the ternary / absmax8 / symmetric k-bit quantizers, BitLinear, and the packed
ternary x int8 kernels and engine op.

Every result is compared with an independent plain-torch reference (the formulas written out
again, integer sums in int64); kernels are run on every instruction set the machine supports.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import onebit
import onebit.engine
from onebit import _C, quant
from onebit.engine import graph as G
from onebit.engine import kernels as K
from onebit.engine import ops
from onebit.engine import reference as R
from onebit.nn import BitLinear, QLinear
from onebit.quant import Absmax8, DoReFaSymmetric, Ternary

ISAS = _C.supported_isas()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("restore_isa_and_threads")  # tests switch ISAs and threads


# ---------------------------------------------------------------------------
# independent references


def ref_ternary(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's absmean: (levels, gamma broadcastable), for latent (non-ternary) weights."""
    a = w.abs().reshape(w.shape[0], -1) if per_channel else w.abs().reshape(1, -1)
    gamma = a.mean(dim=1).clamp(min=1e-5)
    gamma = gamma.reshape(-1, *[1] * (w.dim() - 1)) if per_channel else gamma.reshape([1] * w.dim())
    return torch.clamp(torch.round(w / gamma), -1, 1), gamma


def ref_absmax8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    s = torch.tensor(127.0) / m
    return torch.clamp(torch.round(x * s), -128, 127), s


def random_levels(out: int, features: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (out, features), generator=gen).to(torch.float32)


def ref_linear_int(x_int: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return (x_int.to(torch.int64) @ levels.to(torch.int64).T).to(torch.int32)


def ref_bitlinear_float(x, levels, scale, bias):
    """(x_int @ levels.T) / s * scale + bias, the integer sum in int64."""
    x_int, s = ref_absmax8(x)
    y = ref_linear_int(x_int, levels).to(torch.float32) / s
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


# ---------------------------------------------------------------------------
# quantizers


@pytest.mark.parametrize(
    "alias, cls, precision", [("ternary", Ternary, 2), ("absmax8", Absmax8, 8), ("dorefa_sym", DoReFaSymmetric, 2)]
)
def test_aliases_resolve_in_string_and_instance_form(alias, cls, precision):
    assert alias in quant.names()
    for form in (alias, cls, cls()):
        q = quant.get(form)
        assert isinstance(q, cls) and quant.precision_of(q) == precision


@pytest.mark.parametrize("form", ["string", "instance"])
@pytest.mark.parametrize("alias", ["ternary", "absmax8", "dorefa_sym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_quantizer_keeps_shape_and_dtype_and_leaves_input_alone(alias, form, dtype):
    q = quant.get(alias) if form == "string" else type(quant.get(alias))()
    x = (torch.randn(3, 4, 5) * 2).to(dtype)
    before = x.clone()
    out = q(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x, before)
    if dtype != torch.bfloat16 or alias != "absmax8":  # 8-bit mantissas cannot hold k / s exactly
        assert torch.equal(q(out), out)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(7, 13), (16, 3, 3, 3), (1, 5)])
def test_ternary_levels_and_gamma_are_bitnets_absmean(per_channel, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q = Ternary(per_channel)
    levels, gamma = q.factor(w)
    want_levels, want_gamma = ref_ternary(w, per_channel)
    assert torch.equal(levels, want_levels)
    assert set(levels.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert gamma.shape == (shape[0],)
    assert torch.equal(gamma, want_gamma.reshape(-1).expand(shape[0]))
    assert torch.equal(q(w), want_levels * want_gamma)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 40),
    per_channel=st.booleans(),
    zeros=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_ternary_is_idempotent_bitwise(rows, cols, per_channel, zeros, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 3
    w = torch.where(torch.rand(rows, cols, generator=gen) < zeros, 0.0, w)
    q = Ternary(per_channel)
    once = q(w)
    assert torch.equal(q(once), once)
    assert torch.equal(q.factor(once)[0], q.factor(w)[0])


def test_ternary_keeps_a_scaled_ternary_tensor_and_zeros():
    t = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    for c in (0.37, 3.0, 1e-7):
        assert torch.equal(Ternary()(t * c), t * c)  # mean|cT| would be c/2: the projection keeps c
    assert torch.equal(Ternary()(torch.zeros(3, 4)), torch.zeros(3, 4))


@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_gradient_is_the_identity(per_channel):
    w = torch.randn(6, 11, requires_grad=True)
    g = torch.randn(6, 11)
    (Ternary(per_channel)(w) * g).sum().backward()
    torch.testing.assert_close(w.grad, g)


def test_absmax8_values_are_the_formula():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 50, generator=gen) * torch.rand(4, 3, 1, generator=gen) * 20
    x_int, s = Absmax8().integer_factor(x)
    want_int, want_s = ref_absmax8(x)
    assert torch.equal(x_int, want_int) and torch.equal(s, want_s)
    assert torch.equal(Absmax8()(x), want_int / want_s)
    assert x_int.abs().amax(dim=-1).eq(127).all()  # every token uses the full range


def test_absmax8_guards_a_zero_token():
    x = torch.zeros(2, 8)
    x[1, 3] = 1e-9
    y = Absmax8()(x)
    assert torch.isfinite(y).all()
    assert torch.equal(Absmax8().integer_factor(x)[1], torch.full((2, 1), 127.0 / torch.tensor(1e-5)))


@SETTINGS
@given(rows=st.integers(1, 6), cols=st.integers(1, 300), scale=st.floats(1e-8, 1e8), seed=st.integers(0, 2**31 - 1))
def test_absmax8_is_idempotent_bitwise(rows, cols, scale, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    once = Absmax8()(x)
    assert torch.equal(Absmax8()(once), once)


def test_absmax8_gradient_is_the_identity():
    x = torch.randn(3, 17, requires_grad=True)
    g = torch.randn(3, 17)
    (Absmax8()(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("clip", [1.0, 2.5])
def test_dorefa_sym_has_2_to_the_k_symmetric_levels(bits, clip):
    x = torch.linspace(-2 * clip, 2 * clip, 20001)
    y = DoReFaSymmetric(bits, clip)(x)
    n = 2**bits - 1
    want = torch.tensor([(2 * j / n - 1) * clip for j in range(n + 1)], dtype=torch.float32)
    got = y.unique()
    assert len(got) == n + 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * clip)
    torch.testing.assert_close(got, -got.flip(0), rtol=0, atol=1e-6 * clip)  # symmetric around 0
    assert torch.equal(y[x <= -clip], torch.full_like(y[x <= -clip], y.min().item()))


def test_dorefa_sym_one_bit_is_sign_with_sign_zero_plus_one():
    x = torch.tensor([-3.0, -0.5, -0.0, 0.0, 1e-30, 0.7, 4.0])
    assert torch.equal(DoReFaSymmetric(1, 2.0)(x), 2.0 * onebit.math.sign(x))


@SETTINGS
@given(bits=st.integers(1, 8), clip=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1))
def test_dorefa_sym_is_idempotent_bitwise(bits, clip, seed):
    x = torch.randn(200, generator=torch.Generator().manual_seed(seed)) * clip * 1.5
    q = DoReFaSymmetric(bits, clip)
    once = q(x)
    assert torch.equal(q(once), once)


def test_dorefa_sym_gradient_passes_inside_the_clip_only():
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, 0.9, 1.0, 1.5], requires_grad=True)
    DoReFaSymmetric(3, 1.0)(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("kwargs", [{"bits": 0}, {"bits": 17}, {"bits": 2.0}, {"clip": 0.0}, {"clip": -1.0}])
def test_dorefa_sym_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="DoReFaSymmetric"):
        DoReFaSymmetric(**kwargs)


# ---------------------------------------------------------------------------
# BitLinear


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_bitlinear_computes_the_integer_sum_then_s_gamma_bias(norm, bias, per_channel):
    torch.manual_seed(3)
    layer = BitLinear(37, 11, bias=bias, norm=norm, per_channel=per_channel)
    x = torch.randn(2, 5, 37) * 4
    xn = F.rms_norm(x, (37,), eps=1e-5) if norm else x
    levels, gamma = ref_ternary(layer.weight.detach(), per_channel)
    want = ref_bitlinear_float(xn, levels, gamma.reshape(-1), layer.bias.detach() if bias else None)
    with torch.no_grad():
        got = layer(x)
    assert torch.equal(got, want)


def test_bitlinear_is_bitnets_math_up_to_float_rounding():
    """y = q8(rmsnorm(x)) @ q3(W).T, all in float64 from the definitions."""
    torch.manual_seed(4)
    layer = BitLinear(64, 9)
    x = torch.randn(6, 64, dtype=torch.float64)
    xn = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + 1e-5)
    s = 127.0 / xn.abs().amax(dim=-1, keepdim=True)
    xq = torch.clamp(torch.round(xn * s), -128, 127) / s
    w = layer.weight.detach().double()
    gamma = w.abs().mean()
    wq = torch.clamp(torch.round(w / gamma), -1, 1) * gamma
    with torch.no_grad():
        torch.testing.assert_close(layer(x.float()).double(), xq @ wq.T, rtol=1e-5, atol=1e-5)


def test_bitlinear_is_a_drop_in_linear():
    layer = BitLinear(8, 4)
    assert list(layer.state_dict()) == ["weight"]
    assert list(BitLinear(8, 4, bias=True).state_dict()) == ["weight", "bias"]
    assert isinstance(layer, QLinear) and layer.weight_precision == 2 and layer.input_precision == 8
    assert "norm=True" in repr(layer)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bitlinear_rejects_bad_inputs_by_name():
    layer = BitLinear(8, 4)
    with pytest.raises(ValueError, match=r"BitLinear.*8 channels.*\[3, 7\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps"):
        BitLinear(8, 4, eps=0.0)


def test_qlinear_with_absmax8_input_uses_the_integer_sum():
    torch.manual_seed(5)
    layer = QLinear(30, 6, input_quantizer="absmax8", weight_quantizer="ternary")
    x = torch.randn(4, 30)
    levels, gamma = ref_ternary(layer.weight.detach(), False)
    with torch.no_grad():
        assert torch.equal(layer(x), ref_bitlinear_float(x, levels, gamma.reshape(-1), layer.bias.detach()))


# ---------------------------------------------------------------------------
# kernels


def test_ternary_weights_pack_two_bits_each_and_unpack():
    gen = torch.Generator().manual_seed(6)
    for features in (1, 3, 4, 5, 257):
        levels = random_levels(7, features, gen)
        wp = R.pack_ternary_weights(levels)
        assert wp.dtype == torch.uint8 and wp.shape == (7, (features + 3) // 4)
        for k in range(features):  # code w + 1 at bits 2 (k % 4) of byte k // 4
            code = (wp[:, k // 4].to(torch.int64) >> (2 * (k % 4))) & 3
            assert torch.equal(code - 1, levels[:, k].to(torch.int64))
        assert torch.equal(R.unpack_ternary_weights(wp, features), levels)
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        R.pack_ternary_weights(torch.full((2, 3), 0.5))


def test_kernel_choice_follows_the_isa():
    want = {
        "avx512": "avx512_vnni" if _C.has_avx512_vnni() else "avx2",
        "avx2": "avx2",
        "neon_dotprod": "neon_dotprod",
        "neon": "neon",
        "scalar": "reference",
        "reference": "reference",
    }
    for isa in ISAS:
        _C.set_isa(isa)
        assert K.ternary_linear_kernel() == want[isa]


SHAPES = [  # (N, F, Out): odd features, partial and full 256-feature chunks, partial 4-row tiles
    (1, 1, 1),
    (1, 3, 5),
    (2, 255, 3),
    (3, 256, 4),
    (1, 257, 65),
    (5, 511, 7),
    (4, 512, 64),
    (9, 1000, 33),
    (2, 1023, 129),
    (1, 4096, 130),
    (7, 4099, 6),
]


@pytest.mark.parametrize("n, features, out", SHAPES)
def test_ternary_kernels_are_exact_on_every_isa(n, features, out):
    gen = torch.Generator().manual_seed(n * 100003 + features * 7 + out)
    levels = random_levels(out, features, gen)
    wp = R.pack_ternary_weights(levels)
    x_int = torch.randint(-128, 128, (n, features), generator=gen, dtype=torch.int8)
    x = torch.randn(n, features, generator=gen) * torch.rand(n, 1, generator=gen) * 10
    scale, bias = torch.rand(out, generator=gen) + 0.1, torch.randn(out, generator=gen)
    want_int = ref_linear_int(x_int, levels)
    want = ref_bitlinear_float(x, levels, scale, bias)
    want_plain = ref_bitlinear_float(x, levels, None, None)
    for isa in ISAS:
        _C.set_isa(isa)
        assert torch.equal(K.ternary_linear_int(x_int, wp, in_features=features), want_int), isa
        assert torch.equal(K.ternary_linear(x, wp, in_features=features, scale=scale, bias=bias), want), isa
        assert torch.equal(K.ternary_linear(x, wp, in_features=features), want_plain), isa


@SETTINGS
@given(n=st.integers(1, 6), features=st.integers(1, 1100), out=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_ternary_kernels_are_exact_on_random_shapes(n, features, out, seed):
    gen = torch.Generator().manual_seed(seed)
    levels = random_levels(out, features, gen)
    wp = R.pack_ternary_weights(levels)
    x = torch.randn(n, features, generator=gen) * 3
    want = ref_bitlinear_float(x, levels, None, None)
    for isa in ISAS:
        _C.set_isa(isa)
        assert torch.equal(K.ternary_linear(x, wp, in_features=features), want), isa


def test_extreme_accumulators_are_exact():
    """All activations -128 or 127 against all-(-1) / all-(+1) rows: the largest sums."""
    features = 4099
    levels = torch.stack([torch.ones(features), -torch.ones(features), torch.zeros(features)] * 3)
    wp = R.pack_ternary_weights(levels)
    x = torch.stack([torch.full((features,), -128, dtype=torch.int8), torch.full((features,), 127, dtype=torch.int8)])
    want = ref_linear_int(x, levels)
    assert want.abs().max() == 128 * features
    for isa in ISAS:
        _C.set_isa(isa)
        assert torch.equal(K.ternary_linear_int(x, wp, in_features=features), want), isa


def test_non_finite_tokens_give_nan_rows_and_others_stay_exact():
    gen = torch.Generator().manual_seed(7)
    levels = random_levels(9, 300, gen)
    wp = R.pack_ternary_weights(levels)
    x = torch.randn(4, 300, generator=gen)
    x[1, 5] = float("nan")
    x[2, 299] = float("inf")
    x[3] = 0.0  # a zero token: s from the 1e-5 guard, outputs 0
    want = ref_bitlinear_float(x, levels, None, None)
    assert want[1:3].isnan().all() and torch.equal(want[3], torch.zeros(9))
    for isa in ISAS:
        _C.set_isa(isa)
        got = K.ternary_linear(x, wp, in_features=300)
        assert torch.equal(got.isnan(), want.isnan()), isa
        assert torch.equal(got[[0, 3]], want[[0, 3]]), isa


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_strided_rows_give_the_same_bits(threads):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(8)
    levels = random_levels(1000, 2048, gen)
    wp = R.pack_ternary_weights(levels)
    big = torch.randn(3, 4096, generator=gen)
    x = big[:, 1000:3048]  # rows 4096 floats apart
    want = ref_bitlinear_float(x, levels, None, None)
    for isa in ISAS:
        _C.set_isa(isa)
        assert torch.equal(K.ternary_linear(x, wp, in_features=2048), want), isa
        assert torch.equal(K.ternary_linear(x.T.contiguous().T, wp, in_features=2048), want), isa


def test_empty_batch():
    wp = R.pack_ternary_weights(torch.zeros(3, 10))
    assert K.ternary_linear(torch.zeros(0, 10), wp, in_features=10).shape == (0, 3)
    assert K.ternary_linear_int(torch.zeros(0, 10, dtype=torch.int8), wp, in_features=10).shape == (0, 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda wp: K.ternary_linear(torch.zeros(2, 10, dtype=torch.float64), wp, in_features=10),
            "input x must have dtype torch.float32",
        ),
        (lambda wp: K.ternary_linear(torch.zeros(2, 11), wp, in_features=10), r"expected \[N, in_features=10\]"),
        (lambda wp: K.ternary_linear(torch.zeros(2, 10), wp, in_features=20), r"expected \[Out >= 1, 5\]"),
        (
            lambda wp: K.ternary_linear(torch.zeros(2, 10), wp.to(torch.int64), in_features=10),
            "must have dtype torch.uint8",
        ),
        (
            lambda wp: K.ternary_linear(torch.zeros(2, 10), wp, in_features=10, scale=torch.ones(4)),
            r"scale must have shape \[3\]",
        ),
        (
            lambda wp: K.ternary_linear(
                torch.zeros(2, 10), wp, in_features=10, bias=torch.ones(3, dtype=torch.float64)
            ),
            "bias must have dtype",
        ),
        (lambda wp: K.ternary_linear(torch.zeros(10), wp, in_features=10), "2 dimensions"),
        (lambda wp: K.ternary_linear_int(torch.zeros(2, 10), wp, in_features=10), "torch.int8"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_problem(call, match):
    wp = R.pack_ternary_weights(torch.zeros(3, 10))
    with pytest.raises(ValueError, match=match):
        call(wp)


def test_reference_backend_checks_its_arguments():
    wp = R.pack_ternary_weights(torch.zeros(3, 10))
    with ops.use_backend("reference"):
        with pytest.raises(ValueError, match=r"ternary_linear: expected torch.float32 \[N, 10\]"):
            ops.ternary_linear(torch.zeros(2, 9), wp, in_features=10)


def test_custom_ops_pass_opcheck_and_trace():
    gen = torch.Generator().manual_seed(9)
    levels = random_levels(5, 70, gen)
    wp = R.pack_ternary_weights(levels)
    x = torch.randn(3, 70, generator=gen)
    torch.library.opcheck(torch.ops.onebit.ternary_linear, (x, wp, 70, torch.rand(5), None))
    torch.library.opcheck(
        torch.ops.onebit.ternary_linear_int, (torch.randint(-128, 128, (3, 70), dtype=torch.int8), wp, 70)
    )

    class M(nn.Module):
        def forward(self, x):
            return K.ternary_linear(x, wp, in_features=70)

    program = torch.export.export(M(), (x,))
    assert torch.equal(program.module()(x), K.ternary_linear(x, wp, in_features=70))


# ---------------------------------------------------------------------------
# the packed engine


class TinyBitNet(nn.Module):
    def __init__(self, per_channel: bool = False):
        super().__init__()
        self.up = BitLinear(100, 67, bias=True, per_channel=per_channel)
        self.act = nn.ReLU()
        self.mid = QLinear(67, 33, input_quantizer="absmax8", weight_quantizer="ternary")
        self.down = BitLinear(33, 10, norm=False)

    def forward(self, x):
        return self.down(self.mid(self.act(self.up(x))) + 1.0)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(1, 100), (5, 100), (2, 7, 100)])
def test_packed_bitlinear_models_are_bit_identical(per_channel, shape):
    torch.manual_seed(10)
    model = TinyBitNet(per_channel).eval()
    x = torch.randn(shape) * 2
    packed = onebit.engine.pack(model, x)
    assert [n["op"] for n in packed.graph["nodes"]].count("ternary_linear") == 3
    assert packed.fallbacks == []
    with torch.no_grad():
        want = model(x)
        for isa in ISAS:
            _C.set_isa(isa)
            assert torch.equal(packed(x), want), isa
        with ops.use_backend("reference"):
            assert torch.equal(packed(x), want)
        x2 = torch.randn(shape) * 1000
        assert torch.equal(packed(x2), model(x2))


def test_packed_bitlinear_takes_every_sequence_length_the_model_takes(tmp_path):
    torch.manual_seed(12)
    model = TinyBitNet().eval()
    packed = onebit.engine.pack(model, torch.randn(2, 3, 100))
    path = tmp_path / "m.onebit.safetensors"
    packed.save(path)
    for p in (packed, onebit.engine.load(path)):
        for shape in ((2, 7, 100), (5, 1, 100), (1, 64, 100), (0, 3, 100)):
            x = torch.randn(shape)
            with torch.no_grad():
                assert torch.equal(p(x), model(x)), shape
        with pytest.raises(onebit.engine.InputError, match=r"\[N, L1, F\] with F = 100 features"):
            p(torch.randn(2, 3, 99))
        with pytest.raises(onebit.engine.InputError):
            p(torch.randn(2, 100))  # the example's rank


def test_ternary_file_stores_two_bits_a_weight(tmp_path):
    torch.manual_seed(11)
    model = nn.Sequential(BitLinear(1001, 300)).eval()
    x = torch.randn(2, 1001)
    packed = onebit.engine.pack(model, x)
    path = tmp_path / "m.onebit.safetensors"
    packed.save(path)
    weight_bytes = 300 * 251
    assert weight_bytes <= os.path.getsize(path) <= weight_bytes + 300 * 4 + 4096  # + gamma + header
    loaded = onebit.engine.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_graph_rejects_invalid_ternary_codes(tmp_path):
    model = nn.Sequential(BitLinear(10, 3)).eval()
    packed = onebit.engine.pack(model, torch.randn(1, 10))
    graph = packed.graph
    tensors = dict(packed.named_graph_tensors())
    key = graph["nodes"][0]["tensors"]["weight"]
    good = tensors[key]
    bad = good.clone()
    bad[0, 0] = 0b11  # code 3
    with pytest.raises(G.GraphError, match="code 3"):
        G.validate(graph, {**tensors, key: bad})
    beyond = good.clone()
    beyond[1, 2] |= 0b0100_0000  # feature 11 of 10
    with pytest.raises(G.GraphError, match="beyond the 10 input features"):
        G.validate(graph, {**tensors, key: beyond})


# ---------------------------------------------------------------------------
# the zoo's BitLinear MLP


def test_bitnet_mlp_builds_and_packs_bit_identically():
    torch.manual_seed(12)
    model = onebit.models.create("bitnet_mlp", num_classes=10, in_channels=1).eval()
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 2
    x = torch.randn(3, 1, 8, 8)
    packed = onebit.engine.pack(model, x)
    assert [n["op"] for n in packed.graph["nodes"]].count("ternary_linear") == 2
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))
    with pytest.raises(ValueError, match="bitnet_mlp"):
        onebit.models.create("bitnet_mlp", depth=0)


def test_bitnet_mlp_trains_from_the_cli_and_exports_exactly(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "onebit", *args], capture_output=True, text=True, timeout=600)

    out = tmp_path / "run"
    result = run("train", "--model", "bitnet_mlp", "--data", "digits", "--epochs", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy >= 0.9, result.stdout
    result = run("export", str(out), "--out", str(tmp_path / "m.onebit.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "max |packed - model| = 0.00e+00" in result.stdout


def test_exported_packed_bitlinear_model_runs_the_ternary_op(tmp_path):
    torch.manual_seed(13)
    model = onebit.models.create("bitnet_mlp", in_channels=1, hidden=64).eval()
    x = torch.randn(2, 1, 8, 8)
    packed = onebit.engine.pack(model, x, strict=True)
    program = torch.export.export(packed, (x,))
    assert "torch.ops.onebit.ternary_linear" in program.graph_module.code
    torch.export.save(program, tmp_path / "p.pt2")
    with torch.no_grad():
        assert torch.equal(torch.export.load(tmp_path / "p.pt2").module()(x), model(x))


def test_compiled_bitlinear_gives_the_layers_bits():
    torch.manual_seed(14)
    layer = BitLinear(48, 16, bias=True).eval()
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, backend="eager")(x), layer(x))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_dorefa_sym_learnable_clip_gradients_are_lsq_s(bits):
    # reference: torch autograd through the same formula with the rounding passed straight through
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(400, generator=g) * 1.5).requires_grad_()
    q = DoReFaSymmetric(bits, clip=1.2, learnable=True)
    upstream = torch.randn(400, generator=g)
    (q(x) * upstream).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    c = torch.tensor(1.2, requires_grad=True)
    n = 2**bits - 1
    v = (torch.clamp(x_ref, -c, c) / c + 1.0) / 2.0 * n
    r = v + (torch.floor(v + 0.5) - v).detach()
    (((2.0 * r / n - 1.0) * c) * upstream).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad)
    assert torch.allclose(q.clip.grad, c.grad, rtol=1e-5, atol=1e-5)
    assert q.clip.grad != 0


def test_dorefa_sym_learnable_clip_forward_equals_the_fixed_one_and_never_writes_it():
    x = torch.randn(1000) * 2
    learned, fixed = DoReFaSymmetric(2, 1.5, learnable=True), DoReFaSymmetric(2, 1.5)
    before = learned.clip.detach().clone()
    assert torch.equal(learned(x), fixed(x))
    assert torch.equal(learned(learned(x)), learned(x))  # idempotent
    assert torch.equal(learned.clip.detach(), before)
    assert [name for name, _ in learned.named_parameters()] == ["clip"] and not list(fixed.parameters())
    with torch.no_grad():
        learned.clip.fill_(-3.0)  # a negative clip is held at 1e-5 in forward
    assert torch.isfinite(learned(x)).all()
    with pytest.raises(ValueError, match="clip must be a positive number"):
        DoReFaSymmetric(2, clip=0.0)


# ---------------------------------------------------------------------------
# k-bit layers: an exact integer sum, then the divisor, scale and bias


@pytest.mark.parametrize("input_quantizer", ["dorefa", "dorefa_sym", DoReFaSymmetric(3, 1.7, learnable=True)])
@pytest.mark.parametrize("weight_quantizer", ["ternary", "dorefa_weight", "magnitude_aware_sign"])
def test_kbit_conv_is_the_integer_conv_then_divisor_scale_bias_in_every_layout(input_quantizer, weight_quantizer):
    from onebit.nn import QConv2d

    torch.manual_seed(0)
    layer = QConv2d(24, 16, 3, padding=1, bias=True, input_quantizer=input_quantizer, weight_quantizer=weight_quantizer)
    x = torch.randn(2, 24, 9, 9) * 2
    x_int, s = layer.input_quantizer.integer_factor(x)
    levels, scale = layer.weight_quantizer.factor(layer.weight)
    acc = F.conv2d(x_int.double(), levels.double(), None, 1, 1)  # the exact integer sums
    assert torch.equal(acc, torch.round(acc))
    expected = ((acc.float() / s) * scale.view(1, -1, 1, 1)) + layer.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        for xl in (
            x,
            x.contiguous(memory_format=torch.channels_last),
            x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        ):
            assert torch.equal(layer(xl), expected)
    assert torch.allclose(
        expected, F.conv2d(layer.input_quantizer(x), layer.weight_quantizer(layer.weight), layer.bias, 1, 1), atol=1e-4
    )


def test_dorefa_integer_factors_are_the_forward_levels():
    x = torch.randn(5000) * 1.5
    for q in (quant.DoReFa(2), quant.DoReFa(4)):
        x_int, n = q.integer_factor(x)
        assert torch.equal(x_int / n, q(x)) and set(x_int.unique().tolist()) <= set(range(int(n) + 1))
    for q in (DoReFaSymmetric(2, 1.0), DoReFaSymmetric(3, 0.7)):
        x_int, s = q.integer_factor(x)
        n = q.steps
        assert set(x_int.unique().tolist()) <= set(range(-n, n + 1, 2))
        assert torch.allclose(x_int / s, q(x), atol=1e-6)
    w = torch.randn(8, 4, 3, 3)
    qw = quant.DoReFaWeight(2)
    levels, scale = qw.factor(w)
    assert set(levels.unique().tolist()) <= {-3.0, -1.0, 1.0, 3.0} and torch.equal(levels / 3, qw(w))
    assert scale.shape == (8,) and torch.allclose(levels * scale.view(-1, 1, 1, 1), qw(w))
