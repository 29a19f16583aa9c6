"""The quantizer contract: what a quantizer declares on the Quantizer base (integer_factor, and the
integer codes of its inputs and weight levels), the rule that a subclass overriding forward
inherits none of it, and a user's own k-bit quantizers packing bit for bit."""

import warnings

import pytest
import torch
from torch import nn

from onebit import engine, quant, quant_lowbit
from onebit.engine import bitplanes
from onebit.math import sign
from onebit.nn import QActivation, QConv2d, QLinear

# ----------------------------------------------------------------------------- a user's own k-bit quantizers


class UsersUniform(quant.Quantizer):
    """A user's k-bit activations on [0, 1], written from the ``unsigned`` code's definition.

    Forward: q(x) = round(clamp(x, 0, 1) n) / n, n = 2^k - 1. Backward: 1[0 <= x <= 1].
    """

    def __init__(self, bits: int = 2):
        super().__init__()
        self.precision = bits

    def integer_factor(self, x):
        n = 2**self.precision - 1
        return quant.round_ste(torch.clamp(x, 0.0, 1.0) * n), float(n)

    def integer_code(self):
        return quant.IntegerCode.unsigned(self.precision)

    def forward(self, x):
        x_int, s = self.integer_factor(x)
        return x_int / s


class UsersSymmetric(quant.Quantizer):
    """A user's k-bit activations symmetric around 0 on a clip c, from the ``symmetric`` code.

    Forward: u = (clamp(x, -c, c) / c + 1) / 2, q(x) = c (2 floor(u n + 1/2) / n - 1).
    Backward: 1[|x| <= c].
    """

    def __init__(self, bits: int = 2, clip: float = 1.0):
        super().__init__()
        self.precision, self.clip = bits, clip

    def _steps(self, x):
        n = 2**self.precision - 1
        c = torch.tensor(self.clip, dtype=x.dtype)
        u = (torch.clamp(x, -c, c) / c + 1.0) / 2.0
        return quant.round_ste(u * n, half_up=True), n, c

    def integer_factor(self, x):
        j, n, c = self._steps(x)
        return 2.0 * j - n, torch.tensor(float(n), dtype=x.dtype) / c

    def integer_code(self):
        return quant.IntegerCode.symmetric(self.precision, self.clip)

    def forward(self, x):
        c = self.clip
        j, n, _ = self._steps(x)
        return (j * (2.0 / n) - 1.0) * c


