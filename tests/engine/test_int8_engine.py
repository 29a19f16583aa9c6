"""int8 x int8 layers in the packed engine: the ``int8_conv2d`` / ``int8_linear`` ops and their native
kernels on every ISA this CPU runs, against an independent int64 reference (unfold + integer matmul,
then the float32 epilogue) and against the simulated layers with ``torch.equal``."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onebit
from exported_programs import gives_in_fresh_process, saved_and_loaded
from onebit import engine, quant
from onebit.engine import ops
from onebit.engine.graph.int8 import INT8_OPS
from onebit.nn.layers import QConv2d, QLinear

native = pytest.mark.skipif(not ops.native_available(), reason="no native kernels")


def reference_conv(x, w, s, scale, bias, stride, padding, dilation, groups):
    """x_int = clamp(round(x s)) by float32 ops, the sum in int64 by unfold, then the three roundings."""
    s32 = torch.tensor(s, dtype=torch.float32)
    x_int = torch.round(x * s32).clamp(-127, 127).to(torch.int64)
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    cols = F.unfold(x_int.double(), (kh, kw), dilation=dilation, padding=padding, stride=stride).to(torch.int64)
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = cols.reshape(n, groups, cg * kh * kw, oh * ow)
    wg = w.to(torch.int64).reshape(groups, co // groups, cg * kh * kw)
    acc = torch.einsum("gok,ngkp->ngop", wg, cols).reshape(n, co, oh, ow)
    assert acc.abs().max() < 2**24
    y = acc.to(torch.float32) / s32
    if scale is not None:
        y = y * scale.view(-1, 1, 1)
    if bias is not None:
        y = y + bias.view(-1, 1, 1)
    return y


def random_case(gen, cin, cout, k, groups):
    w = torch.randint(-127, 128, (cout, cin // groups, k, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(cout, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(cout, generator=gen)
    return w, scale, bias


CONV_CASES = [
    # cin, cout, k, stride, padding, dilation, groups, h, w
    (3, 32, 7, 2, 3, 1, 1, 23, 19),
    (64, 128, 1, 2, 0, 1, 1, 9, 9),
    (16, 20, 3, 1, 1, 1, 4, 8, 11),
    (5, 17, 3, 2, 2, 2, 1, 13, 10),
    (115, 33, 3, 1, 1, 1, 1, 5, 6),  # 1035 taps: next to the bound
    (8, 8, 3, 1, 0, 1, 8, 6, 6),
]


@native
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_conv_is_the_integer_reference(isa, case, channels_last):
    from onebit.engine.kernels import int8 as K8

    cin, cout, k, stride, padding, dilation, groups, h, wd = case
    gen = torch.Generator().manual_seed(cin * 131 + cout)
    w, scale, bias = random_case(gen, cin, cout, k, groups)
    x = torch.randn(3, cin, h, wd, generator=gen) * 2
    s = float(torch.reciprocal(torch.tensor(2.5 / 127)))
    want = reference_conv(x, w, s, scale, bias, [stride] * 2, [padding] * 2, [dilation] * 2, groups)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = {
        "in_channels": cin,
        "out_channels": cout,
        "kernel_size": [k, k],
        "stride": [stride] * 2,
        "padding": [padding] * 2,
        "dilation": [dilation] * 2,
        "groups": groups,
        "divisor": s,
    }
    got = K8.int8_conv2d(x, w, scale, bias, a)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    forced = K8.int8_conv2d(x, w, scale, bias, a, out_channels_last=True)
    assert torch.equal(forced, want) and forced.is_contiguous(memory_format=torch.channels_last)
    torch_op = INT8_OPS["int8_conv2d"].fn({"weight": w, "scale": scale, "bias": bias}, a, x)
    assert torch.equal(torch_op, want)  # the float conv on integers is exact too


@native
def test_sums_exact_at_the_bound(isa):
    """1040 taps of 127 x 127 (and -127 x 127): |sum| = 16774160, the largest below 2^24."""
    from onebit.engine.kernels import int8 as K8

    cin, k = 65, 4  # 65 * 16 = 1040 taps
    w = torch.full((3, cin, k, k), 127, dtype=torch.int8)
    w[1] = -127
    w[2, :, :2] = -127
    x = torch.full((1, cin, k, k), 1000.0)  # clamps to 127
    a = {
        "in_channels": cin,
        "out_channels": 3,
        "kernel_size": [k, k],
        "stride": [1, 1],
        "padding": [0, 0],
        "dilation": [1, 1],
        "groups": 1,
        "divisor": 1.0,
    }
    got = K8.int8_conv2d(x, w, None, None, a).flatten()
    assert got.tolist() == [16774160.0, -16774160.0, 0.0]
    x = -x
    assert K8.int8_conv2d(x, w, None, None, a).flatten().tolist() == [-16774160.0, 16774160.0, 0.0]


def test_graph_refuses_taps_past_the_bound():
    from onebit.engine.graph.schema import GraphError, checked_attrs

    node = {
        "op": "int8_conv2d",
        "attrs": {
            "in_channels": 1041,
            "out_channels": 1,
            "kernel_size": [1, 1],
            "stride": [1, 1],
            "padding": [0, 0],
            "dilation": [1, 1],
            "groups": 1,
            "divisor": 1.0,
        },
    }
    with pytest.raises(GraphError, match="1041 taps"):
        checked_attrs(node, INT8_OPS["int8_conv2d"], "n")


def int8_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        QConv2d(3, 16, 3, stride=2, padding=1, input_quantizer="int8", weight_quantizer="int8_weight"),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        QConv2d(16, 24, 1, bias=True, input_quantizer="int8", weight_quantizer="int8_weight"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        QLinear(24, 10, input_quantizer="int8", weight_quantizer="int8_weight"),
    )
    model.train()
    model(torch.randn(8, 3, 17, 15))  # calibrates the int8 steps
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_equals_simulated(engine_backend, channels_last):
    model = int8_model(0)
    x = torch.randn(4, 3, 17, 15) * 1.5
    x[0, 0, 0, :3] = torch.tensor([1e9, -1e9, float("inf")])
    packed = engine.pack(model, x)
    ops_used = {n["op"] for n in packed.graph["nodes"]}
    assert {"int8_conv2d", "int8_linear"} <= ops_used
    if ops.native_available():  # the BatchNorm after the first conv runs in its epilogue
        assert "int8_conv2d+batch_norm" in {step.label for step in packed._steps}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        want = model.to(memory_format=fmt)(x)
        got = packed(x)
    assert torch.equal(got, want)


def test_nan_input_propagates_as_in_the_model():
    model = int8_model(1)
    x = torch.randn(2, 3, 17, 15)
    packed = engine.pack(model, x)
    x[1, 2, 5, 5] = float("nan")
    with torch.no_grad():
        want, got = model(x), packed(x)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[1].isnan().all())
    assert torch.equal(got[0], want[0])


@native
@pytest.mark.parametrize("channels_last", [False, True])
def test_custom_ops_are_the_reference_with_and_without_nans(channels_last):
    """``torch.ops.onebit.int8_conv2d`` / ``int8_linear`` (what traced programs call) equal the integer
    reference, in the layout the eager kernel writes, also where the input holds a NaN (the op then
    runs the float form itself, as the eager caller does)."""
    from onebit.engine import reference

    gen = torch.Generator().manual_seed(7)
    w, scale, bias = random_case(gen, 16, 24, 3, 2)
    x = torch.randn(2, 16, 9, 7, generator=gen)
    x[1, 3, 4, 4] = float("nan")
    s = 40.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = (torch.rand(24, generator=gen) + 0.5, torch.randn(24, generator=gen), True)
    for out_cl in (False, True):
        got = torch.ops.onebit.int8_conv2d(x, w, [2, 1], [1, 1], [1, 1], 2, s, scale, bias, *bn, out_cl)
        want = reference.int8_conv2d(x, w, s, scale, bias, [2, 1], [1, 1], [1, 1], 2, bn)
        assert torch.equal(got.isnan(), want.isnan()) and bool(got[1].isnan().any())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        wants_cl = out_cl or channels_last
        assert got.is_contiguous(memory_format=torch.channels_last if wants_cl else torch.contiguous_format)
        clean = x[:1].contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        integer = reference_conv(clean, w, s, scale, bias, [2, 1], [1, 1], [1, 1], 2)
        direct = torch.ops.onebit.int8_conv2d(
            clean, w, [2, 1], [1, 1], [1, 1], 2, s, scale, bias, None, None, False, out_cl
        )
        assert torch.equal(direct, integer)
    wl = torch.randint(-127, 128, (5, 16), generator=gen, dtype=torch.int8)
    rows = torch.randn(3, 4, 16, generator=gen)
    rows[2, 1, 0] = float("nan")
    got = torch.ops.onebit.int8_linear(rows, wl, s, None, scale[:5])
    want = reference.int8_linear(rows, wl, s, None, scale[:5])
    assert got.shape == (3, 4, 5) and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_packed_int8_model_exports_saves_loads_and_compiles(backend, tmp_path):
    if backend == "native" and not ops.native_available():
        pytest.skip("no native kernels")
    model = int8_model(3)
    x = torch.randn(2, 3, 17, 15)
    packed = engine.pack(model, x)
    with ops.use_backend(backend):
        program = torch.export.export(packed, (x,))
        if backend == "native":
            code = program.graph_module.code
            assert "torch.ops.onebit.int8_conv2d" in code and "torch.ops.onebit.int8_linear" in code
        loaded = saved_and_loaded(program, tmp_path / "int8.pt2")
        with torch.no_grad():
            want = model(x)
            assert torch.equal(loaded(x), want)
            x_nan = x.clone()
            x_nan[1, 0, 2, 2] = float("nan")
            got, want_nan = loaded(x_nan), model(x_nan)
            assert torch.equal(got.isnan(), want_nan.isnan()) and torch.equal(got[0], want_nan[0])
            compiled = torch.compile(packed, backend="eager", fullgraph=True)
            assert torch.equal(compiled(x), want)
    if backend == "native":  # a fresh process: importing onebit registers the int8 ops the program names
        result = gives_in_fresh_process(tmp_path / "int8.pt2", x, want)
        assert result.returncode == 0, result.stderr


def test_linear_on_three_dimensional_input():
    torch.manual_seed(3)
    model = QLinear(40, 7, bias=True, input_quantizer="int8", weight_quantizer="int8_weight").train()
    model(torch.randn(5, 6, 40))
    model.eval()
    x = torch.randn(2, 3, 40)
    packed = engine.pack(model, x)
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


@pytest.mark.parametrize(
    ("layer", "op"),
    [
        (lambda: nn.Sequential(QConv2d(3, 5, 3, padding=1, input_quantizer="int8"), nn.Flatten()), "int8_integers"),
        (lambda: QConv2d(3, 5, 3, padding=1, pad_value=1.0, input_quantizer="int8"), "int8_quantize"),
    ],
    ids=["float weights", "pad value"],
)
def test_int8_input_without_an_int8_kernel_runs_the_quantizer(layer, op):
    """An int8 input whose layer has float weights (the layer divides its sum by s) or a nonzero pad
    value (the conv reads x_int / s) keeps the quantizer as its own op."""
    torch.manual_seed(4)
    model = layer().train()
    model(torch.randn(4, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    packed = engine.pack(model, x)
    assert op in {n["op"] for n in packed.graph["nodes"]}
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def test_file_stores_int8_weights(tmp_path):
    model = int8_model(2)
    x = torch.randn(2, 3, 17, 15)
    packed = engine.pack(model, x)
    path = tmp_path / "int8.safetensors"
    packed.save(path)
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    weights = [v for k, v in header.items() if k != "__metadata__" and v["dtype"] == "I8"]
    assert sorted(tuple(v["shape"]) for v in weights) == [(10, 24), (16, 3, 3, 3), (24, 16, 1, 1)]
    loaded = engine.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_zoo_model_with_int8_layers_packs_exactly():
    model = onebit.models.create("birealnet_small_react_wide", float_layers="int8")
    model.train()
    model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    packed = engine.pack(model, x)
    assert not any(isinstance(m, quant.Int8) for m in packed.modules())
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def int8_chain(seed: int) -> nn.Module:
    """int8 layers without BatchNorm: every op of its ONNX form is exact, so onnxruntime agrees bit for bit."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        QConv2d(3, 16, 3, stride=2, padding=1, bias=True, input_quantizer="int8", weight_quantizer="int8_weight"),
        nn.ReLU(),
        QConv2d(16, 8, 1, input_quantizer="int8", weight_quantizer="int8_weight"),
        nn.Flatten(),
        QLinear(8 * 9 * 8, 10, bias=True, input_quantizer="int8", weight_quantizer="int8_weight"),
    )
    model.train()
    model(torch.randn(8, 3, 17, 15))
    return model.eval()


