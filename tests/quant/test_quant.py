"""Quantizers: forward values, pseudo-gradients, idempotence, registry."""

import pytest
import torch
from torch import nn

from onebit import quant
from onebit.math import sign
from quantizer_cases import _DoubledMagnitude, _OwnFactor, _QuietDoReFa, _RedeclaredSign, _ShiftedDoReFa, _ShiftedSign

#: every registered quantizer: a newly registered one is tested by every test over ALL_ALIASES
ALL_ALIASES = quant.names()
#: those with +-1 levels (a sign, or a scaled sign), and those whose forward is exactly the sign
SIGN_ALIASES = [a for a in ALL_ALIASES if quant.has_sign_levels(quant.get(a))]
PLAIN_SIGN_ALIASES = [a for a in ALL_ALIASES if quant.is_sign(quant.get(a))]
#: the quantizers onebit ships
BUILT_IN = {
    "ste_sign": 1,
    "approx_sign": 1,
    "swish_sign": 1,
    "magnitude_aware_sign": 1,
    "dorefa": 2,
    "dorefa_weight": 2,
    "dorefa_sym": 2,
    "ternary": 2,
    "absmax8": 8,
    "int8": 8,
    "int8_weight": 8,
}


def make(alias_or_cls, form):
    """The string and the instance form of the same quantizer."""
    return quant.get(alias_or_cls) if form == "string" else type(quant.get(alias_or_cls))()


# ----------------------------------------------------------------------------- the sign convention


def test_math_sign_is_never_zero():
    x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert sign(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int8]
)
def test_math_sign_is_minus_one_exactly_where_x_is_negative_in_every_dtype(dtype):
    values = [-3, -1, 0, 1, 7]
    if dtype.is_floating_point:
        tiny = torch.finfo(dtype).tiny
        values += [-0.0, -tiny, tiny, -tiny / 4, tiny / 4, float("inf"), float("-inf"), float("nan"), -float("nan")]
    x = torch.tensor(values, dtype=dtype)
    s = sign(x)
    assert s.dtype == dtype
    # the reference: a comparison per element (NaN is not negative)
    assert s.tolist() == [-1 if v < 0 else 1 for v in x.tolist()]


def test_math_sign_keeps_the_memory_format_of_its_input():
    x = torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last)
    assert sign(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(sign(x), sign(x.contiguous()))


@pytest.mark.parametrize("form", ["string", "instance"])
@pytest.mark.parametrize("alias", SIGN_ALIASES)
def test_sign_of_zero_is_plus_one_in_every_sign_quantizer(alias, form):
    q = make(alias, form)
    w = torch.tensor([[0.0, -0.0, 0.5, -0.5]])
    out = q(w)
    assert (out[0, :2] > 0).all(), f"{alias} maps 0 or -0.0 to {out[0, :2].tolist()}"
    assert torch.equal(torch.sign(out), torch.tensor([[1.0, 1.0, 1.0, -1.0]]))


@pytest.mark.parametrize("alias", PLAIN_SIGN_ALIASES)
def test_sign_quantizers_output_exactly_plus_minus_one(alias):
    x = torch.randn(1000) * 3
    out = quant.get(alias)(x)
    assert set(out.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(out, torch.where(x < 0, -1.0, 1.0))


# ----------------------------------------------------------------------------- pseudo-gradients


def grad_of(q, x):
    x = x.clone().requires_grad_(True)
    q(x).backward(torch.ones_like(x))
    return x.grad


def test_ste_sign_gradient_is_clipped_identity():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0001, 3.0])
    assert grad_of(quant.Sign(), x).tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    assert grad_of(quant.Sign(clip=0.5), x).tolist() == [0, 0, 1, 1, 1, 0, 0, 0]


def test_ste_sign_without_clip_is_the_identity_estimator():
    x = torch.tensor([-100.0, -1.0, 0.0, 7.0])
    assert grad_of(quant.Sign(clip=None), x).tolist() == [1, 1, 1, 1]


def test_ste_sign_scales_the_incoming_gradient():
    x = torch.tensor([0.3, 2.0], requires_grad=True)
    quant.Sign()(x).backward(torch.tensor([5.0, 5.0]))
    assert x.grad.tolist() == [5.0, 0.0]


def test_approx_sign_gradient_is_bireal_polynomial():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0])
    expected = [0.0, 0.0, 1.0, 2.0, 1.5, 0.0, 0.0]  # max(0, 2 - 2|x|), worked by hand
    assert grad_of(quant.ApproxSign(), x).tolist() == expected


