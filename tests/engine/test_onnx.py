"""ONNX export: standard ops that onnxruntime runs with the model's numbers.

Binary layers give bit-identical outputs (exact integer sums of +-1, then the scale and
bias as two float roundings, as onebit computes them); float layers agree up to float
rounding. The models below keep float values on dyadic grids (integer inputs, weights in
multiples of 1/4, BatchNorm means off the grid) so that every float op is exact in any
summation order and no sign sits within rounding of 0: the whole output is bit-identical.
"""

import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import onebit  # noqa: E402
from onebit import engine  # noqa: E402
from onebit.bits import unpack_signs  # noqa: E402
from onebit.engine.to_onnx import OnnxExportError, load_onnx  # noqa: E402
from onebit.nn import QActivation, QConv2d, QLinear  # noqa: E402

SIGN = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}
MAGNITUDE = {"input_quantizer": "ste_sign", "weight_quantizer": "magnitude_aware_sign"}


def on_grid(model: nn.Module, seed: int) -> nn.Module:
    """Float weights and biases in multiples of 1/4; BatchNorm statistics that keep values off 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randint(-8, 8, (c,), generator=g) + 0.375)
                m.running_var.copy_(torch.ones(c) * 4.0 - m.eps)  # sqrt(var + eps) = 2: exact
                m.weight.copy_(
                    torch.randint(1, 4, (c,), generator=g) * torch.where(torch.rand(c, generator=g) < 0.4, -1.0, 1.0)
                )
                m.bias.copy_(torch.randint(-4, 4, (c,), generator=g) * 0.25)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randint(-4, 5, m.weight.shape, generator=g) * 0.25)
                if m.bias is not None:
                    m.bias.copy_(torch.randint(-4, 5, m.bias.shape, generator=g) * 0.25)
    return model.eval()


def integer_input(*shape, seed=0):
    x = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()
    return x  # exact zeros included: sign(0) = +1


def run_onnx(path, x):
    return load_onnx(path)(x)


class Mixed(nn.Module):
    """Float stem, binary convs with pad values 0 and -1, biases, magnitude-aware weights,
    thresholds with and without a max pool, a residual add, a concat, a binary classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = QConv2d(16, 16, 3, padding=1, pad_value=-1.0, **SIGN)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = QConv2d(16, 16, 3, padding=1, **MAGNITUDE)  # bias=True
        self.pool = nn.MaxPool2d(2)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = QConv2d(16, 16, 3, padding=1, groups=2, **SIGN)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = QLinear(32 * 4 * 4, 10, **MAGNITUDE)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        y = self.bn1(self.conv1(x))
        y = self.bn2(self.pool(self.conv2(y)))
        z = self.bn3(self.conv3(y)) + y
        return self.fc(torch.flatten(torch.cat([z, y], 1), 1))


def test_mixed_model_is_bit_identical_in_onnxruntime(tmp_path):
    model = on_grid(Mixed(), 1)
    x = integer_input(4, 3, 8, 8)
    path = tmp_path / "mixed.onnx"
    proto = onebit.export_onnx(model, x, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= set(onnx.defs.get_all_schemas_with_history() and [s.name for s in onnx.defs.get_all_schemas()])
    assert {"Conv", "BitShift", "BitwiseAnd", "Where"} <= ops
    y = run_onnx(path, x)
    assert torch.equal(y, model(x))
    # any batch size
    x2 = integer_input(1, 3, 8, 8, seed=3)
    assert torch.equal(run_onnx(path, x2), model(x2))


def test_noact_pattern_and_thresholds_through_a_sign_activation(tmp_path):
    model = on_grid(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            QActivation("ste_sign"),
            QConv2d(8, 8, 3, padding=1, weight_quantizer="ste_sign"),
            nn.BatchNorm2d(8),
            QActivation("ste_sign"),
            QConv2d(8, 8, 3, padding=1, weight_quantizer="magnitude_aware_sign"),
            nn.Flatten(1),
        ),
        2,
    )
    x = integer_input(2, 3, 6, 6)
    onebit.export_onnx(model, x, tmp_path / "m.onnx", strict=True)
    assert torch.equal(run_onnx(tmp_path / "m.onnx", x), model(x))