def test_onnx_export_is_bit_identical_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onebit.engine.to_onnx import load_onnx

    model = int8_chain(6)
    x = torch.randn(5, 3, 17, 15) * 2
    x[1, 0, 0, 0] = float("nan")
    path = tmp_path / "int8.onnx"
    onebit.export_onnx(model, x[:1], path)
    with torch.no_grad():
        want = engine.pack(model, x[:1])(x)
    got = load_onnx(path)(x)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[1].isnan().all())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])
    stored = onnx.load(path).graph.initializer
    int8_dims = sorted(tuple(t.dims) for t in stored if t.data_type == onnx.TensorProto.INT8)
    assert int8_dims == [(8, 16, 1, 1), (10, 576), (16, 3, 3, 3)]  # the weights as int8, no float copy
    floats = [math.prod(t.dims) for t in stored if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)]
    assert max(floats) <= 16  # per-channel scales and biases only


def test_onnx_export_of_the_zoo_model_agrees(tmp_path):
    """With BatchNorms (onnxruntime rounds them its own way) and float convs: equal up to float rounding."""
    pytest.importorskip("onnxruntime")
    from onebit.engine.to_onnx import load_onnx

    model = onebit.models.create("birealnet_small_react_wide", float_layers="int8").train()
    model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    path = tmp_path / "zoo.onnx"
    onebit.export_onnx(model, x[:1], path)
    with torch.no_grad():
        want = engine.pack(model, x[:1])(x)
    got = load_onnx(path)(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))