class UsersWeights(quant.Quantizer):
    """A user's k-bit weights: odd levels in [-n, n] times ``max|w[o]| / n`` per output channel.

    Forward: q(w) = (2 round(n r) - n) * a_o / n, r = clamp(w / (2 a_o) + 1/2, 0, 1),
    a_o = max|w[o]|. Backward: straight through the rounding.
    """

    def __init__(self, bits: int = 2):
        super().__init__()
        self.precision = bits

    def factor(self, w):
        n = 2**self.precision - 1
        a = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-8)
        shape = (-1,) + (1,) * (w.dim() - 1)
        r = torch.clamp(w / (2.0 * a.view(shape)) + 0.5, 0.0, 1.0)
        return 2.0 * quant.round_ste(r * n) - n, a / n

    def factor_code(self):
        return quant.IntegerCode.symmetric(self.precision)

    def forward(self, w):
        levels, scale = self.factor(w)
        return levels * scale.view((-1,) + (1,) * (w.dim() - 1))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def pack_strict(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FallbackWarning
        return engine.pack(model, x, strict=True)


def ops_of(packed) -> list[str]:
    return [node["op"] for node in packed.graph["nodes"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_users_own_k_bit_quantizers_pack_bit_identically(seed):
    torch.manual_seed(seed)
    model = randomize(
        nn.Sequential(
            nn.BatchNorm2d(4),
            QConv2d(4, 8, 3, padding=1, input_quantizer=UsersUniform(2), weight_quantizer=UsersWeights(2)),
            nn.BatchNorm2d(8),
            QActivation(UsersUniform(3)),
            QConv2d(8, 8, 3, padding=1, groups=2, input_quantizer=UsersSymmetric(3, 1.5), weight_quantizer="ternary"),
            nn.Flatten(),
            QLinear(8 * 6 * 6, 5, input_quantizer=UsersSymmetric(2, 0.75), weight_quantizer=UsersWeights(3)),
        ),
        seed,
    )
    x = torch.randn(3, 4, 6, 6) * 1.5
    packed = pack_strict(model, x)
    assert ops_of(packed).count("bitplane_conv2d") == 3 and "dorefa" in ops_of(packed)
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))
        x_last = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(packed(x_last), model(x_last))


def test_a_users_quantizers_lower_as_the_built_in_ones_of_the_same_code():
    def net(act, weights):
        torch.manual_seed(4)
        return randomize(
            nn.Sequential(
                QConv2d(3, 6, 3, padding=1, input_quantizer=act, weight_quantizer=weights), nn.BatchNorm2d(6)
            ),
            4,
        )

    x = torch.randn(2, 3, 5, 5)
    for users, built_in in [
        ((UsersUniform(2), quant.DoReFaWeight(2)), (quant.DoReFa(2), quant.DoReFaWeight(2))),
        ((UsersSymmetric(3, 1.5), "ternary"), (quant.DoReFaSymmetric(3, 1.5), "ternary")),
    ]:
        mine, theirs = pack_strict(net(*users), x), pack_strict(net(*built_in), x)
        assert mine.graph == theirs.graph
        with torch.no_grad():
            assert torch.equal(mine(x), theirs(x))


# ----------------------------------------------------------------------------- declarations and the subclass rule


class ShiftedUniform(UsersUniform):
    """Overrides forward, inherits integer_code without declaring it: not the unsigned code."""

    def forward(self, x):
        return super().forward(x + 0.25)


class OwnIntegers(UsersUniform):
    """Keeps the forward but factors into other integers: the inherited code no longer describes them."""

    def integer_factor(self, x):
        x_int, s = super().integer_factor(x)
        return 2.0 * x_int, 2.0 * s


class RedeclaredUniform(UsersUniform):
    """Overrides forward and declares the code again (the same arithmetic, written differently)."""

    def forward(self, x):
        n = 2**self.precision - 1
        return quant.round_ste(torch.clamp(x, 0.0, 1.0) * n) / float(n)

    def integer_code(self):
        return quant.IntegerCode.unsigned(self.precision)


class DoubledWeights(UsersWeights):
    """Overrides forward only: the inherited factor() and factor_code() no longer describe it."""

    def forward(self, w):
        return 2.0 * super().forward(w)


def test_the_base_declares_the_contract_and_no_integers():
    class Halves(quant.Quantizer):
        def forward(self, x):
            return torch.round(x * 2.0) / 2.0

    q = Halves()
    with pytest.raises(NotImplementedError, match="Halves does not factor its output into integers"):
        q.integer_factor(torch.zeros(2))
    assert q.integer_code() is None and q.factor_code() is None
    assert quant.current_method(q, "integer_factor") is None and quant.current_method(q, "factor") is None
    assert quant.integer_code_of(q) is None and quant.factor_code_of(q) is None
    assert quant.void_declaration(q) is None
    for q in (None, torch.tanh):
        assert quant.integer_code_of(q) is None and quant.factor_code_of(q) is None
    assert quant.factor_code_of(sign) == quant.IntegerCode.binary() and quant.integer_code_of(sign) is None


def test_a_subclass_overriding_forward_or_the_factorization_inherits_no_code():
    assert quant.integer_code_of(UsersUniform(3)) == quant.IntegerCode.unsigned(3)
    assert quant.integer_code_of(ShiftedUniform()) is None
    assert quant.void_declaration(ShiftedUniform()) == (
        "ShiftedUniform overrides forward without declaring integer_code again"
    )
    assert quant.integer_code_of(OwnIntegers()) is None
    assert quant.void_declaration(OwnIntegers()) == (
        "OwnIntegers overrides integer_factor without declaring integer_code again"
    )
    assert quant.integer_code_of(RedeclaredUniform()) == quant.IntegerCode.unsigned(2)
    assert quant.void_declaration(RedeclaredUniform()) is None
    assert quant.factor_code_of(UsersWeights(3)) == quant.IntegerCode.symmetric(3)
    assert quant.factor_code_of(DoubledWeights()) is None
    assert quant.void_declaration(DoubledWeights()) == (
        "DoubledWeights overrides forward without declaring factor_code again"
    )

    # the built-in ones follow the same rule
    class ShiftedSymmetric(quant.DoReFaSymmetric):
        def forward(self, x):
            return super().forward(x + 0.25)

    class QuietTernary(quant.Ternary):
        def __init__(self):
            super().__init__(per_channel=True)

    assert quant.integer_code_of(ShiftedSymmetric(2)) is None
    assert quant.factor_code_of(QuietTernary()) == quant.IntegerCode.ternary()


def test_the_engine_refuses_an_input_code_that_no_longer_holds_and_runs_such_weights_in_float():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    model = nn.Sequential(QConv2d(3, 4, 3, padding=1, input_quantizer=ShiftedUniform(), weight_quantizer="ternary"))
    with pytest.raises(engine.UnsupportedModelError, match="ShiftedUniform overrides forward without declaring"):
        engine.pack(model.eval(), x)
    model = nn.Sequential(
        QConv2d(3, 4, 3, padding=1, input_quantizer=UsersUniform(2), weight_quantizer=DoubledWeights())
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = engine.pack(model.eval(), x)
    assert "bitplane_conv2d" not in ops_of(packed)  # q(w) as float weights: the layer's own arithmetic
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))
    redeclared = nn.Sequential(
        QConv2d(3, 4, 3, padding=1, input_quantizer=RedeclaredUniform(), weight_quantizer="ternary")
    ).eval()
    assert ops_of(pack_strict(redeclared, x)).count("bitplane_conv2d") == 1


