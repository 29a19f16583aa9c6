"""The packed engine computes what the simulated model computes.

``PackedModel(x)`` must equal ``model(x)`` bit for bit where the result is the output of
binary layers with sign weights (and after BatchNorm + sign thresholds), on every
backend (native kernels on each ISA, and the torch reference).
"""

from __future__ import annotations

import concurrent.futures
import contextlib

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import onebit
import onebit.models
from onebit import engine
from onebit.engine import ops
from onebit.nn import QActivation, QConv1d, QConv2d, QConv3d, QLinear

SIGN = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}
ISAS = onebit._C.supported_isas() if ops.native_available() else []
BACKENDS = ["reference"] + (["native"] if ops.native_available() else [])


@contextlib.contextmanager
def isa(name: str | None):
    if name is None:
        yield
        return
    before = onebit._C.isa()
    onebit._C.set_isa(name)
    try:
        yield
    finally:
        onebit._C.set_isa(before)


def randomize_batchnorms(model: nn.Module, seed: int, *, centred: float = 3.0) -> nn.Module:
    """BatchNorm statistics with positive, negative, zero and tiny scales."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * centred)
                # some means exactly on integers: ties where BN(acc) == 0
                m.running_mean[::3] = m.running_mean[::3].round()
                m.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.1)
                w = torch.randn(c, generator=g)
                kind = torch.randint(0, 5, (c,), generator=g)
                w = torch.where(kind == 0, torch.zeros(c), w)
                w = torch.where(kind == 1, w * 1e-30, w)
                w = torch.where(kind == 2, -w.abs(), w)
                m.weight.copy_(w)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # a non-contiguous view with the same values
        big = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])
        big[..., ::2] = x
        return big[..., ::2]
    return x


def run_packed(packed, x, backend: str, isa_name: str | None = None):
    with engine.use_backend(backend), isa(isa_name if backend == "native" else None):
        return packed(x)


# ---------------------------------------------------------------------------
# one binary conv layer, many configurations


conv_configs = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 1, 1, 2, 3, 4]),
        "cin_per_group": st.integers(1, 100),
        "cout_per_group": st.integers(1, 80),
        "kernel": st.tuples(st.integers(1, 7), st.integers(1, 7)),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "padding": st.tuples(st.integers(0, 3), st.integers(0, 3)),
        "pad_value": st.sampled_from([0.0, 1.0, -1.0]),
        "bias": st.booleans(),
        "batch": st.integers(1, 3),
        "extra": st.tuples(st.integers(0, 6), st.integers(0, 6)),
        "layout": st.sampled_from(["contiguous", "channels_last", "strided"]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def build_conv(cfg) -> tuple[nn.Module, torch.Tensor]:
    g = cfg["groups"]
    cin, cout = cfg["cin_per_group"] * g, cfg["cout_per_group"] * g
    cin, cout = min(cin, 300 - 300 % g), min(cout, 300 - 300 % g)
    (kh, kw), (dh, dw), (ph, pw) = cfg["kernel"], cfg["dilation"], cfg["padding"]
    conv = QConv2d(
        cin, cout, (kh, kw), cfg["stride"], (ph, pw), (dh, dw), g, bias=cfg["bias"], pad_value=cfg["pad_value"], **SIGN
    )
    torch.manual_seed(cfg["seed"])
    if cfg["bias"]:
        nn.init.normal_(conv.bias)
    h = max(1, dh * (kh - 1) + 1 - 2 * ph) + cfg["extra"][0]
    w = max(1, dw * (kw - 1) + 1 - 2 * pw) + cfg["extra"][1]
    x = torch.randn(cfg["batch"], cin, h, w)
    x[x.abs() < 0.1] = 0.0  # exact zeros: sign(0) = +1
    return nn.Sequential(conv).eval(), x


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=conv_configs)
def test_binary_conv_equals_simulated_model(backend, cfg):
    model, x = build_conv(cfg)
    x = layout(x, cfg["layout"])
    packed = engine.pack(model, x, strict=True)  # with or without a bias: packed, no fallback
    assert [n["op"] for n in packed.graph["nodes"]] == ["pack", "binary_conv2d"]
    assert packed.fallbacks == []
    assert torch.equal(run_packed(packed, x, backend), model(x))  # fl(acc + b): the layer's own arithmetic


@pytest.mark.skipif(not ISAS, reason="native kernels not built")
@pytest.mark.parametrize("isa_name", ISAS)
@settings(max_examples=8, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=conv_configs)
def test_binary_conv_equals_simulated_model_on_each_isa(isa_name, cfg):
    model, x = build_conv(cfg)
    packed = engine.pack(model, x, strict=True)
    assert torch.equal(run_packed(packed, x, "native", isa_name), model(x))


# ---------------------------------------------------------------------------
# conv -> [maxpool] -> BatchNorm -> binary conv: thresholds keep activations packed


chain_configs = st.fixed_dictionaries(
    {
        "c1": st.integers(1, 140),
        "c2": st.integers(1, 140),
        "c3": st.integers(1, 70),
        "k1": st.integers(1, 5),
        "k2": st.integers(1, 3),
        "pad1": st.integers(0, 2),
        "pad2": st.integers(0, 1),
        "pv1": st.sampled_from([0.0, 1.0, -1.0]),
        "pv2": st.sampled_from([0.0, 1.0, -1.0]),
        "groups2": st.sampled_from([1, 2]),
        # (kernel, stride, padding, dilation, ceil_mode)
        "pool": st.sampled_from(
            [
                None,
                (2, 2, 0, 1, False),
                (3, 3, 0, 1, True),
                (2, 2, 0, 1, True),
                (3, 2, 1, 1, False),
                (3, 2, 1, 1, True),
                (2, 1, 0, 1, False),
                (3, 1, 1, 2, False),
            ]
        ),
        "bias": st.booleans(),
        "size": st.tuples(st.integers(9, 15), st.integers(9, 15)),
        "batch": st.integers(1, 3),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def build_chain(cfg) -> tuple[nn.Module, torch.Tensor]:
    g2 = cfg["groups2"]
    c2 = max(g2, cfg["c2"] - cfg["c2"] % g2)
    c3 = max(g2, cfg["c3"] - cfg["c3"] % g2)
    layers = [QConv2d(cfg["c1"], c2, cfg["k1"], padding=cfg["pad1"], pad_value=cfg["pv1"], bias=cfg["bias"], **SIGN)]
    if cfg["pool"] is not None:
        k, stride, pad, dil, ceil = cfg["pool"]
        layers.append(nn.MaxPool2d(k, stride, pad, dil, ceil_mode=ceil))
    layers += [
        nn.BatchNorm2d(c2),
        QConv2d(c2, c3, cfg["k2"], padding=cfg["pad2"], pad_value=cfg["pv2"], groups=g2, bias=False, **SIGN),
    ]
    h, w = (s + 2 * cfg["pad1"] - cfg["k1"] + 1 for s in cfg["size"])
    if cfg["pool"] is not None:
        k, stride, pad, dil, _ = cfg["pool"]
        h, w = ((v + 2 * pad - dil * (k - 1) - 1) // stride + 1 for v in (h, w))
    if not (min(h, w) + 2 * cfg["pad2"] >= cfg["k2"] and min(h, w) >= 1):
        assume(False)
    torch.manual_seed(cfg["seed"])
    model = randomize_batchnorms(nn.Sequential(*layers), cfg["seed"], centred=float(cfg["c1"] * cfg["k1"]) ** 0.5)
    x = torch.randn(cfg["batch"], cfg["c1"], *cfg["size"])
    return model.eval(), x


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=chain_configs)
def test_batchnorm_sign_thresholds_keep_the_chain_exact(backend, cfg):
    model, x = build_chain(cfg)
    packed = engine.pack(model, x)
    ops_used = [n["op"] for n in packed.graph["nodes"]]
    assert "batch_norm" not in ops_used
    assert ("max_pool_bits" in ops_used) == (cfg["pool"] is not None)
    assert torch.equal(run_packed(packed, x, backend), model(x))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(run_packed(packed, x_cl, backend), model(x_cl))


@pytest.mark.skipif(not ISAS, reason="native kernels not built")
@pytest.mark.parametrize("isa_name", ISAS)
@settings(max_examples=6, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=chain_configs)
def test_threshold_chain_on_each_isa(isa_name, cfg):
    model, x = build_chain(cfg)
    packed = engine.pack(model, x)
    assert torch.equal(run_packed(packed, x, "native", isa_name), model(x))


def test_batchnorm_with_other_consumers_stays_float():
    model = nn.Sequential(QConv2d(8, 8, 3, padding=1, **SIGN), nn.BatchNorm2d(8), nn.ReLU()).eval()
    randomize_batchnorms(model, 0)
    x = torch.randn(2, 8, 6, 6)
    packed = engine.pack(model, x)
    assert "batch_norm" in [n["op"] for n in packed.graph["nodes"]]
    assert torch.equal(packed(x), model(x))


# ---------------------------------------------------------------------------
# graphs: residual adds, concatenation, zoo models


class BiRealBlock(nn.Module):
    def __init__(self, c: int, stride: int = 1, scale_weights: bool = False):
        super().__init__()
        wq = "magnitude_aware_sign" if scale_weights else "ste_sign"
        self.conv = QConv2d(c, c, 3, stride, 1, bias=False, input_quantizer="approx_sign", weight_quantizer=wq)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.AvgPool2d(2) if stride == 2 else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x)) + self.pool(x)


class ResidualNet(nn.Module):
    def __init__(self, scale_weights: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.b1 = BiRealBlock(16, scale_weights=scale_weights)
        self.b2 = BiRealBlock(16, 2, scale_weights=scale_weights)
        self.act = nn.PReLU(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.b2(self.b1(self.bn(self.stem(x))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.act(x), 1), 1)
        return self.head(x)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.conv1 = QConv2d(32, 16, 3, padding=1, bias=False, **SIGN)
        self.bn1 = nn.BatchNorm2d(48)
        self.conv2 = QConv2d(48, 16, 3, padding=1, pad_value=-1.0, bias=False, **SIGN)
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        self.fc = QLinear(64 * 4, 10, bias=False, **SIGN)
        self.out = nn.Hardtanh()

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x = torch.cat([x, self.conv1(x)], dim=1)
        x = self.bn1(x)
        x = torch.cat([x, self.conv2(x)], 1)
        x = self.pool(self.bn2(x))
        x = x.view(x.size(0), -1)
        return self.out(self.fc(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_graph(backend):
    model = randomize_batchnorms(ResidualNet(), 1).eval()
    x = torch.randn(3, 3, 10, 10)
    packed = engine.pack(model, x)
    y = run_packed(packed, x, backend)
    ref = model(x)
    assert torch.allclose(y, ref, atol=1e-4, rtol=0)
    assert torch.equal(y.argmax(1), ref.argmax(1))


def test_magnitude_aware_weights_are_scaled_binary_weights():
    model = randomize_batchnorms(ResidualNet(scale_weights=True), 2).eval()
    x = torch.randn(2, 3, 8, 8)
    packed = engine.pack(model, x, strict=True)
    assert sum(n["op"] == "binary_conv2d" for n in packed.graph["nodes"]) == 2
    assert sum(n["op"] == "batch_norm" for n in packed.graph["nodes"]) == 3
    for fmt in (torch.contiguous_format, torch.channels_last):  # fl(fl(acc * alpha) + b): the layer's arithmetic
        xx = x.contiguous(memory_format=fmt)
        assert torch.equal(packed(xx), model(xx))
    folded = engine.pack(model, x, fold_batchnorm=True)  # one op less, equal up to float rounding
    assert sum(n["op"] == "batch_norm" for n in folded.graph["nodes"]) == 1
    assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_graph_with_binary_linear(backend):
    model = randomize_batchnorms(DenseNet(), 3).eval()
    x = torch.randn(4, 3, 4, 4)
    packed = engine.pack(model, x)
    ops_used = [n["op"] for n in packed.graph["nodes"]]
    assert {"cat", "binary_linear", "reshape"} <= set(ops_used)
    assert torch.equal(run_packed(packed, x, backend), model(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lenet_binary_from_the_zoo(backend):
    model = randomize_batchnorms(onebit.models.create("lenet_binary", num_classes=10, in_channels=1), 4).eval()
    x = torch.randn(16, 1, 8, 8)
    packed = engine.pack(model, x)
    ops_used = [n["op"] for n in packed.graph["nodes"]]
    assert "max_pool_bits" in ops_used and "binary_linear" in ops_used
    y, ref = run_packed(packed, x, backend), model(x)
    assert torch.allclose(y, ref, atol=1e-4, rtol=0)
    assert torch.equal(y.argmax(1), ref.argmax(1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cin=st.integers(1, 150),
    cout=st.integers(1, 100),
    k=st.integers(1, 7),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 3, "same", "valid"]),
    pad_value=st.sampled_from([0.0, 1.0, -1.0]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    length=st.integers(1, 40),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_binary_conv1d_packs_as_a_1xk_conv2d(
    cin, cout, k, stride, dilation, padding, pad_value, groups, bias, length, batch, seed
):
    cin, cout = cin * groups, cout * groups
    if padding == "same":
        stride = 1
    assume(
        (length + 2 * (padding if isinstance(padding, int) else 0) - dilation * (k - 1) - 1) >= 0 or padding == "same"
    )
    torch.manual_seed(seed)
    conv = QConv1d(
        cin,
        cout,
        k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        pad_value=pad_value,
        **SIGN,
    )
    model = nn.Sequential(conv, nn.BatchNorm1d(cout), nn.Flatten(1)).eval()
    randomize_batchnorms(model, seed)
    x = torch.randn(batch, cin, length)
    packed = engine.pack(model, x)
    nodes = [n["op"] for n in packed.graph["nodes"]]
    symmetric = padding != "same" or dilation * (k - 1) % 2 == 0
    assert ("binary_conv2d" in nodes) == symmetric  # else: sign + float conv of the levels, as the layer runs it
    assert torch.equal(packed(x), model(x))


def test_a_1d_conv_gives_the_layout_torchs_conv1d_gives():
    # [1, 2, 1, 2] is ambiguous for torch's 2-d conv, which may answer channels_last; torch's conv1d
    # returns a contiguous tensor, and the BatchNorm after it rounds differently in the two layouts
    torch.manual_seed(1)
    conv = QConv1d(2, 2, 2, padding="same", groups=2, bias=False, **SIGN)
    model = randomize_batchnorms(nn.Sequential(conv, nn.BatchNorm1d(2), nn.Flatten(1)), 1).eval()
    x = torch.tensor([[[0.0617, 0.6213], [-0.4519, -0.1661]]])
    with pytest.warns(engine.FallbackWarning, match="asymmetric padding"):
        packed = engine.pack(model, x)
    assert torch.equal(packed(x), model(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(iters=3),
        dict(iters=1),
        dict(twist=False),
        dict(permute=False, groups=4),
        dict(stride=2, groups=1),
        dict(groups=3, twist=True),
        dict(weight_quantizer="magnitude_aware_sign"),
    ],
)
def test_twist_conv_runs_packed_and_exact(backend, options):
    from onebit.nn import TwistConv2d

    torch.manual_seed(3)
    c = 24 if options.get("groups") == 3 else 16
    twist = TwistConv2d(c, c, **{"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign", **options})
    model = randomize_batchnorms(
        nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.BatchNorm2d(c), twist, nn.BatchNorm2d(c), nn.Flatten(1)), 4
    ).eval()
    x = torch.randn(3, 2, 11, 10)
    packed = engine.pack(model, x)
    assert sum(n["op"] == "binary_conv2d" for n in packed.graph["nodes"]) == (twist.iters if twist.iterates else 1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx = x.contiguous(memory_format=fmt)
        assert torch.equal(run_packed(packed, xx, backend), model(xx))


def test_zoo_model_with_twist_convs_packs_saves_and_loads(tmp_path):
    model = randomize_batchnorms(onebit.models.create("birealnet_small", in_channels=1, conv_layer="twist"), 5).eval()
    x = torch.randn(2, 1, 28, 28)
    packed = engine.pack(model, x)
    assert any(n["op"] == "twist_mix" for n in packed.graph["nodes"])
    y, ref = packed(x), model(x)
    assert torch.allclose(y, ref, atol=1e-4, rtol=0) and torch.equal(y.argmax(1), ref.argmax(1))
    packed.save(tmp_path / "twist.safetensors")
    assert torch.equal(engine.load(tmp_path / "twist.safetensors")(x), y)


def test_binary_conv_with_reflect_padding_runs_simulated_and_says_so():
    model = nn.Sequential(QConv2d(4, 6, 3, padding=1, padding_mode="reflect", **SIGN)).eval()
    x = torch.randn(2, 4, 5, 5)
    with pytest.warns(engine.FallbackWarning, match="'0': padding_mode='reflect'"):
        packed = engine.pack(model, x)
    assert [n["op"] for n in packed.graph["nodes"]] == ["sign", "qconv2d"]
    assert packed.fallbacks == [
        {"module": "0", "reason": "padding_mode='reflect' (the packed kernels pad with a constant)"}
    ]
    assert torch.equal(packed(x), model(x))


def test_float_input_binary_weight_conv_and_qactivation():
    model = nn.Sequential(
        QConv2d(3, 8, 3, padding=1, weight_quantizer="ste_sign", pad_value=1.0),
        QActivation("ste_sign"),
        nn.Conv2d(8, 4, 1),
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    packed = engine.pack(model, x)
    assert torch.equal(packed(x), model(x))


def test_tuple_outputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = QConv2d(4, 4, 3, padding=1, **SIGN)

        def forward(self, x):
            y = self.conv(x)
            return y, torch.relu(y)

    model = Two().eval()
    x = torch.randn(1, 4, 5, 5)
    out = engine.pack(model, x)(x)
    ref = model(x)
    assert isinstance(out, tuple) and all(torch.equal(a, b) for a, b in zip(out, ref))


def test_list_outputs_come_back_as_lists(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = QConv2d(4, 4, 3, padding=1, **SIGN)

        def forward(self, x):
            y = self.conv(x)
            return [y, torch.relu(y)]

    model = Two().eval()
    x = torch.randn(1, 4, 5, 5)
    packed = engine.pack(model, x)
    packed.save(tmp_path / "two.onebit.safetensors")
    ref = model(x)
    for p in (packed, engine.load(tmp_path / "two.onebit.safetensors")):
        out = p(x)
        assert type(out) is list and len(out) == 2 and all(torch.equal(a, b) for a, b in zip(out, ref))


# ---------------------------------------------------------------------------
# errors


def test_a_single_layer_packs():
    conv = QConv2d(70, 20, 3, padding=1, pad_value=-1.0, bias=False, **SIGN).eval()
    x = torch.randn(2, 70, 7, 5)
    assert torch.equal(engine.pack(conv, x)(x), conv(x))


def test_input_errors_are_type_and_value_errors():
    packed = engine.pack(nn.Sequential(QConv2d(5, 4, 3, bias=False, **SIGN)).eval(), torch.randn(1, 5, 6, 6))
    for bad in (torch.randn(1, 5, 6, 6, dtype=torch.float64), torch.randn(1, 3, 6, 6), torch.randn(5, 6, 6)):
        with pytest.raises(TypeError):
            packed(bad)
        with pytest.raises(ValueError):
            packed(bad)


def test_wrong_inputs_raise_clear_errors():
    model = nn.Sequential(QConv2d(5, 4, 3, padding=1, **SIGN)).eval()
    packed = engine.pack(model, torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match="C = 5 channels"):
        packed(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match="5 channels"):
        packed(torch.randn(5, 6, 6))
    with pytest.raises(TypeError, match="float32"):
        packed(torch.randn(1, 5, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        packed(torch.ones(1, 5, 6, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        packed([[1.0]])
    tiny = engine.pack(nn.Sequential(QConv2d(5, 4, 3, bias=False, **SIGN)).eval(), torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match="too small"):
        tiny(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match="layer '0' \\(op conv2d\\)"):  # a float op: torch's message, layer named
        engine.pack(nn.Sequential(nn.Conv2d(5, 4, 3)).eval(), torch.randn(1, 5, 6, 6))(torch.randn(1, 5, 2, 2))


def test_unsupported_module_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Upsample(scale_factor=2))).eval()
    with pytest.raises(engine.UnsupportedModelError, match=r"module '1\.0' \(Upsample\)"):
        engine.pack(model, torch.randn(1, 3, 8, 8))


def test_unsupported_quantized_layer_is_named():
    model = nn.Sequential(nn.Identity(), QConv3d(3, 4, 3, **SIGN)).eval()
    with pytest.raises(ValueError, match=r"module '1' \(QConv3d\)"):
        engine.pack(model, torch.randn(1, 3, 5, 5, 5))


def test_training_mode_model_is_refused():
    model = nn.Sequential(QConv2d(3, 4, 3, **SIGN), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval mode"):
        engine.pack(model, torch.randn(1, 3, 8, 8))


def test_untraceable_model_is_refused():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(engine.UnsupportedModelError, match="torch.fx"):
        engine.pack(Branchy().eval(), torch.randn(1, 3, 4, 4))


def test_a_model_that_fails_on_its_example_raises_one_clean_error_and_prints_nothing(capfd):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(ValueError) as caught:
        engine.pack(model, torch.randn(1, 5, 8, 8))
    message = str(caught.value)
    assert message.startswith("the model fails on example_input of shape [1, 5, 8, 8]: RuntimeError: ")
    assert "\n" not in message and "While executing" not in message
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ---------------------------------------------------------------------------
# threads, compile


def test_concurrent_calls_from_threads_get_their_own_answers():
    model = randomize_batchnorms(onebit.models.create("lenet_binary", num_classes=10, in_channels=1), 5).eval()
    packed = engine.pack(model, torch.randn(2, 1, 8, 8))
    inputs = [torch.randn(1 + i % 4, 1, 8, 8) for i in range(24)]
    expected = [packed(x) for x in inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(3):
            results = list(pool.map(packed, inputs))
            assert all(torch.equal(a, b) for a, b in zip(results, expected))


def test_binary_convs_pack_their_float_input_in_the_same_call():
    # Bi-Real blocks: every binary conv reads a float tensor; its packing is part of the conv's call
    model = randomize_batchnorms(onebit.models.create("birealnet_small", num_classes=10, in_channels=1), 8).eval()
    x = torch.randn(2, 1, 28, 28)
    packed = engine.pack(model, x)
    nodes = [node["op"] for node in packed.graph["nodes"]]
    steps = [row["op"] for row in packed.profile(x, repeat=1)]
    convs = nodes.count("binary_conv2d") + nodes.count("binary_conv2d_threshold")
    assert convs > 0 and sum(step.startswith("pack+binary_conv2d") for step in steps) == convs
    adds = sum(step.endswith("+add") for step in steps)
    norms = sum("+batch_norm" in step for step in steps)
    assert len(steps) == len(nodes) - convs - adds - norms  # each absorbed pack, BatchNorm or add is one step less
    ref = model(x)
    with ops.use_backend("reference"):
        assert torch.allclose(packed(x), ref, atol=1e-4, rtol=0)
    assert torch.allclose(packed(x), ref, atol=1e-4, rtol=0)


def run_node_by_node(packed: engine.PackedModel, x: torch.Tensor) -> torch.Tensor:
    """The packed graph evaluated one node at a time, nothing fused (the specification of a fused run)."""
    from onebit.engine import graph as G

    tensors = packed.named_graph_tensors()
    env = {packed.graph["input"]["name"]: x}
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else None
    for node in packed.graph["nodes"]:
        spec = G.OPS[node["op"]]
        roles = {role: tensors[key] for role, key in node.get("tensors", {}).items()}
        out = spec.fn(roles, G.attrs(node), *[env[i] for i in node["inputs"]])
        if node["op"] == "binary_conv2d":
            out = out.contiguous(memory_format=fmt or torch.contiguous_format)
        env[node["name"]] = out
    return env[packed.graph["outputs"][0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["birealnet_small", "resnet_like"])
def test_fused_steps_equal_the_graph_run_node_by_node(backend, channels_last, name):
    # pack+conv and conv+add (the shortcut added as the conv writes its output) change no bit
    if name == "resnet_like":
        model, x = randomize_batchnorms(ResidualNet(scale_weights=True), 11).eval(), torch.randn(3, 3, 12, 12)
    else:
        model = randomize_batchnorms(onebit.models.create(name, num_classes=10, in_channels=1), 11).eval()
        x = torch.randn(3, 1, 28, 28)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = engine.pack(model, x, fold_batchnorm=True)  # the BatchNorm in the conv: the conv feeds the add
    steps = [row["op"] for row in packed.profile(x, repeat=1)]
    assert "pack+binary_conv2d+add" in steps and "add" not in steps
    with engine.use_backend(backend):
        fused, node_by_node = packed(x), run_node_by_node(packed, x)
    assert torch.equal(fused, node_by_node)
    assert torch.allclose(fused, model(x), atol=1e-4, rtol=0)


@pytest.mark.skipif(not ops.native_available(), reason="needs the native kernels")
def test_binary_conv_steps_call_their_bound_layer_on_the_native_backend(monkeypatch):
    """Each binary conv step checks its weights, scale, bias and BatchNorm once (kernels.ConvLayer) and
    its calls pass only the input and shortcut; the reference backend does not use it."""
    from onebit.engine import kernels as K

    model = randomize_batchnorms(onebit.models.create("birealnet_small", num_classes=10, in_channels=1), 13).eval()
    x = torch.randn(2, 1, 28, 28)
    packed = engine.pack(model, x)
    convs = sum(node["op"] == "binary_conv2d" for node in packed.graph["nodes"])
    calls = []
    bound_call = K.ConvLayer.__call__
    monkeypatch.setattr(K.ConvLayer, "__call__", lambda self, *a: calls.append(self) or bound_call(self, *a))
    native = packed(x)
    assert convs > 0 and len(calls) == convs
    with engine.use_backend("reference"):
        reference = packed(x)
    assert len(calls) == convs and torch.equal(native, reference)


def test_writes_to_packed_weights_are_seen_by_the_next_call():
    # the kernels keep each layer's prepared weights between calls, until the weights change
    model = randomize_batchnorms(onebit.models.create("birealnet_small", num_classes=10, in_channels=1), 10).eval()
    x = torch.randn(2, 1, 28, 28)
    packed = engine.pack(model, x)
    before = packed(x)
    tensors = packed.named_graph_tensors()
    conv = next(n for n in packed.graph["nodes"] if n["op"] in ("binary_conv2d", "binary_conv2d_threshold"))
    weight = tensors[conv["tensors"]["weight"]]
    weight[: weight.shape[0] // 2] ^= weight[: weight.shape[0] // 2]  # half the channels: all weights +1
    fresh = engine.PackedModel(packed.graph, {k: t.clone() for k, t in tensors.items()})
    after = packed(x)
    assert torch.equal(after, fresh(x)) and not torch.equal(after, before)


def test_packed_model_deep_copies_and_pickles():
    import copy
    import io

    model = randomize_batchnorms(onebit.models.create("birealnet_small", num_classes=10, in_channels=1), 12).eval()
    x = torch.randn(2, 1, 28, 28)
    packed = engine.pack(model, x)
    expected = packed(x)  # its weight caches are filled
    clone = copy.deepcopy(packed)
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    assert torch.equal(clone(x), expected) and torch.equal(unpickled(x), expected)


def test_concurrent_multithreaded_calls_get_their_own_answers():
    # big enough for two-thread regions: callers that find the threads busy run alone
    model = randomize_batchnorms(onebit.models.create("birealnet_small", num_classes=10, in_channels=1), 9).eval()
    packed = engine.pack(model, torch.randn(2, 1, 28, 28))
    inputs = [torch.randn(1 + i % 3, 1, 28, 28) for i in range(12)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = [packed(x) for x in inputs]
        torch.set_num_threads(2)
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            for _ in range(2):
                results = list(pool.map(packed, inputs))
                assert all(torch.equal(a, b) for a, b in zip(results, expected))
    finally:
        torch.set_num_threads(threads)


def test_results_do_not_depend_on_thread_count():
    model, x = build_chain(
        {
            "c1": 70,
            "c2": 130,
            "c3": 66,
            "k1": 3,
            "k2": 3,
            "pad1": 1,
            "pad2": 1,
            "pv1": 0.0,
            "pv2": -1.0,
            "groups2": 2,
            "pool": None,
            "bias": True,
            "size": (23, 19),
            "batch": 4,
            "seed": 7,
        }
    )
    packed = engine.pack(model, x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed(x)
        torch.set_num_threads(2)
        two = packed(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, model(x))


@pytest.mark.parametrize("name,size", [("lenet_binary", 8), ("birealnet_small", 28)])  # fused steps too
def test_packed_model_exports_with_torch_export(name, size):
    from onebit.engine import reference

    reference._USED_BITS.clear()  # tensors made while tracing (fake ones) must not be kept for later calls
    reference._POOL_INDEX.clear()
    model = randomize_batchnorms(onebit.models.create(name, num_classes=10, in_channels=1), 6).eval()
    x = torch.randn(3, 1, size, size)
    packed = engine.pack(model, x)
    exported = torch.export.export(packed, (x,))  # before the first eager call
    expected = model(x)
    assert torch.allclose(packed(x), expected, atol=1e-4, rtol=0)
    assert torch.equal(exported.module()(x), packed(x))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    f1=st.integers(1, 300),
    f2=st.integers(1, 200),
    f3=st.integers(1, 50),
    bias=st.booleans(),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_binary_mlp_keeps_features_packed(backend, f1, f2, f3, bias, batch, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(QLinear(f1, f2, bias=bias, **SIGN), nn.BatchNorm1d(f2), QLinear(f2, f3, bias=False, **SIGN))
    randomize_batchnorms(model, seed, centred=f1**0.5)
    model.eval()
    x = torch.randn(batch, f1)
    packed = engine.pack(model, x)
    assert [n["op"] for n in packed.graph["nodes"]] == ["pack_features", "binary_linear_threshold", "binary_linear"]
    assert torch.equal(run_packed(packed, x, backend), model(x))


def test_packed_model_traces_with_torch_compile():
    model = randomize_batchnorms(onebit.models.create("lenet_binary", num_classes=10, in_channels=1), 7).eval()
    x = torch.randn(3, 1, 8, 8)
    packed = engine.pack(model, x)
    compiled = torch.compile(packed, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), packed(x))


@pytest.mark.filterwarnings("ignore:BatchNorm '1' cannot be folded")
def test_canonized_sign_thresholds_pack_like_batchnorms():
    canonize = pytest.importorskip("onebit.canonize")
    model = randomize_batchnorms(onebit.models.create("lenet_binary", num_classes=10, in_channels=1), 8).eval()
    x = torch.randn(16, 1, 8, 8)
    direct = engine.pack(model, x)
    canonize.fold_thresholds(model, skip_unmergeable=True)
    packed = engine.pack(model, x)
    assert [n["op"] for n in packed.graph["nodes"]] == [n["op"] for n in direct.graph["nodes"]]
    assert torch.equal(packed(x), model(x)) and torch.equal(packed(x), direct(x))


def test_standalone_sign_threshold_runs_as_a_float_op(tmp_path):
    canonize = pytest.importorskip("onebit.canonize")

    class TwoLayouts(nn.Module):  # the BatchNorm's consumers want different packed layouts: no fusion
        def __init__(self):
            super().__init__()
            self.conv = QConv2d(6, 8, 3, bias=False, **SIGN)
            self.bn = nn.BatchNorm2d(8)
            self.a = QConv2d(8, 4, 3, padding=1, bias=False, **SIGN)
            self.b = QConv2d(8, 4, 1, bias=False, **SIGN)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.a(y) + self.b(y)

    model = randomize_batchnorms(TwoLayouts(), 9).eval()
    canonize.fold_thresholds(model, skip_unmergeable=True)
    x = torch.randn(2, 6, 5, 5)
    packed = engine.pack(model, x)
    assert "sign_threshold" in [n["op"] for n in packed.graph["nodes"]]
    assert torch.equal(packed(x), model(x))
    packed.save(tmp_path / "m.safetensors")
    assert torch.equal(engine.load(tmp_path / "m.safetensors")(x), model(x))


@pytest.mark.parametrize("name", ["birealnet18", "resnete18", "binary_densenet28"])
def test_deep_zoo_models_with_sign_weights_are_bit_identical_in_both_layouts(name):
    """Float convs and adaptive pools round differently in NCHW and channels_last: the packed
    model's float values take the layout the model's own have, so deep models stay exact."""
    kw = {"weight_quantizer": "ste_sign"} if name != "binary_densenet28" else {}
    model = onebit.models.create(name, num_classes=100, in_channels=3, **kw)
    model = randomize_batchnorms(model, 10, centred=0.3).eval()
    x = torch.randn(2, 3, 64, 64)
    packed = engine.pack(model, x)
    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(packed(inp), model(inp))


def test_float_layers_after_binary_layers_see_the_models_memory_format():
    model = nn.Sequential(
        QConv2d(32, 48, 3, padding=1, bias=False, **SIGN),
        nn.Conv2d(48, 40, 3, padding=1),
        nn.AdaptiveAvgPool2d(3),
    ).eval()
    x = torch.randn(2, 32, 9, 9)
    packed = engine.pack(model, x)
    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            for backend in BACKENDS:
                assert torch.equal(run_packed(packed, inp, backend), model(inp))


# ---------------------------------------------------------------------------
# random stacks of layers


def _random_stack(draw_ops, channels: int, seed: int) -> nn.Sequential:
    """A sequential model from a list of layer codes, tracking the channel count."""
    layers: list[nn.Module] = []
    c = channels
    for code, arg in draw_ops:
        if code == "bconv":
            k, pad, pv, groups, cout = arg
            groups = groups if c % groups == 0 and cout % groups == 0 else 1
            layers.append(QConv2d(c, cout, k, padding=pad, pad_value=pv, groups=groups, bias=False, **SIGN))
            c = cout
        elif code == "bn":
            layers.append(nn.BatchNorm2d(c))
        elif code == "maxpool":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        elif code == "avgpool":
            layers.append(nn.AvgPool2d(3, 1, 1))
        elif code == "act":
            layers.append([nn.ReLU(), nn.Hardtanh(), nn.PReLU(c), nn.Identity(), QActivation("approx_sign")][arg])
        elif code == "fconv":
            layers.append(nn.Conv2d(c, arg, 1))
            c = arg
    return randomize_batchnorms(nn.Sequential(*layers), seed).eval()


stack_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("bconv"),
            st.tuples(
                st.sampled_from([1, 3]),
                st.integers(0, 1),
                st.sampled_from([0.0, 1.0, -1.0]),
                st.sampled_from([1, 2]),
                st.integers(1, 90),
            ),
        ),
        st.tuples(st.just("bn"), st.none()),
        st.tuples(st.just("maxpool"), st.none()),
        st.tuples(st.just("avgpool"), st.none()),
        st.tuples(st.just("act"), st.integers(0, 4)),
        st.tuples(st.just("fconv"), st.integers(1, 40)),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    ops_list=stack_ops,
    channels=st.integers(1, 70),
    size=st.integers(6, 12),
    seed=st.integers(0, 2**31 - 1),
    channels_last=st.booleans(),
)
def test_random_layer_stacks_are_exact(ops_list, channels, size, seed, channels_last):
    model = _random_stack(ops_list, channels, seed)
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:
        assume(False)  # the stack shrank the image below a kernel: not a valid model
    packed = engine.pack(model, x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = model(x)
    with torch.no_grad():
        y = packed(x)
    if any(code == "fconv" for code, _ in ops_list):
        # a float conv with a bias may add it in another order than torch did on its input
        # layout: equal to float rounding, as the engine promises after float layers
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    else:
        # sign weights, no biases on binary layers: bit-identical
        assert torch.equal(y, ref)


def test_binary_linear_on_sequences_runs_as_torch_does():
    model = nn.Sequential(QLinear(20, 7, bias=False, **SIGN)).eval()
    x = torch.randn(3, 5, 20)
    packed = engine.pack(model, x)
    assert torch.equal(packed(x), model(x))
    x = torch.randn(2, 11, 20)  # any sequence length, as for the model
    assert torch.equal(packed(x), model(x))


def test_reshape_of_the_batch_dimension_is_refused():
    class Merge(nn.Module):
        def forward(self, x):
            return x.view(-1)

    with pytest.raises(engine.UnsupportedModelError, match="batch dimension"):
        engine.pack(Merge().eval(), torch.randn(2, 3, 4, 4))


def test_nan_inf_and_signed_zero_inputs_follow_the_sign_convention():
    model = randomize_batchnorms(
        nn.Sequential(
            QConv2d(5, 6, 3, padding=1, bias=False, **SIGN),
            nn.BatchNorm2d(6),
            QConv2d(6, 4, 3, padding=1, bias=False, **SIGN),
        ),
        11,
    ).eval()
    x = torch.randn(2, 5, 7, 7)
    x[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    x[1, 2] = 0.0
    packed = engine.pack(model, x)
    for backend in BACKENDS:
        assert torch.equal(run_packed(packed, x, backend), model(x))


def _empty_batch_models():
    from onebit.nn import BitLinear, TwistConv2d
    from onebit.quant_lowbit import DoReFaSymmetric

    torch.manual_seed(0)
    yield "lenet_binary", onebit.models.create("lenet_binary", in_channels=1), (1, 8, 8)
    yield "birealnet_small", onebit.models.create("birealnet_small", in_channels=1, conv_layer="twist"), (1, 12, 12)
    yield "mlp", nn.Sequential(QLinear(20, 70, **SIGN), nn.BatchNorm1d(70), QLinear(70, 4, **SIGN)), (20,)
    yield (
        "bitplanes",
        nn.Sequential(
            QConv2d(2, 3, 3, padding=1, input_quantizer=DoReFaSymmetric(2), weight_quantizer="ternary"),
            nn.Flatten(),
            QLinear(75, 4, input_quantizer="dorefa", weight_quantizer="ternary"),
        ),
        (2, 5, 5),
    )
    yield "conv1d", nn.Sequential(QConv1d(3, 8, 3, padding=1, **SIGN), QConv1d(8, 4, 3, padding=1, **SIGN)), (3, 9)
    yield "twist", nn.Sequential(TwistConv2d(16, 16, iters=2, **SIGN), nn.AdaptiveAvgPool2d(1)), (16, 6, 6)
    yield "bitlinear", nn.Sequential(BitLinear(12, 5)), (3, 12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_gives_the_models_empty_output(backend):
    for name, model, shape in _empty_batch_models():
        model = randomize_batchnorms(model, 3).eval()
        packed = engine.pack(model, torch.randn(2, *shape))
        for fmt in (torch.contiguous_format, torch.channels_last) if len(shape) == 3 else (torch.contiguous_format,):
            x = torch.randn(0, *shape).contiguous(memory_format=fmt)
            y, ref = run_packed(packed, x, backend), model(x)
            assert y.shape == ref.shape and y.dtype == ref.dtype, name


def test_profile_prints_as_a_table_and_stays_a_list_of_dicts():
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), QConv2d(8, 8, 3, padding=1, **SIGN), nn.Flatten(1)
    ).eval()
    x = torch.randn(2, 2, 8, 8)
    profile = engine.pack(model, x).profile(x, repeat=1)
    assert isinstance(profile, list) and [r["op"] for r in profile] == [
        "conv2d",
        "batch_norm",
        "pack+binary_conv2d",
        "flatten",
    ]
    assert abs(sum(r["share"] for r in profile) - 1.0) < 1e-9
    lines = str(profile).splitlines()
    assert lines[0].startswith("packed model profile: 4 steps")
    header = next(line for line in lines if "op" in line and "share" in line)
    assert header.split() == ["step", "op", "module", "ms", "share"]
    assert any(line.split()[:2] == ["total", f"{sum(r['ms'] for r in profile):.3f}"] for line in lines)
    assert sum("pack+binary_conv2d" in line for line in lines) == 1
