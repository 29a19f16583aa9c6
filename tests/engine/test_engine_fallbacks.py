"""Nothing silent: every binary layer packs, bit-identical to the model, or is reported.

A binary layer is one with a +-1 input (a sign input quantizer, or a sign right before a
layer without one: the "NoAct" pattern) and sign or magnitude-aware weights, with or
without a bias. Anything else with binary weights or a binary input runs in float as the
model computes it, is listed in ``PackedModel.fallbacks`` with the reason, warned about
once by ``pack`` and refused by ``pack(strict=True)``.
"""

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine import BACKENDS, randomize_batchnorms
from torch import nn

from onebit import engine
from onebit.nn import QActivation, QConv1d, QConv2d, QLinear

SIGN = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}


def ops_of(packed):
    return [n["op"] for n in packed.graph["nodes"]]


def pack_quietly(model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", engine.FallbackWarning)  # a fallback here fails the test
        return engine.pack(model, x, **kwargs)


@pytest.mark.parametrize("weights", ["ste_sign", "magnitude_aware_sign"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_binary_layers_with_biases_pack_bit_identical(weights, memory_format):
    torch.manual_seed(0)
    q = {"input_quantizer": "ste_sign", "weight_quantizer": weights}
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        QConv2d(16, 24, 3, padding=1, **q),  # bias=True, the default
        QConv2d(24, 8, 3, stride=2, padding=1, pad_value=-1.0, **q),
        nn.Flatten(1),
        QLinear(8 * 4 * 4, 10, **q),
    ).eval()
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.normal_(m.bias)
    x = torch.randn(3, 3, 8, 8).contiguous(memory_format=memory_format)
    packed = pack_quietly(model, x, strict=True)
    assert ops_of(packed).count("binary_conv2d") == 2 and "binary_linear" in ops_of(packed)
    assert packed.fallbacks == []
    assert torch.equal(packed(x), model(x))


@pytest.mark.parametrize("weights", ["ste_sign", "magnitude_aware_sign"])
def test_noact_pattern_packs_as_one_binary_layer(weights):
    """bitorch's ``QConv2d_NoAct``: a QActivation, then a layer without input quantizer."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        QActivation("ste_sign"),
        QConv2d(16, 16, 3, padding=1, weight_quantizer=weights),
        nn.BatchNorm2d(16),
        QActivation("ste_sign"),  # BatchNorm + this sign: thresholds, the bits stay packed
        QConv2d(16, 16, 3, padding=1, weight_quantizer=weights),
        nn.BatchNorm2d(16),
        nn.Flatten(1),
        QActivation("approx_sign"),
        QLinear(16 * 6 * 6, 10, weight_quantizer=weights),
    )
    model = randomize_batchnorms(model, 1).eval()
    x = torch.randn(2, 3, 6, 6)
    packed = pack_quietly(model, x, strict=True)
    ops = ops_of(packed)
    assert "sign" not in ops and "qconv2d" not in ops and "qlinear" not in ops  # the signs are the packing
    assert ops.count("binary_conv2d_threshold") == 1 and ops.count("binary_conv2d") == 1 and "binary_linear" in ops
    assert torch.equal(packed(x), model(x))


class _SignThen(nn.Module):
    """A sign, then ``between`` (a flatten, a reshape or a max pool, which commute with it), then a layer
    without input quantizer; ``side`` also returns ``between``'s float output (read by no binary layer)."""

    def __init__(self, sign, between, layer, side=False):
        super().__init__()
        self.pre, self.sign, self.between, self.layer, self.side = (
            nn.Conv2d(3, 8, 3, padding=1),
            sign,
            between,
            layer,
            side,
        )

    def forward(self, x):
        s = self.sign(self.pre(x))
        v = self.between(s)
        return (self.layer(v), v) if self.side else self.layer(v)


def _noact_through(kind: str, weights: str):
    q = {"weight_quantizer": weights}
    act = QActivation("ste_sign")
    flat = QLinear(8 * 6 * 6, 10, **q)
    return {
        "Flatten": lambda: _SignThen(act, nn.Flatten(), flat),
        "torch.flatten": lambda: _SignThen(act, lambda v: torch.flatten(v, 1), flat),
        "view": lambda: _SignThen(act, lambda v: v.view(v.size(0), -1), flat),
        "reshape": lambda: _SignThen(act, lambda v: v.reshape(v.size(0), 8, 36), QConv1d(8, 4, 3, padding=1, **q)),
        "MaxPool2d": lambda: _SignThen(act, nn.MaxPool2d(2), QConv2d(8, 4, 3, padding=1, **q)),
        "MaxPool2d, padded, ceil": lambda: _SignThen(
            act, nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), QConv2d(8, 4, 3, padding=1, pad_value=-1.0, **q)
        ),
        "AdaptiveMaxPool2d": lambda: _SignThen(act, nn.AdaptiveMaxPool2d(4), QConv2d(8, 4, 3, **q)),
        "MaxPool2d, also an output": lambda: _SignThen(act, nn.MaxPool2d(2), QConv2d(8, 4, 3, padding=1, **q), True),
    }[kind]()


@pytest.mark.parametrize("weights", ["ste_sign", "magnitude_aware_sign"])
@pytest.mark.parametrize(
    "kind",
    [
        "Flatten",
        "torch.flatten",
        "view",
        "reshape",
        "MaxPool2d",
        "MaxPool2d, padded, ceil",
        "AdaptiveMaxPool2d",
        "MaxPool2d, also an output",
    ],
)
def test_noact_pattern_packs_through_flatten_reshape_and_max_pooling(kind, weights):
    """A sign commutes with a flatten, a reshape and a max pool (bitorch's LeNet: sign, flatten, NoAct linear)."""
    torch.manual_seed(3)
    model = _noact_through(kind, weights).eval()
    x = torch.randn(2, 3, 6, 6)
    x[0, 0, :2, :4] = torch.tensor([[float("nan"), float("inf"), -float("inf"), -0.0], [0.0, -1e-30, 1e-30, -5.0]])
    packed = pack_quietly(model, x, strict=True)
    ops = ops_of(packed)
    assert "qconv2d" not in ops and "qlinear" not in ops
    assert any(op in ops for op in ("binary_conv2d", "binary_linear"))
    for backend in BACKENDS:
        with engine.use_backend(backend):
            y, ref = packed(x), model(x)
            if isinstance(ref, tuple):
                assert all(torch.equal(a, b) for a, b in zip(y, ref))
            else:
                assert torch.equal(y, ref)


def test_noact_conv1d_packs():
    torch.manual_seed(2)
    model = nn.Sequential(QActivation("ste_sign"), QConv1d(6, 5, 3, padding=1, weight_quantizer="ste_sign")).eval()
    x = torch.randn(2, 6, 9)
    packed = pack_quietly(model, x, strict=True)
    assert "binary_conv2d" in ops_of(packed)
    assert torch.equal(packed(x), model(x))


def test_binary_batchnorm_binary_with_biases_packs():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        QConv2d(16, 16, 3, padding=1, **SIGN),
        nn.BatchNorm2d(16),
        QConv2d(16, 8, 3, padding=1, **SIGN),
    )
    model = randomize_batchnorms(model, 3).eval()
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.normal_(m.bias)
    x = torch.randn(2, 3, 7, 7)
    packed = pack_quietly(model, x, strict=True)
    assert ops_of(packed) == ["conv2d", "pack", "binary_conv2d_threshold", "binary_conv2d"]
    assert torch.equal(packed(x), model(x))