def test_a_code_must_be_an_integer_code():
    class Wrong(UsersUniform):
        def integer_code(self):
            return "unsigned"

    with pytest.raises(TypeError, match=r"Wrong.integer_code\(\) must return an IntegerCode or None"):
        quant.integer_code_of(Wrong())


@pytest.mark.parametrize(
    "kind, bits, clip, match",
    [
        ("octal", 2, 1.0, "kind"),
        ("unsigned", 0, 1.0, "bits"),
        ("symmetric", 17, 1.0, "bits"),
        ("symmetric", 2, 0.0, "clip"),
    ],
)
def test_integer_codes_refuse_what_they_cannot_describe(kind, bits, clip, match):
    with pytest.raises(ValueError, match=match):
        quant.IntegerCode(kind, bits, clip)


# ----------------------------------------------------------------------------- every registered quantizer


def code_integers(code: quant.IntegerCode, x: torch.Tensor, given_s):
    """``(x_int, s, q(x))`` by the definition of an input code (:class:`onebit.quant.IntegerCode`);
    ``given_s``: the divisor the quantizer's ``integer_factor`` returned (a ``signed`` code's own)."""
    n = 2**code.bits - 1
    if code.kind == "signed":
        m = 2 ** (code.bits - 1) - 1
        x_int = torch.round(x * given_s).clamp(-m, m)
        return x_int, given_s, x_int / given_s
    if code.kind == "absmax":
        m = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        s = torch.full_like(m, 127.0) / m  # one division (``127.0 / m`` is 127 * (1 / m) in torch)
        x_int = torch.round(x * s).clamp(-128, 127)
        return x_int, s, x_int / s
    kind = {"unsigned": "dorefa", "symmetric": "dorefa_sym"}[code.kind]
    x_int = bitplanes.integer_input(x, kind, code.bits, code.clip)  # what the packed engine computes
    if code.kind == "unsigned":
        return x_int, float(n), x_int / n
    c = code.clip
    j = torch.floor((torch.clamp(x, -c, c) / c + 1.0) / 2.0 * n + 0.5)
    return x_int, n / torch.tensor(c), (j * (2.0 / n) - 1.0) * c