@pytest.mark.parametrize("beta", [1.0, 5.0, 10.0])
def test_swish_sign_gradient_is_derivative_of_swish_sign_function(beta):
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    # independent reference: autograd through SS_beta(x) = 2 sigmoid(bx)(1 + bx(1 - sigmoid(bx))) - 1
    xr = x.clone().requires_grad_(True)
    s = torch.sigmoid(beta * xr)
    (2 * s * (1 + beta * xr * (1 - s)) - 1).sum().backward()
    assert torch.allclose(grad_of(quant.SwishSign(beta), x), xr.grad, atol=1e-10)


def test_magnitude_aware_sign_forward_and_gradient():
    w = torch.tensor([[0.5, -1.5, 0.0], [0.2, 0.2, -0.2]])
    alpha = torch.tensor([[2.0 / 3.0], [0.2]])  # mean |w| per output channel, by hand
    out = quant.MagnitudeAwareSign()(w)
    assert torch.allclose(out, alpha * torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]))
    g = grad_of(quant.MagnitudeAwareSign(), w)
    assert torch.allclose(g, alpha * torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))


def test_magnitude_aware_sign_scales_per_output_channel_of_conv_weights():
    w = torch.randn(4, 3, 3, 3)
    out = quant.MagnitudeAwareSign()(w)
    for o in range(4):
        assert torch.allclose(out[o].abs(), w[o].abs().mean().expand(3, 3, 3))


def test_dorefa_has_exactly_two_to_the_k_levels_on_unit_interval():
    x = torch.linspace(-1, 2, 10001)
    for bits in (1, 2, 3, 4):
        levels = quant.DoReFa(bits)(x).unique()
        n = 2**bits - 1
        assert torch.allclose(levels, torch.arange(n + 1, dtype=torch.float32) / n)


def test_dorefa_gradient_passes_inside_unit_interval_only():
    x = torch.tensor([-0.1, 0.0, 0.3, 1.0, 1.2])
    assert grad_of(quant.DoReFa(2), x).tolist() == [0, 1, 1, 1, 0]


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("form", ["string", "instance"])
@pytest.mark.parametrize("alias", ALL_ALIASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_quantizer_keeps_shape_and_dtype_and_leaves_input_alone(alias, form, dtype):
    q = make(alias, form)
    x = torch.randn(3, 4, 5).to(dtype)
    before = x.clone()
    out = q(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize("alias", ALL_ALIASES)
def test_quantizer_is_exactly_idempotent(alias):
    q = quant.get(alias)
    x = torch.randn(64, 33) * 2
    once = q(x)
    assert torch.equal(q(once), once)


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_is_exactly_idempotent_for_every_bit_width(bits):
    q = quant.DoReFa(bits)
    x = torch.rand(10000) * 1.4 - 0.2
    assert torch.equal(q(q(x)), q(x))


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (64, 33), (1000,), (7, 1)])
def test_magnitude_aware_sign_is_bitwise_idempotent(shape):
    q = quant.MagnitudeAwareSign()
    for seed in range(5):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.3
        once = q(w)
        assert torch.equal(q(once), once)
        levels, scale = q.factor(once)
        assert torch.equal(scale, q.factor(w)[1])
    w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, -0.5]])
    assert torch.allclose(q(w), torch.tensor([[2.0, -2.0, 2.0], [0.5, 0.5, -0.5]]))  # still the mean magnitude


# ----------------------------------------------------------------------------- symmetric k-bit weights


@pytest.mark.parametrize(
    "bits, expected",
    [(1, [-1.0, 1.0]), (2, [-1.0, -1 / 3, 1 / 3, 1.0]), (3, [(2 * i - 7) / 7 for i in range(8)])],
)
def test_dorefa_weight_levels_are_symmetric_around_zero(bits, expected):
    w = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    levels = torch.unique(quant.DoReFaWeight(bits)(w))
    assert torch.allclose(levels, torch.tensor(expected), atol=1e-7)
    assert torch.equal(levels, -levels.flip(0))  # exactly symmetric


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_weight_follows_dorefas_rule(bits):
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(bits)) * 2
    n = 2**bits - 1
    t = torch.tanh(w.double())
    expected = 2 * torch.round((t / (2 * t.abs().max()) + 0.5) * n) / n - 1
    out = quant.DoReFaWeight(bits)(w)
    assert out.dtype == w.dtype and torch.allclose(out.double(), expected, atol=1e-6)
    assert len(torch.unique(quant.DoReFaWeight(bits)(torch.randn(100000)))) == 2**bits
    assert quant.DoReFaWeight(bits).precision == bits