def test_strict_names_every_layer_that_cannot_pack():
    model = nn.Sequential(
        QConv2d(3, 8, 3, padding=1, weight_quantizer="ste_sign"),  # float input
        QConv2d(8, 8, 3, padding=1, padding_mode="reflect", **SIGN),  # reflect padding
        QConv2d(8, 8, 3, padding=1, input_quantizer="ste_sign"),  # float weights
        QConv2d(8, 8, 3, padding=1, **SIGN),  # packs
    ).eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(engine.UnsupportedModelError) as info:
        engine.pack(model, x, strict=True)
    message = str(info.value)
    assert "3 binary layer(s)" in message
    assert "'0': its input is float" in message
    assert "'1': padding_mode='reflect'" in message
    assert "'2': its weights are float" in message
    assert "'3'" not in message
    with pytest.warns(engine.FallbackWarning) as record:
        packed = engine.pack(model, x)
    assert len(record) == 1  # once, naming all of them
    assert [f["module"] for f in packed.fallbacks] == ["0", "1", "2"]
    assert torch.equal(packed(x), model(x))


def test_fallbacks_survive_save_and_load(tmp_path):
    model = nn.Sequential(QConv2d(3, 8, 3, padding=1, weight_quantizer="ste_sign")).eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(engine.FallbackWarning):
        packed = engine.pack(model, x)
    packed.save(tmp_path / "m.safetensors")
    loaded = engine.load(tmp_path / "m.safetensors")
    assert loaded.fallbacks == packed.fallbacks and len(loaded.fallbacks) == 1
    assert torch.equal(loaded(x), model(x))