LEVELS = {
    "binary": lambda v, n: set(v.unique().tolist()) <= {-1.0, 1.0},
    "ternary": lambda v, n: set(v.unique().tolist()) <= {-1.0, 0.0, 1.0},
    "symmetric": lambda v, n: bool(((v.abs() <= n) & (torch.remainder(v, 2) == 1)).all()),
    "signed": lambda v, n: bool(((v.abs() <= n // 2) & (v == torch.round(v))).all()),
}


@pytest.mark.parametrize("alias", quant.names())
def test_every_registered_quantizer_computes_the_integers_it_declares(alias):
    q = quant.get(alias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 3, 3, generator=gen) * 1.5
    x.view(-1)[:4] = torch.tensor([0.0, 0.5, -0.5, 1.0])  # ties
    code = quant.integer_code_of(q)
    if code is not None:
        with torch.no_grad():
            x_int, s = q.integer_factor(x)
            want_int, want_s, want_q = code_integers(code, x, s)
            assert torch.equal(x_int, want_int)
            assert torch.equal(torch.as_tensor(s, dtype=x.dtype), torch.as_tensor(want_s, dtype=x.dtype))
            assert torch.equal(q(x), want_q)
    levels_code = quant.factor_code_of(q)
    if levels_code is not None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            levels, _ = q.factor(x)
        assert LEVELS[levels_code.kind](levels, 2**levels_code.bits - 1)


def test_the_built_in_quantizers_declare_their_codes():
    assert quant.integer_code_of(quant.DoReFa(3)) == quant.IntegerCode.unsigned(3)
    assert quant.integer_code_of(quant.DoReFaSymmetric(2, 1.5)) == quant.IntegerCode.symmetric(2, 1.5)
    assert quant.integer_code_of(quant.DoReFaSymmetric(2, 0.5, learnable=True)) == quant.IntegerCode.symmetric(2, 0.5)
    assert quant.integer_code_of(quant.Absmax8()) == quant.IntegerCode.absmax(8)
    assert quant.factor_code_of(quant.DoReFaWeight(3)) == quant.IntegerCode.symmetric(3)
    assert quant.factor_code_of(quant.Ternary()) == quant.IntegerCode.ternary()
    for alias in ("ste_sign", "approx_sign", "swish_sign", "magnitude_aware_sign"):
        assert quant.factor_code_of(quant.get(alias)) == quant.IntegerCode.binary()
        assert quant.integer_code_of(quant.get(alias)) is None
    assert quant.factor_code_of(quant.DoReFa()) is None and quant.integer_code_of(quant.DoReFaWeight()) is None


# ----------------------------------------------------------------------------- the one rounding estimator


def test_round_ste_rounds_half_to_even_or_half_up_and_passes_the_gradient_straight_through():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.7], requires_grad=True)
    assert quant.round_ste(v).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0]
    assert quant.round_ste(v, half_up=True).tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    clamped = quant.round_ste(v, lo=-1.0, hi=2.0)
    assert clamped.tolist() == [-1.0, -1.0, -0.0, 0.0, 2.0, 2.0, 2.0]
    clamped.backward(torch.arange(7.0))
    assert torch.equal(v.grad, torch.arange(7.0))  # the identity, also where clamped
    with pytest.raises(ValueError, match="both lo and hi"):
        quant.round_ste(v, lo=0.0)


def test_old_import_paths_name_the_same_objects():
    from onebit.quant import Absmax8, DoReFaSymmetric, Ternary

    assert quant_lowbit.Ternary is Ternary and quant_lowbit.Absmax8 is Absmax8
    assert quant_lowbit.DoReFaSymmetric is DoReFaSymmetric
    assert quant_lowbit.symmetric_integers is quant.symmetric_integers and quant_lowbit.EPS == 1e-5
    assert not hasattr(quant.DoReFa(), "output_range") and not hasattr(quant.DoReFaWeight(), "output_range")