def test_binary_weights_are_stored_as_bits(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        QConv2d(32, 128, 3, padding=1, bias=False, **SIGN),
        nn.BatchNorm2d(128),
        QConv2d(128, 256, 3, padding=1, bias=False, **SIGN),
        nn.BatchNorm2d(256),
        QConv2d(256, 256, 3, padding=1, bias=False, **SIGN),
        nn.BatchNorm2d(256),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(256, 10),
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "cnn.onnx"
    onebit.export_onnx(model, x, path)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size * 10 <= float_bytes
    stored = {t.name: t for t in onnx.load(path).graph.initializer}
    assert any(t.data_type == onnx.TensorProto.UINT8 for t in stored.values())


@pytest.mark.parametrize("norm", [False, True])
def test_bitlinear_runs_in_onnxruntime_with_its_weights_stored_as_2_bit_codes(norm, tmp_path):
    """BitLinear's ternary_linear: absmax int8 tokens, the exact integer sum, then / s * scale + bias,
    op for op: bit-identical without the RMSNorm. With it, the norm is composed of standard ops whose
    reduction rounds differently from torch's in the last bit, so the outputs agree to float
    rounding. A token holding a NaN or an infinity gives a row of NaN, as in the engine."""
    from onebit.nn import BitLinear

    torch.manual_seed(1)
    model = nn.Sequential(BitLinear(90, 48, norm=norm, bias=True), BitLinear(48, 10, norm=norm)).eval()
    x = torch.randn(6, 90) * torch.linspace(0.01, 20, 6).view(-1, 1)  # tokens of very different magnitudes
    x[2, 7], x[4, 0] = float("nan"), float("inf")
    packed = engine.pack(model, x[:1])
    assert [n["op"] for n in packed.graph["nodes"]] == ["ternary_linear", "ternary_linear"]
    path = tmp_path / "bitlinear.onnx"
    onebit.export_onnx(model, x[:1], path)
    got, expected = run_onnx(path, x), packed(x)
    assert torch.equal(torch.isnan(got), torch.isnan(expected)) and torch.isnan(got[[2, 4]]).all()
    finite = ~torch.isnan(expected).any(dim=1)
    if norm:
        assert torch.allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got[finite], expected[finite])
    stored = [tuple(t.dims) for t in onnx.load(path).graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert sorted(d for d in stored if d[0] > 1) == [(10, 12, 1), (48, 23, 1)]  # [Out, ceil(F / 4), 1]: 2 bits a weight
    assert not any(
        t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 480
        for t in onnx.load(path).graph.initializer
    )  # no float copy of the weights


def packed_as_signs(packed_value: torch.Tensor, node: dict, shape) -> torch.Tensor:
    """The engine's packed bits as the +-1 tensor of ``shape`` ([N, C, H, W] or [N, F])."""
    if len(shape) == 2:
        return unpack_signs(packed_value, shape[1])
    a = node["attrs"]
    if node["op"] == "pack":
        (ph, pw), groups = a["padding"], a["groups"]
    else:
        (ph, pw), groups = a["out_padding"], a["out_groups"]
    n, c, h, w = shape
    inner = packed_value[:, ph : ph + h, pw : pw + w]  # [N, H, W, G, Wg]
    signs = unpack_signs(inner, c // groups)  # [N, H, W, G, C / G]
    return signs.reshape(n, h, w, c).permute(0, 3, 1, 2)


def onnx_values(packed, path, x):
    """(every graph value as the engine computes it, the ONNX tensor of every graph value)."""
    from onebit.engine import to_onnx

    exporter = to_onnx._Exporter(packed, x)
    with torch.no_grad():
        exporter.export()
    model = onnx.load(path)
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out not in known:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
                known.add(out)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    tensors = dict(zip(names, session.run(names, {"input": x.numpy()})), input=x.numpy())
    return exporter.run, {name: torch.as_tensor(tensors[exporter.value[name]]) for name in exporter.run}


BINARY_OPS = ("binary_conv2d", "binary_linear", "binary_conv2d_threshold", "binary_linear_threshold", "max_pool_bits")
#: ops whose float output is a +-1 tensor or an exact function of +-1 inputs: equal given equal inputs
EXACT_FLOAT_OPS = ("binary_conv2d", "binary_linear", "sign", "sign_threshold")


def close_to_float_rounding(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float32 rounding of sums of a few thousand terms (relative to the tensor's scale),
    NaN where the other is NaN."""
    finite = expected[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-3), equal_nan=True)


def check_every_layer(packed, path, x) -> list[str]:
    """Every graph op's output in onnxruntime against the engine's op (its float semantics, or its
    kernel) run on onnxruntime's own inputs of that op: binary layers and signs bit for bit, every
    other op to float rounding. Then the +-1 values of the two end-to-end runs: where they differ,
    the float value before the first differing sign must be within rounding of 0 (onnxruntime
    rounds float ops differently from torch), which is the one legitimate reason. Returns the
    sign-producing ops whose +-1 values differ (empty: the final outputs must agree to rounding)."""
    from onebit.engine import graph as G
    from onebit.engine import ops

    engine_values, onnx_tensors = onnx_values(packed, path, x)
    graph_tensors = packed.named_graph_tensors()
    nodes = {n["name"]: n for n in packed.graph["nodes"]}

    def as_signs(name: str, value: torch.Tensor) -> torch.Tensor:
        if value.dtype == torch.int64:
            return packed_as_signs(value, nodes[name], tuple(onnx_tensors[name].shape))
        return value.contiguous()

    def engine_input(node: dict, value: str) -> torch.Tensor:
        """onnxruntime's tensor of ``value`` as ``node`` takes it (packed in its layout, or float)."""
        tensor, a = onnx_tensors[value], node["attrs"]
        if G.OPS[node["op"]].inputs[0] != G.PACKED:
            return tensor
        if node["op"].startswith("binary_linear"):
            return ops.pack_features(tensor)
        if node["op"] == "max_pool_bits":
            return ops.pack_activations(tensor.contiguous(), (0, 0), 0.0, a["out_groups"])
        return ops.pack_activations(tensor.contiguous(), tuple(a["padding"]), a["pad_value"], a["groups"])

    differing = []
    for node in packed.graph["nodes"]:
        name, op = node["name"], node["op"]
        spec = G.OPS[op]
        roles = {role: graph_tensors[key] for role, key in node.get("tensors", {}).items()}
        with torch.no_grad():
            expected = spec.fn(roles, G.attrs(node), *[engine_input(node, i) for i in node["inputs"]])
        got = onnx_tensors[name]
        if spec.output == G.PACKED or op in EXACT_FLOAT_OPS:
            assert torch.equal(as_signs(name, expected), got), f"{op} {name}: not bit-identical on the same input"
        else:
            assert close_to_float_rounding(got, expected), (
                f"{op} {name}: differs by {(got - expected).abs().max().item():.3g} on the same input"
            )
        if spec.output == G.PACKED or op in ("sign", "sign_threshold"):  # the two runs' own +-1 values
            mine = as_signs(name, engine_values[name])
            if not torch.equal(mine, got):
                if not differing:  # the first flip: its input agrees to rounding and is within rounding of 0
                    before, theirs = engine_values[node["inputs"][0]], onnx_tensors[node["inputs"][0]]
                    assert before.dtype != torch.int64 and close_to_float_rounding(theirs, before), name
                    scale = before.abs().max().item()
                    flipped = (mine != got).reshape(before.shape) if before.shape == got.shape else None
                    assert flipped is not None and (before[flipped].abs() <= 1e-5 * scale).all(), (
                        f"{op} {name}: a sign flipped on a value {before[flipped].abs().max().item():.3g} away from 0"
                    )
                differing.append(name)
    return differing


@pytest.mark.parametrize("name", ["lenet_binary", "lenet_larq", "birealnet_small", "resnete18", "binary_densenet28"])
def test_zoo_models_run_in_onnxruntime(name, tmp_path):
    torch.manual_seed(0)
    small = name.startswith(("lenet", "birealnet_small"))
    x = torch.randn(
        2,
        1 if small else 3,
        8 if name == "lenet_binary" else 28 if small else 32,
        8 if name == "lenet_binary" else 28 if small else 32,
    )
    x[x.abs() < 0.05] = 0.0
    model = onebit.models.create(name, in_channels=x.shape[1]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", engine.FallbackWarning)
        packed = engine.pack(model, x)
    path = tmp_path / f"{name}.onnx"
    onebit.export_onnx(packed, x, path)
    differing = check_every_layer(packed, path, x)
    y, ref = run_onnx(path, x), model(x).detach()
    if not differing:  # every sign agreed: the outputs agree to float rounding
        assert close_to_float_rounding(y, ref), (y - ref).abs().max()
        assert torch.equal(y.argmax(1), ref.argmax(1))


FLOAT_SUMS = {  # a quantized layer with a float operand, no scale and no bias: its sum is a float
    "float input, sign weights (lenet_larq's first layer)": (
        lambda: QConv2d(2, 3, 3, padding=1, weight_quantizer="ste_sign", bias=False),
        (2, 2, 5, 5),
    ),
    "float input, sign weights, linear": (lambda: QLinear(10, 4, weight_quantizer="ste_sign", bias=False), (3, 10)),
    "sign input, float weights": (
        lambda: QConv2d(2, 3, 3, padding=1, input_quantizer="ste_sign", weight_quantizer=None, bias=False),
        (2, 2, 5, 5),
    ),
    "sign input, float weights, linear": (
        lambda: QLinear(10, 4, input_quantizer="ste_sign", weight_quantizer=None, bias=False),
        (3, 10),
    ),
}


@pytest.mark.parametrize("case", list(FLOAT_SUMS))
def test_a_float_sum_is_not_rounded_to_an_integer(case, tmp_path):
    """A float operand makes the sum a float: onnxruntime's output is the float64 sum to float32
    rounding (not the integer part of it, as when every sum went through int32)."""
    build, shape = FLOAT_SUMS[case]
    torch.manual_seed(3)
    layer = build().eval()
    x = torch.randn(*shape)
    sign = lambda t: torch.where(t < 0, -1.0, 1.0).double()  # noqa: E731  (sign(0) = +1)
    xq = sign(x) if layer.input_quantizer is not None else x.double()
    wq = sign(layer.weight) if layer.weight_quantizer is not None else layer.weight.detach().double()
    ref = torch.nn.functional.conv2d(xq, wq, padding=1) if x.dim() == 4 else xq @ wq.T
    assert (ref != ref.round()).float().mean() > 0.9  # the sums are not integers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", engine.FallbackWarning)  # a float operand: it runs in float
        onebit.export_onnx(layer, x, tmp_path / "f.onnx")
    y = run_onnx(tmp_path / "f.onnx", x)
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5), (y.double() - ref).abs().max()


def _nan_cases():
    from onebit.nn import BitLinear
    from onebit.quant import DoReFa, DoReFaSymmetric, DoReFaWeight

    conv = lambda **q: QConv2d(2, 3, 3, padding=1, **q)  # noqa: E731
    linear = lambda **q: QLinear(12, 4, **q)  # noqa: E731
    return {  # every quantized path of the engine: (layer, its ops in the packed graph, exact sums)
        "sign x sign": (conv(**SIGN), ["pack", "binary_conv2d"], True),
        "sign x magnitude-aware, linear": (linear(**MAGNITUDE), ["pack_features", "binary_linear"], True),
        "float x sign": (conv(weight_quantizer="ste_sign", bias=False), ["qconv2d"], False),
        "sign x float": (
            conv(input_quantizer="ste_sign", weight_quantizer=None, bias=False),
            ["sign", "qconv2d"],
            False,
        ),
        "dorefa_sym(2) x ternary": (
            conv(input_quantizer=DoReFaSymmetric(2), weight_quantizer="ternary"),
            ["bitplane_conv2d"],
            True,
        ),
        "dorefa(2) x ternary, no bias": (
            conv(input_quantizer="dorefa", weight_quantizer="ternary", bias=False),
            ["bitplane_conv2d"],
            True,
        ),
        "dorefa_sym(2) x sign (bit planes)": (
            conv(input_quantizer=DoReFaSymmetric(2), weight_quantizer="ste_sign", bias=False),
            ["bitplane_conv2d"],
            True,
        ),
        "dorefa(3) x dorefa_weight(2), linear": (
            linear(input_quantizer=DoReFa(3), weight_quantizer=DoReFaWeight(2)),
            ["bitplane_conv2d"],
            True,
        ),
        "dorefa(8) x ternary (integers, float conv)": (
            conv(input_quantizer=DoReFa(8), weight_quantizer="ternary", bias=False),
            ["quantize_int", "qconv2d"],
            True,
        ),
        "dorefa(8) x sign, linear": (
            linear(input_quantizer=DoReFa(8), weight_quantizer="magnitude_aware_sign"),
            ["quantize_int", "qlinear"],
            True,
        ),
        "BitLinear (int8 x ternary)": (BitLinear(12, 4, norm=False), ["ternary_linear"], True),
    }


NAN_CASES = list(_nan_cases())


@pytest.mark.parametrize("case", NAN_CASES)
def test_a_nan_input_gives_nan_exactly_where_the_model_does(case, tmp_path):
    """One rule for every quantized path, the model's: a NaN input is NaN after a k-bit or float
    input (an input quantizer's integers of NaN are NaN, and so is every sum that reads one) and +1
    after a sign (sign(NaN) = +1). onnxruntime's output is NaN exactly where the model's is, and
    elsewhere equal to it (exact sums) or to float rounding (float sums); not a NaN sum cast to an
    int32 and back (-2^31)."""
    torch.manual_seed(5)
    layer, graph_ops, exact = _nan_cases()[case]
    layer.eval()
    x = torch.randn(2, 2, 5, 5) if isinstance(layer, QConv2d) else torch.randn(3, 12)
    x.view(-1)[7] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", engine.FallbackWarning)
        assert [n["op"] for n in engine.pack(layer, x).graph["nodes"]] == graph_ops
        onebit.export_onnx(layer, x, tmp_path / "nan.onnx")
    with torch.no_grad():
        expected = layer(x)
    got = run_onnx(tmp_path / "nan.onnx", x)
    assert torch.isnan(expected).any() != case.startswith("sign x")  # NaN reaches the sum unless signed first
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    if exact:
        assert torch.equal(got.nan_to_num(0.5), expected.nan_to_num(0.5))
    else:
        assert close_to_float_rounding(got, expected)


def pool_configurations(h: int, w: int) -> list[nn.Module]:
    """Every max / average pool of kernel 1-3 (and 2x3), stride 1-3, padding 0-1, ceil_mode off and on,
    dilation 1-2 (max) or count_include_pad on and off (average) that torch accepts on an h x w input."""
    import itertools

    pools = []
    for k, st, pad, ceil in itertools.product([1, 2, 3, (2, 3)], [1, 2, 3, (3, 2)], [0, 1], [False, True]):
        for variant in [1, 2, "include_pad", "exclude_pad"]:
            if isinstance(variant, int):
                pool = nn.MaxPool2d(k, st, pad, dilation=variant, ceil_mode=ceil)
            else:
                pool = nn.AvgPool2d(k, st, pad, ceil_mode=ceil, count_include_pad=variant == "include_pad")
            try:
                pool(torch.zeros(1, 1, h, w))
            except RuntimeError:  # padding more than half the kernel, or no window
                continue
            pools.append(pool)
    return pools


class Pools(nn.Module):
    def __init__(self, pools):
        super().__init__()
        self.pools = nn.ModuleList(pools)

    def forward(self, x):
        return tuple(pool(x) for pool in self.pools)


def assert_shapes_are_as_inferred(path, x) -> int:
    """onnx's shape inference (the sizes the ONNX spec gives, what a conforming runtime allocates)
    gives every value of the graph the shape onnxruntime computes. Returns the number of values."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True)
    inferred = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in model.graph.value_info
    }
    for name in inferred:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for name, value in zip(names, session.run(names, {"input": x.numpy()})):
        if name in inferred:
            shape = inferred[name]
            assert len(shape) == value.ndim and all(d is None or d == n for d, n in zip(shape, value.shape)), (
                f"{name}: onnx infers {shape}, onnxruntime computes {list(value.shape)}"
            )
    return len(inferred)


def drops_a_window(pool: nn.Module, size: tuple[int, int]) -> bool:
    """Whether torch gives fewer windows than ONNX's ceil formula, ceil((L + 2p - d (k - 1) - 1) / s) + 1."""
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, s, p, d = (pair(getattr(pool, n, 1)) for n in ("kernel_size", "stride", "padding", "dilation"))
    onnx = [-(-(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i]) + 1 for i in range(2)]
    return pool.ceil_mode and list(pool(torch.zeros(1, 1, *size)).shape[2:]) != onnx


@pytest.mark.parametrize("size", [(6, 6), (7, 7), (6, 7), (5, 8)])
def test_every_pool_torch_accepts_exports_and_agrees_with_torch(size, tmp_path):
    """ceil_mode=True: torch drops a last window that would start in the end padding (kernel 2 stride 3
    on 6, kernel 2 stride 2 padding 1 on 7), ONNX's formula keeps it; every configuration torch
    accepts exports (each pool a graph output) and gives torch's shape and numbers in onnxruntime."""
    pools = pool_configurations(*size)
    assert len(pools) >= 150 and sum(drops_a_window(p, size) for p in pools) >= 10
    x = torch.randn(2, 3, *size)
    model = Pools(pools).eval()
    onebit.export_onnx(model, x, tmp_path / "pools.onnx")
    got, expected = run_onnx(tmp_path / "pools.onnx", x), model(x)
    assert len(got) == len(expected) == len(pools)
    for pool, y, ref in zip(pools, got, expected):
        assert y.shape == ref.shape, pool
        if isinstance(pool, nn.MaxPool2d):
            assert torch.equal(y, ref), pool
        else:
            assert torch.allclose(y, ref, rtol=1e-6, atol=1e-6), pool
    assert_shapes_are_as_inferred(tmp_path / "pools.onnx", x)


@pytest.mark.parametrize("kernel, stride, padding, size", [(2, 3, 0, (6, 6)), (2, 2, 1, (6, 7)), (3, 2, 1, (7, 7))])
def test_a_ceil_mode_max_pool_of_bits_gives_torchs_windows(kernel, stride, padding, size, tmp_path):
    """The same for a max pool between a binary conv and the BatchNorm + sign thresholds of the next
    binary conv (``max_pool_bits``), inside the graph: the next layers see torch's windows only."""
    model = on_grid(
        nn.Sequential(
            QConv2d(3, 8, 3, padding=1, **SIGN),
            nn.MaxPool2d(kernel, stride, padding, ceil_mode=True),
            nn.BatchNorm2d(8),
            QConv2d(8, 8, 3, padding=1, **SIGN),
            nn.Flatten(1),
        ),
        4,
    )
    x = integer_input(2, 3, *size, seed=4)
    assert "max_pool_bits" in [n["op"] for n in engine.pack(model, x).graph["nodes"]]
    onebit.export_onnx(model, x, tmp_path / "bits.onnx", strict=True)
    assert torch.equal(run_onnx(tmp_path / "bits.onnx", x), model(x))
    assert assert_shapes_are_as_inferred(tmp_path / "bits.onnx", x) >= 10


@pytest.mark.parametrize("name", ["mixed", "lenet_binary", "bitlinear", "ceil_pools"])
def test_an_empty_batch_exports_and_runs(name, tmp_path):
    """A batch-0 example exports (only its other dimensions fix the graph), and the file runs batch 0:
    an empty output of the model's shape; the same file runs any other batch as the model."""
    from onebit.nn import BitLinear

    model, shape = {
        "mixed": (lambda: on_grid(Mixed(), 1), (3, 8, 8)),
        "lenet_binary": (lambda: on_grid(onebit.models.create("lenet_binary", in_channels=1), 2), (1, 8, 8)),
        "bitlinear": (lambda: nn.Sequential(BitLinear(20, 8, bias=True), BitLinear(8, 4)).eval(), (20,)),
        "ceil_pools": (
            lambda: Pools([nn.MaxPool2d(2, 3, ceil_mode=True), nn.AvgPool2d(2, 2, 1, ceil_mode=True)]).eval(),
            (3, 6, 7),
        ),
    }[name]
    model = model()
    onebit.export_onnx(model, torch.empty(0, *shape), tmp_path / "m.onnx")
    for batch in (0, 3):
        x = integer_input(batch, *shape, seed=batch)
        got, expected = run_onnx(tmp_path / "m.onnx", x), model(x)
        got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
        assert len(got) == len(expected)
        for y, ref in zip(got, expected):
            assert y.shape == ref.shape and y.shape[0] == batch
            assert torch.equal(y, ref) if name != "bitlinear" else torch.allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_circular_padding_has_no_onnx_form_and_says_so(tmp_path):
    model = nn.Sequential(QConv2d(3, 4, 3, padding=1, padding_mode="circular", **SIGN)).eval()
    with pytest.warns(engine.FallbackWarning), pytest.raises(OnnxExportError, match="circular"):
        onebit.export_onnx(model, torch.randn(1, 3, 5, 5), tmp_path / "c.onnx")
    assert not (tmp_path / "c.onnx").exists()


def onebit_cli(*args, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m onebit ARGS`` (or ``python -c CODE ARGS``) in a fresh process."""
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "onebit", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("onnx_cli") / "run"
    result = onebit_cli("train", "--model", "lenet_binary", "--epochs", "1", "--out", str(run))
    assert result.returncode == 0, result.stderr
    return run


def test_export_and_eval_of_the_onnx_file_print_the_runs_accuracy(lenet_run):
    def accuracy(*args):
        result = onebit_cli(*args)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line.startswith("accuracy")]

    result = onebit_cli("export", str(lenet_run), "--out", str(lenet_run / "model.onnx"))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    expected = accuracy("eval", str(lenet_run))
    assert accuracy("eval", str(lenet_run / "model.onnx")) == expected and len(expected) == 1


def test_export_warns_when_the_file_differs_from_the_model_by_more_than_rounding(lenet_run, tmp_path):
    """`onebit export`'s final check: a file whose output is off by 0.5 (here its runner, shifted) is
    written, and the command says by how much it differs, in one warning on stderr."""
    code = """import sys
import onebit.engine.to_onnx as to_onnx
real = to_onnx.load_onnx
to_onnx.load_onnx = lambda path: (lambda x: real(path)(x) + 0.5)
from onebit.cli import main
sys.exit(main(sys.argv[1:]))
"""
    result = onebit_cli("export", str(lenet_run), "--out", str(tmp_path / "m.onnx"), code=code)
    assert result.returncode == 0, result.stderr
    assert "max |onnx - model| = 5.00e-01" in result.stdout
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert (
        len(warning) == 1
        and "5.00e-01 away from the model's" in warning[0]
        and "more than float rounding" in warning[0]
    )
    assert (tmp_path / "m.onnx").is_file()


def test_eval_of_an_onnx_file_on_a_size_it_cannot_take_says_so_in_one_line(lenet_run):
    """`onebit eval m.onnx --image-size 9` for a file exported at 8x8: one error line naming the file,
    the shape it expects and the one it got (as for the packed file), no onnxruntime traceback."""
    path = lenet_run / "model_8x8.onnx"
    assert onebit_cli("export", str(lenet_run), "--out", str(path)).returncode == 0
    result = onebit_cli("eval", str(path), "--image-size", "9")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0]
    assert "expected an input of shape [batch, 1, 8, 8], got [" in lines[0] and ", 1, 9, 9]" in lines[0]


def test_onnxruntime_errors_are_one_line_input_errors(tmp_path):
    """An input of the declared shape that onnxruntime still cannot run (here a Reshape of 3 x 3
    values to rows of 4) and an input of another shape: both InputError, one line, the file named."""
    helper, T = onnx.helper, onnx.TensorProto
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["output"])],
        "g",
        [helper.make_tensor_value_info("input", T.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("output", T.FLOAT, None)],
        initializer=[onnx.numpy_helper.from_array(torch.tensor([-1, 4]).numpy(), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = tmp_path / "rows_of_4.onnx"
    onnx.save(model, path)
    runner = load_onnx(path)
    assert runner(torch.zeros(4, 3)).shape == (3, 4)
    with pytest.raises(engine.InputError) as error:
        runner(torch.zeros(3, 3))
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        f"{path}: onnxruntime cannot run the input of shape [3, 3] (the file expects [batch, 3]): "
    )
    with pytest.raises(engine.InputError, match=r"expected an input of shape \[batch, 3\], got \[2, 5\]$"):
        runner(torch.zeros(2, 5))
    with pytest.raises(engine.InputError, match="expected an input of shape"):
        runner(torch.zeros(3))
    with pytest.raises(TypeError, match="float32"):
        runner(torch.zeros(3, 3, dtype=torch.float64))


class Tokens(nn.Module):
    """A features-last model ([N, ..., F], read by linear layers only): BitLinear, a sign-input QLinear
    (which runs in float on a rank-3 input), activations, BitLinear."""

    def __init__(self):
        super().__init__()
        from onebit.nn import BitLinear

        self.embed = BitLinear(8, 16, norm=False, bias=True)
        self.mix = QLinear(16, 12, **SIGN)
        self.head = BitLinear(12, 5, norm=False)

    def forward(self, x):
        return self.head(torch.nn.functional.hardtanh(self.mix(torch.relu(self.embed(x)))))


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 3, 4, 8)])
def test_a_features_last_input_exports_bit_identical_at_the_examples_shape(shape, tmp_path):
    """A graph input with channel_dim -1 ([N, ..., F]): every op reads the last dimension as the
    engine does, so the file gives the packed model's output bit for bit; its dimensions but the
    batch are the example's, and an input of another length is one InputError naming both shapes."""
    model = on_grid(Tokens(), 2)
    x = integer_input(*shape, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", engine.FallbackWarning)
        packed = engine.pack(model, x)
    assert packed.graph["input"]["channel_dim"] == -1
    path = tmp_path / "tokens.onnx"
    onebit.export_onnx(packed, x, path)
    got, expected = run_onnx(path, x), packed(x)
    assert got.shape == expected.shape == (*shape[:-1], 5) and torch.equal(got, expected)
    x2 = integer_input(1, *shape[1:], seed=5)  # another batch size
    assert torch.equal(run_onnx(path, x2), packed(x2))
    longer = integer_input(shape[0], shape[1] + 2, *shape[2:], seed=6)
    assert packed(longer).shape[1] == shape[1] + 2  # the packed model takes any length
    expects = "[batch, " + ", ".join(str(d) for d in shape[1:]) + "]"
    with pytest.raises(engine.InputError, match=rf"expected an input of shape {re.escape(expects)}, got \[") as error:
        load_onnx(path)(longer)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_every_graph_op_has_one_onnx_form_in_one_family_table():
    """The ONNX forms are tables by op family (binary, quantized, int8, float ops), which together cover the
    graph's ops once each; their integer-valued kinds name only ops of their own table."""
    from onebit.engine import graph as G
    from onebit.engine.onnx import binary, export, floats, int8, quantized

    families = (binary, quantized, int8, floats)
    ops = [op for family in families for op in family.EMITTERS]
    assert sorted(ops) == sorted(G.OPS) and set(export.EMITTERS) == set(G.OPS)
    assert all(set(family.KINDS) <= set(family.EMITTERS) for family in families)