def test_binary_weights_with_float_input_are_stored_as_bits(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(
        QConv2d(64, 128, 3, padding=1, weight_quantizer="magnitude_aware_sign"),
        nn.Flatten(1),
        QLinear(128 * 4 * 4, 10, weight_quantizer="ste_sign"),
    ).eval()
    x = torch.randn(2, 64, 4, 4)
    with pytest.warns(engine.FallbackWarning):
        packed = engine.pack(model, x)
    assert ops_of(packed) == ["qconv2d", "flatten", "qlinear"]
    path = tmp_path / "m.safetensors"
    packed.save(path)
    stored = load_file(path)
    bits = [t for k, t in stored.items() if k.endswith("weight_bits")]
    assert len(bits) == 2 and all(t.dtype == torch.uint8 for t in bits)
    assert not any(k.endswith("__weight") for k in stored)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "float.safetensors")
    assert path.stat().st_size * 20 < (tmp_path / "float.safetensors").stat().st_size
    assert torch.equal(engine.load(path)(x), model(x))


def test_wrong_feature_count_is_rejected_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(1), QLinear(100, 7, **SIGN)).eval()
    packed = pack_quietly(model, torch.randn(2, 3, 5, 5), strict=True)
    bad = torch.randn(2, 3, 4, 5)  # 80 features: the model itself refuses it
    with pytest.raises(ValueError):
        model(bad)
    with pytest.raises(engine.InputError, match=r"layer '2'.*expected 100 input features"):
        packed(bad)


def test_a_quantizer_subclass_that_overrides_forward_is_never_packed_as_its_parent():
    from quantizer_cases import (
        _DoubledMagnitude,
        _OwnFactor,
        _QuietDoReFa,
        _RedeclaredSign,
        _ShiftedDoReFa,
        _ShiftedSign,
    )

    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8)

    def conv(iq, wq, **kw):
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), QConv2d(8, 6, 3, padding=1, input_quantizer=iq, weight_quantizer=wq, **kw)
        ).eval()

    # an input quantizer the engine has no op for: refused by name, never run as a plain sign
    for model in (conv(_ShiftedSign(), "ste_sign"), nn.Sequential(QActivation(_ShiftedSign()), conv(None, "ste_sign"))):
        with pytest.raises(
            engine.UnsupportedModelError, match="_ShiftedSign overrides forward without declaring is_sign"
        ):
            engine.pack(model, x)
    with pytest.raises(engine.UnsupportedModelError, match="quantizer _ShiftedDoReFa has no engine op"):
        engine.pack(conv(_ShiftedDoReFa(), "ternary"), x)
    # weights whose factor() no longer describes the quantizer: float weights, listed, refused by strict=True
    for wq, why in (
        (_DoubledMagnitude(), "_DoubledMagnitude overrides forward without declaring sign_levels again"),
        (_OwnFactor(), "_OwnFactor overrides factor without declaring sign_levels again"),
        (_ShiftedSign(), "_ShiftedSign overrides forward without declaring is_sign again"),
    ):
        model = conv("ste_sign", wq)
        with pytest.warns(engine.FallbackWarning, match=why):
            packed = engine.pack(model, x)
        assert packed.fallbacks == [
            {"module": "1", "reason": f"its weight quantizer {type(wq).__name__} does not give +-1 levels ({why})"}
        ]
        assert "binary_conv2d" not in ops_of(packed)
        assert torch.equal(packed(x), model(x))
        with pytest.raises(engine.UnsupportedModelError, match="strict=True"):
            engine.pack(model, x, strict=True)
    # declared again, or nothing of the parent's computation overridden: packed as the parent is
    model = conv(_RedeclaredSign(), _RedeclaredSign())
    packed = pack_quietly(model, x, strict=True)
    assert "binary_conv2d" in ops_of(packed) and torch.equal(packed(x), model(x))
    model = conv(_QuietDoReFa(), "ternary")
    packed = pack_quietly(model, x, strict=True)
    assert "bitplane_conv2d" in ops_of(packed) and torch.equal(packed(x), model(x))