def test_dorefa_weight_is_idempotent_up_to_3_bits_and_says_why_not_beyond():
    w = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    for bits in (1, 2, 3):
        q = quant.DoReFaWeight(bits)
        assert torch.equal(q(q(w)), q(w))
    q = quant.DoReFaWeight(4)
    assert not torch.equal(q(q(w)), q(w))
    assert "idempotent up to 3 bits" in quant.DoReFaWeight.__doc__


def test_dorefa_weight_gradient_goes_through_tanh_straight_through_the_rounding():
    w = torch.tensor([-0.3, 0.1, 0.8], requires_grad=True)
    quant.DoReFaWeight(2)(w).sum().backward()
    t = torch.tanh(w.detach())
    m = t.abs().max()
    # d/dw sum_i (tanh(w_i) / max|tanh|): the max element (w = 0.8) also moves the normalization
    expected = (1 - t**2) / m
    expected[2] -= (t.sum() / m**2) * (1 - t[2] ** 2)
    assert torch.allclose(w.grad, expected, atol=1e-6)


def test_dorefa_as_a_weight_quantizer_warns_once_dorefa_weight_does_not():
    from onebit.nn import QConv2d

    layer = QConv2d(2, 4, 3, weight_quantizer="dorefa")
    x = torch.randn(1, 2, 5, 5)
    with pytest.warns(UserWarning, match="dorefa_weight"):
        layer(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per quantizer
        QConv2d(2, 4, 3, weight_quantizer="dorefa_weight")(x)
        quant.DoReFa()(x)  # as an activation quantizer: no warning


def test_binarize_with_weight_bits_gives_symmetric_k_bit_weights():
    from onebit.convert import binarize
    from onebit.nn import QConv2d

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 2, 3))
    k_bit = binarize(model, weight_bits=2)
    conv = k_bit[1]
    assert isinstance(conv, QConv2d) and isinstance(conv.weight_quantizer, quant.DoReFaWeight)
    assert conv.weight_quantizer.precision == 2
    assert torch.unique(conv.quantized_weight()).numel() <= 4
    magnitudes = torch.unique(conv.quantized_weight().detach().abs())
    assert all(torch.isclose(m, torch.tensor(1.0)) or torch.isclose(m, torch.tensor(1 / 3)) for m in magnitudes)
    assert isinstance(binarize(model, weight_bits=1)[1].weight_quantizer, quant.Sign)


@pytest.mark.parametrize("alias", ALL_ALIASES)
def test_precision_attribute(alias):
    precision = quant.get(alias).precision
    assert isinstance(precision, int) and 1 <= precision <= 32
    assert quant.is_binary(quant.get(alias)) == (precision == 1)
    if alias in BUILT_IN:
        assert precision == BUILT_IN[alias]
    assert quant.DoReFa(bits=4).precision == 4


# ----------------------------------------------------------------------------- registry


def test_get_resolves_every_form():
    assert quant.get(None) is None
    assert isinstance(quant.get("ste_sign"), quant.Sign)
    instance = quant.Sign(clip=0.5)
    assert quant.get(instance) is instance
    assert isinstance(quant.get(quant.ApproxSign), quant.ApproxSign)
    assert quant.get(torch.tanh) is torch.tanh


def test_get_returns_a_new_instance_per_alias_lookup():
    assert quant.get("ste_sign") is not quant.get("ste_sign")


def test_unknown_alias_lists_known_names():
    with pytest.raises(ValueError) as info:
        quant.get("xnor")
    assert "'xnor'" in str(info.value)
    for name in ALL_ALIASES:
        assert name in str(info.value)


def test_names_lists_every_alias():
    assert set(BUILT_IN) <= set(quant.names())
    assert quant.names() == sorted(quant.names())


@pytest.mark.parametrize("alias", ALL_ALIASES)
def test_every_alias_round_trips_through_the_registry(alias):
    q = quant.get(alias)
    cls = type(q)
    assert isinstance(q, quant.Quantizer) and q.alias == alias == cls.alias
    assert quant._REGISTRY[alias] is cls
    for form in (alias, {"name": alias}, cls):
        again = quant.get(form)
        assert type(again) is cls and again is not q
        assert repr(again) == repr(q)
    assert quant.get(q) is q


@pytest.mark.parametrize("alias", ALL_ALIASES)
def test_forward_and_backward_leave_the_input_and_the_quantizer_alone(alias):
    q = quant.get(alias)
    q(torch.randn(6, 5, 3, 3))  # a quantizer calibrating on its first training batch (int8) does so here
    state = {k: v.clone() for k, v in q.state_dict().items()}
    x = (torch.randn(6, 5, 3, 3) * 2).requires_grad_(True)
    before = x.detach().clone()
    q(x).backward(torch.ones_like(x))
    assert torch.equal(x.detach(), before)
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert q.state_dict().keys() == state.keys()
    assert all(torch.equal(q.state_dict()[k], v) for k, v in state.items())


