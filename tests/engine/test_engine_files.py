"""Packed model files: round trip, size, and clear errors for every kind of bad file."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import onebit.models
from onebit import engine, io
from onebit.nn import QConv2d, QLinear

SIGN = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * 4)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def binary_cnn() -> nn.Module:
    """Mostly binary convs: float stem and classifier, binary 3x3 convs in between."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)]
    widths = [64, 128, 128, 256, 256, 256]
    for cin, cout in zip(widths, widths[1:] + [256]):
        layers += [QConv2d(cin, cout, 3, padding=1, bias=False, **SIGN), nn.BatchNorm2d(cout)]
        if cout != cin:
            layers[-1:-1] = [nn.MaxPool2d(2)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)]
    return _randomize(nn.Sequential(*layers))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = binary_cnn()
    x = torch.randn(2, 3, 16, 16)
    packed = engine.pack(model, x)
    path = tmp_path_factory.mktemp("packed") / "model.safetensors"
    packed.save(path)
    return model, packed, x, path


def test_save_load_gives_identical_outputs(saved):
    model, packed, x, path = saved
    loaded = engine.load(path)
    assert isinstance(loaded, engine.PackedModel)
    assert loaded.graph == packed.graph
    y = loaded(x)
    assert torch.equal(y, packed(x))
    assert torch.allclose(y, model(x), atol=1e-4, rtol=0)


def test_round_trip_of_zoo_model_with_linear_and_thresholds(tmp_path):
    model = _randomize(onebit.models.create("lenet_binary", num_classes=10, in_channels=1), 3)
    x = torch.randn(8, 1, 8, 8)
    packed = engine.pack(model, x)
    packed.save(tmp_path / "lenet.safetensors")
    loaded = engine.load(tmp_path / "lenet.safetensors")
    assert torch.equal(loaded(x), packed(x))
    assert torch.equal(loaded(x).argmax(1), model(x).argmax(1))


def test_mostly_binary_model_is_over_20x_smaller_than_its_float_state_dict(saved, tmp_path):
    model, _, _, path = saved
    io.save_tensors(tmp_path / "float.safetensors", model.state_dict())
    ratio = os.path.getsize(tmp_path / "float.safetensors") / os.path.getsize(path)
    assert ratio >= 20, ratio


def test_file_is_plain_safetensors_with_the_graph_in_metadata(saved):
    _, packed, _, path = saved
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header["__metadata__"]
    assert meta["format"] == "onebit.packed" and meta["format_version"] == "1"
    assert json.loads(meta["graph"]) == json.loads(json.dumps(packed.graph))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert "U8" in dtypes and "I32" in dtypes  # compact binary weights, thresholds