def test_get_rejects_non_quantizers():
    with pytest.raises(TypeError):
        quant.get(3.5)


def test_register_makes_a_new_quantizer_available_and_refuses_a_taken_alias():
    @quant.register("test_half_sign")
    class HalfSign(quant.Quantizer):
        precision = 1

        def forward(self, x):
            return 0.5 * sign(x)

    try:
        assert isinstance(quant.get("test_half_sign"), HalfSign)
        assert "test_half_sign" in quant.names()
        with pytest.raises(ValueError, match="already registered"):
            quant.register("ste_sign")(HalfSign)
    finally:
        quant._REGISTRY.pop("test_half_sign")


@pytest.mark.parametrize("bad", [0, -1.0])
def test_bad_quantizer_arguments_are_refused(bad):
    with pytest.raises(ValueError, match="clip"):
        quant.Sign(clip=bad)
    with pytest.raises(ValueError, match="beta"):
        quant.SwishSign(beta=bad)


def test_dorefa_refuses_bad_bit_widths():
    for bits in (0, 17, 2.5):
        with pytest.raises(ValueError, match="bits"):
            quant.DoReFa(bits)
        with pytest.raises(ValueError, match="bits"):
            quant.DoReFaWeight(bits)


#: the quantizers that learn: their state_dict keys
LEARNED = {"int8": {"log_step", "calibrated"}}


def test_quantizers_have_no_parameters_or_state_but_the_learned_ones():
    for alias in ALL_ALIASES:
        q = quant.get(alias)
        assert isinstance(q, nn.Module)
        if alias in LEARNED:
            assert set(q.state_dict()) == LEARNED[alias]
        else:
            assert not list(q.parameters()) and not list(q.buffers()) and q.state_dict() == {}


# ----------------------------------------------------------------------------- a user's own sign quantizer


class _UsersSign(quant.Quantizer):
    """A user's sign with a hard-tanh gradient: declared a sign by its class attributes."""

    precision = 1
    is_sign = True
    sign_levels = True

    def forward(self, x):
        return x.clamp(-1, 1) + (sign(x) - x.clamp(-1, 1)).detach()


def test_a_users_sign_quantizer_is_packed_and_folded_like_the_built_in_ones():
    from torch import nn

    from onebit import engine
    from onebit.canonize import SignThreshold, fold_thresholds
    from onebit.nn import QConv2d

    assert quant.is_sign(_UsersSign()) and quant.has_sign_levels(_UsersSign())
    assert not quant.is_sign(quant.MagnitudeAwareSign()) and quant.has_sign_levels(quant.MagnitudeAwareSign())
    assert not quant.is_sign(quant.DoReFa()) and not quant.has_sign_levels(quant.DoReFa())
    torch.manual_seed(0)
    q = dict(input_quantizer=_UsersSign(), weight_quantizer=_UsersSign())
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        QConv2d(8, 8, 3, padding=1, bias=False, **q),
        nn.BatchNorm2d(8),
        QConv2d(8, 4, 3, padding=1, **q),
    ).eval()
    with torch.no_grad():
        model[2].running_mean.normal_()
    x = torch.randn(2, 3, 6, 6)
    packed = engine.pack(model, x, strict=True)  # no fallback: both layers run on the packed kernels
    assert [n["op"] for n in packed.graph["nodes"]] == ["conv2d", "pack", "binary_conv2d_threshold", "binary_conv2d"]
    assert torch.equal(packed(x), model(x))
    with fold_thresholds(model, skip_unmergeable=True):
        assert isinstance(model[2], SignThreshold)


def test_is_binary_is_precision_one_whatever_the_kind():
    # what the tools count as a binary layer: any 1-bit quantizer, a user's own included
    class MyBinary(quant.Quantizer):
        precision = 1

        def forward(self, x):
            return torch.where(x >= 0, 0.5, -0.5)

    assert quant.is_binary(MyBinary()) and not quant.is_sign(MyBinary())
    assert all(quant.is_binary(quant.get(a)) for a in ("ste_sign", "approx_sign", "magnitude_aware_sign"))
    assert not quant.is_binary(None) and not quant.is_binary(quant.get("dorefa")) and not quant.is_binary(torch.tanh)