def test_save_is_atomic_and_overwrites(saved, tmp_path):
    _, packed, x, _ = saved
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    packed.save(path)
    assert torch.equal(engine.load(path)(x), packed(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---------------------------------------------------------------------------
# corrupt files, loaded in a subprocess so that a crash fails the test


def _rewrite(src, dst, *, graph=None, tensors=None, meta=None):
    t = load_file(src)
    with open(src, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        m = json.loads(f.read(n))["__metadata__"]
    g = json.loads(m["graph"])
    if graph:
        graph(g)
    if tensors:
        tensors(t)
    m["graph"] = json.dumps(g)
    if meta:
        meta(m)
    save_file(t, dst, metadata=m)


def _first(g, op):
    return next(n for n in g["nodes"] if n["op"] == op)


def corrupt_files(good: str, d: str) -> dict[str, str]:
    data = open(good, "rb").read()
    files: dict[str, bytes | None] = {
        "empty": b"",
        "seven_bytes": data[:7],
        "truncated_header": data[:100],
        "truncated_data": data[: len(data) // 2],
        "one_byte_short": data[:-1],
        "trailing_garbage": data + b"xx",
        "random_bytes": os.urandom(4096),
        "huge_header_size": struct.pack("<Q", 1 << 62) + data[8:],
        "header_not_json": struct.pack("<Q", 16) + b"{not json at all" + data[24:],
        "header_is_list": struct.pack("<Q", 2) + b"[]",
        "pickle": pickle.dumps({"weight": [1.0, 2.0]}),
        "torch_save": None,
        "plain_safetensors": None,
    }
    paths = {}
    for name, content in files.items():
        path = os.path.join(d, name)
        if content is not None:
            open(path, "wb").write(content)
        paths[name] = path
    torch.save({"w": torch.ones(3)}, paths["torch_save"])
    save_file({"w": torch.ones(3)}, paths["plain_safetensors"])

    def variant(name, **kw):
        paths[name] = os.path.join(d, name)
        _rewrite(good, paths[name], **kw)

    def set_op(g, op):
        g["nodes"][1]["op"] = op

    variant("unknown_op", graph=lambda g: set_op(g, "system"))
    variant("dangling_input", graph=lambda g: g["nodes"][2]["inputs"].__setitem__(0, "nowhere"))
    variant(
        "dangling_tensor",
        graph=lambda g: _first(g, "binary_conv2d_threshold")["tensors"].__setitem__("weight", "missing"),
    )
    variant("dangling_output", graph=lambda g: g.__setitem__("outputs", ["nope"]))
    variant("cycle", graph=lambda g: g["nodes"][0]["inputs"].__setitem__(0, g["nodes"][-1]["name"]))
    variant(
        "bad_attr_type", graph=lambda g: _first(g, "binary_conv2d_threshold")["attrs"].__setitem__("kernel_size", "3")
    )
    variant(
        "negative_channels",
        graph=lambda g: _first(g, "binary_conv2d_threshold")["attrs"].__setitem__("out_channels", -5),
    )
    variant(
        "huge_channels",
        graph=lambda g: _first(g, "binary_conv2d_threshold")["attrs"].__setitem__("in_channels", 1 << 40),
    )
    variant(
        "packed_into_float_op",
        graph=lambda g: [n for n in g["nodes"] if n["op"] == "batch_norm"][-1]["inputs"].__setitem__(
            0, _first(g, "pack")["name"]
        ),
    )
    variant("float_weight_stem_shape", tensors=lambda t: t.__setitem__("_0__weight", torch.ones(64, 3, 3)))
    variant("graph_not_json", meta=lambda m: m.__setitem__("graph", "{nope"))
    variant("graph_missing", meta=lambda m: m.pop("graph"))
    variant("graph_is_number", meta=lambda m: m.__setitem__("graph", "3"))
    variant("wrong_version", meta=lambda m: m.__setitem__("format_version", "99"))
    variant("wrong_format", meta=lambda m: m.__setitem__("format", "other"))

    def retype(t, key_part, dtype):
        key = next(k for k in t if key_part in k and t[k].dtype != dtype)
        t[key] = t[key].to(dtype)

    def reshape(t, key_part):
        key = next(k for k in t if key_part in k and t[k].dtype != torch.float32)
        t[key] = t[key].flatten()[:-1].clone()

    variant("weight_dtype", tensors=lambda t: retype(t, "__weight", torch.float32))
    variant("threshold_dtype", tensors=lambda t: retype(t, "__thresholds", torch.int64))
    variant("float_param_as_f16", tensors=lambda t: retype(t, "running_var", torch.float16))
    variant("weight_shape", tensors=lambda t: reshape(t, "__weight"))
    variant("threshold_shape", tensors=lambda t: reshape(t, "__thresholds"))
    variant("extra_tensor", tensors=lambda t: t.__setitem__("intruder", torch.ones(2)))

    def zero_direction(t):
        key = next(k for k in t if k.endswith("__direction"))
        t[key] = torch.zeros_like(t[key])

    variant("direction_zero", tensors=zero_direction)

    def append_node(g, op, attrs, inputs=None):
        last = g["outputs"][0]
        g["nodes"].append({"name": "tampered", "op": op, "inputs": inputs or [last], "attrs": attrs})
        g["outputs"] = ["tampered"]

    def set_bn_eps(g, eps):
        [n for n in g["nodes"] if n["op"] == "batch_norm"][-1]["attrs"]["eps"] = eps

    pool = {"kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "ceil_mode": False}
    variant("softmax_dim_7", graph=lambda g: append_node(g, "softmax", {"dim": 7}))
    variant("flatten_dim_out_of_range", graph=lambda g: append_node(g, "flatten", {"start_dim": 3, "end_dim": -1}))
    variant("pool_of_a_2d_value", graph=lambda g: append_node(g, "max_pool2d", pool))
    variant(
        "pool_padding_over_half",
        graph=lambda g: append_node(g, "max_pool2d", {**pool, "padding": [2, 2]}, [_first(g, "conv2d")["name"]]),
    )
    variant("negative_eps", graph=lambda g: set_bn_eps(g, -1.0))
    variant("rank_1_input", graph=lambda g: g["input"].__setitem__("rank", 1))
    variant("output_is_the_input", graph=lambda g: g.__setitem__("outputs", [g["input"]["name"]]))
    variant("hardtanh_min_over_max", graph=lambda g: append_node(g, "hardtanh", {"min_val": 1.0, "max_val": -1.0}))
    variant("reshape_two_unknowns", graph=lambda g: append_node(g, "reshape", {"shape": [-1, -1]}))
    variant(
        "graph_with_5000_digits",
        meta=lambda m: m.__setitem__("graph", m["graph"].replace('"eps":', '"eps":' + "9" * 5000 + ',"x":', 1)),
    )
    raw = open(good, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    big = raw[8 : 8 + n].replace(b'"format_version":"1"', b'"format_version":"1","n":' + b"7" * 5000, 1)
    files2 = {
        "header_with_5000_digits": struct.pack("<Q", len(big)) + big + raw[8 + n :],
        "longer_than_it_claims": raw + b"\0" * 4096,
        "tensor_offsets_overlap": None,
    }
    h = json.loads(raw[8 : 8 + n])
    keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[keys[1]]["data_offsets"] = list(h[keys[0]]["data_offsets"])  # two tensors on the same bytes
    h[keys[1]]["shape"], h[keys[1]]["dtype"] = h[keys[0]]["shape"], h[keys[0]]["dtype"]
    forged = json.dumps(h).encode()
    files2["tensor_offsets_overlap"] = struct.pack("<Q", len(forged)) + forged + raw[8 + n :]
    for name, content in files2.items():
        paths[name] = os.path.join(d, name)
        open(paths[name], "wb").write(content)
    paths["a_directory"] = d
    if os.path.exists("/dev/zero"):
        paths["dev_zero"] = "/dev/zero"
    fifo = os.path.join(d, "a_pipe")
    os.mkfifo(fifo)
    paths["a_pipe"] = fifo
    return paths


_LOADER = r"""
import json, sys
import onebit.engine as E
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        E.load(path)
        out[name] = "loaded"
    except E.FormatError as e:
        out[name] = "FormatError: " + str(e)
    except Exception as e:
        out[name] = "OTHER " + type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def test_every_corrupt_file_raises_a_clear_format_error(saved, tmp_path):
    _, _, _, good = saved
    paths = corrupt_files(str(good), str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(paths)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(paths)
    bad = {k: v for k, v in results.items() if not v.startswith("FormatError: ")}
    assert not bad, bad
    for name, message in results.items():
        assert "not a valid onebit packed model file" in message, (name, message)
    assert "pickle" in results["pickle"]
    assert "empty" in results["empty"]
    for name in (
        "softmax_dim_7",
        "flatten_dim_out_of_range",
        "pool_of_a_2d_value",
        "pool_padding_over_half",
        "hardtanh_min_over_max",
        "reshape_two_unknowns",
    ):
        assert "'tampered'" in results[name], (name, results[name])  # the node is named
    assert "out of range" in results["softmax_dim_7"] and "rank-4" in results["pool_of_a_2d_value"]
    assert "non-negative" in results["negative_eps"] and "graph input" in results["rank_1_input"]
    assert "input itself" in results["output_is_the_input"]
    assert "longer than it claims" in results["longer_than_it_claims"]
    for name in ("a_directory", "dev_zero", "a_pipe"):
        assert name not in results or "not a regular file" in results[name], results[name]


def test_format_error_is_a_value_error():
    assert issubclass(engine.FormatError, ValueError)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        engine.load(tmp_path / "nope.safetensors")


def test_binary_linear_weights_round_trip(tmp_path):
    model = nn.Sequential(QLinear(130, 70, **SIGN), nn.BatchNorm1d(70), QLinear(70, 3, bias=False, **SIGN))
    model = _randomize(model, 5)
    x = torch.randn(6, 130)
    packed = engine.pack(model, x)
    packed.save(tmp_path / "mlp.safetensors")
    loaded = engine.load(tmp_path / "mlp.safetensors")
    assert torch.equal(loaded(x), packed(x))
    assert torch.equal(loaded(x), model(x))


_MEMORY_PROBE = r"""
import resource, sys
import onebit.engine as E
try:
    E.load(sys.argv[1])
    print("loaded")
except E.FormatError as e:
    print("FormatError:", e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_huge_file_is_refused_from_its_header_without_reading_it(saved, tmp_path):
    _, _, _, good = saved
    path = tmp_path / "huge.safetensors"
    path.write_bytes(open(good, "rb").read())
    with open(path, "r+b") as f:
        f.truncate(3 << 30)  # 3 GB, sparse: takes no disk
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message, peak_mb = proc.stdout.strip().splitlines()
    assert message.startswith("FormatError:") and "longer than it claims" in message
    assert int(peak_mb) < 1024  # far below the file's 3 GB


def test_a_graph_whose_nodes_compute_nothing_returned_is_refused():
    from onebit.engine.graph import GraphError, validate

    relu = {"name": "y", "op": "relu", "inputs": ["x"]}
    graph = {"input": {"name": "x", "rank": 2, "channels": 3, "dtype": "float32"}, "nodes": [relu], "outputs": ["x"]}
    with pytest.raises(GraphError, match="input itself"):
        validate(graph, {})
    validate(dict(graph, outputs=["y"]), {})
    validate(dict(graph, nodes=[]), {})  # an identity model: no nodes, its input is its output


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])  # packed kernels; float fallback from bits
def test_a_packed_weight_written_behind_the_version_counter_is_seen(padding_mode):
    import copy
    import warnings

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), QConv2d(8, 16, 3, padding=1, padding_mode=padding_mode, **SIGN)
    )
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = engine.pack(model.eval(), x)
    before = packed(x)
    bits = next(t for k, t in packed.named_graph_tensors().items() if t.dtype == torch.int64)
    version = bits._version
    bits.data.bitwise_not_()  # every sign flipped; .data has its own version counter
    bits.data &= ~torch.tensor(-1 << 8, dtype=torch.int64)  # the 8 channels' bits only
    assert bits._version == version
    after = packed(x)
    fresh = copy.deepcopy(packed)  # steps and caches built anew from the same tensors
    assert torch.equal(after, fresh(x))
    assert not torch.equal(after, before)