def test_a_quantizer_from_a_dict_takes_its_arguments():
    # what --model-arg and JSON configs can express: the alias and its arguments
    q = quant.get({"name": "dorefa_sym", "bits": 3, "clip": 2.0, "learnable": True})
    assert q.precision == 3 and float(q.clip) == 2.0 and q.learnable
    assert quant.get({"name": "ternary", "per_channel": True}).per_channel
    with pytest.raises(ValueError, match="needs its alias under 'name'"):
        quant.get({"clip": 2.0})
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        quant.get({"name": "nope"})
    with pytest.raises(ValueError, match="quantizer 'ternary': .*unexpected keyword argument 'clip'"):
        quant.get({"name": "ternary", "clip": 1.0})


def test_a_subclass_overriding_forward_does_not_inherit_its_parents_declarations():
    assert not quant.is_sign(_ShiftedSign()) and not quant.has_sign_levels(_ShiftedSign())
    assert quant.void_declaration(_ShiftedSign()) == "_ShiftedSign overrides forward without declaring is_sign again"
    assert quant.is_sign(_RedeclaredSign()) and quant.has_sign_levels(_RedeclaredSign())
    assert quant.void_declaration(_RedeclaredSign()) is None
    assert not quant.has_sign_levels(_DoubledMagnitude())
    assert quant.void_declaration(_DoubledMagnitude()) == (
        "_DoubledMagnitude overrides forward without declaring sign_levels again"
    )
    assert quant.is_sign(_OwnFactor()) and not quant.has_sign_levels(_OwnFactor())
    assert quant.void_declaration(_OwnFactor()) == "_OwnFactor overrides factor without declaring sign_levels again"
    on_instance = _ShiftedSign()
    on_instance.is_sign = True  # declared on the instance: it holds
    assert quant.is_sign(on_instance) and not quant.is_sign(_ShiftedSign())
    for q in (quant.Sign(), quant.ApproxSign(), quant.SwishSign(), quant.MagnitudeAwareSign(), _UsersSign()):
        assert quant.has_sign_levels(q) and quant.void_declaration(q) is None
    assert quant.computes_as(_QuietDoReFa(), quant.DoReFa) and not quant.computes_as(_ShiftedDoReFa(), quant.DoReFa)
    assert not quant.computes_as(_ShiftedSign(), quant.Sign) and not quant.computes_as(quant.Sign(), quant.DoReFa)


def test_a_layer_computes_with_factor_only_while_it_describes_the_forward():
    from onebit.nn import QConv2d, QLinear
    from onebit.quant_lowbit import DoReFaSymmetric

    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7)
    conv2d = torch.nn.functional.conv2d

    def layer(wq):
        return QConv2d(3, 8, 3, padding=1, input_quantizer="ste_sign", weight_quantizer=wq).eval()

    doubled = layer(_DoubledMagnitude())  # forward overridden below factor(): conv(q_in(x), q_w(W)) + bias
    w = doubled.weight
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.equal(doubled(x), conv2d(sign(x), 2.0 * (alpha * sign(w)), doubled.bias, padding=1))
    own = layer(_OwnFactor())  # its own factor(): the layer's arithmetic
    assert torch.equal(own(x), conv2d(sign(x), 3.0 * sign(own.weight), padding=1) + own.bias.view(-1, 1, 1))
    parent = layer(quant.MagnitudeAwareSign())  # levels, then the scale, then the bias
    alpha = parent.weight.abs().mean(dim=(1, 2, 3), keepdim=True).view(-1, 1, 1)
    want = conv2d(sign(x), sign(parent.weight), padding=1) * alpha + parent.bias.view(-1, 1, 1)
    assert torch.equal(parent(x), want)
    assert quant.current_method(_DoubledMagnitude(), "factor") is None
    assert quant.current_method(_OwnFactor(), "factor") is not None

    class ShiftedSymmetric(DoReFaSymmetric):  # integer_factor no longer describes the forward
        def forward(self, x):
            return super().forward(x + 0.25)

    q = ShiftedSymmetric(2)
    conv = QConv2d(3, 4, 3, padding=1, input_quantizer=q, weight_quantizer="ternary").eval()
    levels, gamma = conv.weight_quantizer.factor(conv.weight)
    want = torch.nn.functional.conv2d(q(x), levels, padding=1) * gamma.view(-1, 1, 1) + conv.bias.view(-1, 1, 1)
    assert torch.equal(conv(x), want)
    linear = QLinear(7, 4, input_quantizer=q, weight_quantizer="ste_sign").eval()
    want = torch.nn.functional.linear(q(x), sign(linear.weight)) + linear.bias
    assert torch.equal(linear(x), want)
