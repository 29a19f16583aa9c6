"""``PackedModel``'s contract (``onebit.engine.packed``): the inputs it refuses and how, its profile,
its file round trip, copies and pickles with steps of their own, ``.to()`` rebuilding the steps, and
calls from two threads at once."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import numpy as np
import pytest
import torch
from torch import nn

from onebit import engine
from onebit.engine import graph as G
from onebit.engine.packed import InputError, PackedModel
from onebit.engine.torch_rounding import batchnorm_rounding
from onebit.nn import QConv1d, QConv2d

SIGN = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}


class Block(nn.Module):
    """A Bi-Real block: ``bn(binary_conv(x)) + x``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = QConv2d(channels, channels, 3, padding=1, bias=False, **SIGN)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


def small_model() -> nn.Module:
    """Float stem, two binary blocks, float head: ``[N, 3, 6, 6] -> [N, 5]``."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    )
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(8, generator=g) * 3)
                m.running_var.copy_(torch.rand(8, generator=g) * 4 + 0.1)
                m.weight.copy_(torch.randn(8, generator=g))
                m.bias.copy_(torch.randn(8, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def packed_and_model():
    model = small_model()
    return engine.pack(model, torch.randn(2, 3, 6, 6)), model


def step_tensors_are_the_buffers(packed: PackedModel) -> bool:
    """Every tensor a step reads is one of the model's buffers now (not a copy, not a former one)."""
    buffers = {id(t) for t in packed.named_graph_tensors().values()}
    return all(id(t) in buffers for step in packed._steps for t in step.tensors.values())


# ---------------------------------------------------------------------------
# inputs


@pytest.mark.parametrize(
    "bad,message",
    [
        ([[1.0]], "^PackedModel: expected a torch.Tensor input, got list$"),
        (np.zeros((1, 3, 6, 6), np.float32), "^PackedModel: expected a torch.Tensor input, got ndarray$"),
        (torch.zeros(1, 3, 6, 6, dtype=torch.float64), "^PackedModel: expected a float32 input, got torch.float64$"),
        (torch.zeros(1, 3, 6, 6, dtype=torch.float16), "^PackedModel: expected a float32 input, got torch.float16$"),
        (torch.zeros(1, 3, 6, 6, dtype=torch.int64), "^PackedModel: expected a float32 input, got torch.int64$"),
        (
            torch.zeros(1, 3, 6, 6, device="meta"),
            "^PackedModel: the packed engine runs on the CPU, got an input on meta$",
        ),
        (
            torch.zeros(3, 6, 6),
            r"^PackedModel: expected input of shape \[N, C, H, W\] with C = 3 channels, got shape \[3, 6, 6\]$",
        ),
        (
            torch.zeros(1, 3, 6, 6, 1),
            r"^PackedModel: expected input of shape \[N, C, H, W\] with C = 3 channels, got shape \[1, 3, 6, 6, 1\]$",
        ),
        (
            torch.zeros(1, 4, 6, 6),
            r"^PackedModel: expected input of shape \[N, C, H, W\] with C = 3 channels, got shape \[1, 4, 6, 6\]$",
        ),
    ],
)
def test_an_input_it_cannot_take_is_refused_before_any_step_runs(packed_and_model, monkeypatch, bad, message):
    packed, _ = packed_and_model
    ran = []
    monkeypatch.setattr(PackedModel, "_run", lambda *args: ran.append(args))
    for call in (packed, lambda x: packed.profile(x, repeat=1)):
        with pytest.raises(InputError, match=message) as caught:
            call(bad)
        assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)
    assert ran == []


def test_the_expected_shape_is_named_by_the_models_input_rank():
    conv1d = engine.pack(nn.Sequential(QConv1d(3, 4, 3, **SIGN)).eval(), torch.randn(2, 3, 7))
    with pytest.raises(InputError, match=r"shape \[N, C, L\] with C = 3 channels, got shape \[2, 3, 7, 1\]$"):
        conv1d(torch.randn(2, 3, 7, 1))
    linear = engine.pack(nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8))
    with pytest.raises(InputError, match=r"shape \[N, F\] with F = 8 features, got shape \[2, 3, 8\]$"):
        linear(torch.randn(2, 3, 8))


def test_features_last_inputs_take_any_sizes_but_the_batch_rank_and_features():
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    packed = engine.pack(model, torch.randn(2, 5, 8))  # read only by linear layers: [N, L, F]
    assert packed.graph["input"]["channel_dim"] == -1 and packed.input_channels == 8
    for x in (torch.randn(3, 7, 8), torch.randn(1, 1, 8), torch.randn(0, 4, 8)):
        assert torch.equal(packed(x), model(x))
    for bad in (torch.randn(3, 7, 9), torch.randn(3, 8), torch.randn(1, 2, 3, 8)):
        with pytest.raises(InputError, match=r"expected input of shape \[N, L1, F\] with F = 8 features, got shape"):
            packed(bad)
    deeper = engine.pack(model, torch.randn(2, 3, 5, 8))
    with pytest.raises(InputError, match=r"\[N, L1, L2, F\] with F = 8 features, got shape \[2, 3, 8\]$"):
        deeper(torch.randn(2, 3, 8))


def test_an_input_a_step_cannot_take_names_the_layer_and_its_step():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), QConv2d(4, 4, 3, **SIGN), nn.Flatten(), nn.Linear(4, 2)).eval()
    packed = engine.pack(model, torch.randn(2, 3, 3, 3))
    with pytest.raises(InputError, match=r"^PackedModel: layer '1' \(op pack\+binary_conv2d\) cannot take the input "):
        packed(torch.randn(1, 3, 2, 2))  # too small for the 3 x 3 kernel
    with pytest.raises(InputError, match=r"^PackedModel: layer '3' \(op linear\) cannot take the input of shape "):
        packed(torch.randn(1, 3, 4, 4))  # 16 features where 4 are read


def test_the_constructor_validates_and_keeps_its_own_copy_of_the_graph(packed_and_model):
    packed, _ = packed_and_model
    graph, tensors = copy.deepcopy(packed.graph), packed.named_graph_tensors()
    with pytest.raises(G.GraphError, match="tensors not used by the graph"):
        PackedModel(graph, dict(tensors, extra=torch.zeros(1)))
    own = PackedModel(graph, tensors)
    graph["nodes"].clear()
    assert own.graph == packed.graph
    assert own.fallbacks == [] and own.fallbacks is not own.graph["fallbacks"]


# ---------------------------------------------------------------------------
# profile


def test_profile_has_one_row_per_step_whose_shares_sum_to_one_and_prints_as_a_table(packed_and_model):
    packed, model = packed_and_model
    x = torch.randn(2, 3, 6, 6)
    rows = packed.profile(x, repeat=3)
    steps = packed._steps
    assert [(r["name"], r["op"], r["module"]) for r in rows] == [(s.output, s.label, s.module) for s in steps]
    if engine.ops.native_available() and batchnorm_rounding() is not None:  # each block is one fused step
        assert [r["op"] for r in rows].count("pack+binary_conv2d+batch_norm+add") == 2
    assert all(r["ms"] >= 0 for r in rows) and abs(sum(r["share"] for r in rows) - 1.0) < 1e-9
    total = sum(r["ms"] for r in rows)
    assert all(abs(r["share"] - r["ms"] / total) < 1e-12 for r in rows)
    lines = str(rows).splitlines()
    assert lines[0] == f"packed model profile: {len(steps)} steps, {total:.3f} ms"
    for r in rows:  # one line per step: its value, label, module, time and share
        assert sum(line.split()[:2] == [r["name"], r["op"]] for line in lines) == 1
    assert lines[-1].split() == ["total", f"{total:.3f}", "100.0%"]
    assert repr(rows).startswith("Profile([{") and isinstance(rows, list)
    assert torch.equal(packed(x), model(x))  # timing changes nothing


# ---------------------------------------------------------------------------
# files, copies, pickles, .to()


def test_save_and_load_give_the_same_graph_tensors_steps_and_outputs(packed_and_model, tmp_path):
    packed, model = packed_and_model
    path = tmp_path / "model.safetensors"
    packed.save(path)
    loaded = engine.load(path)
    assert loaded.graph == packed.graph
    tensors = packed.named_graph_tensors()
    assert all(torch.equal(t, tensors[key]) for key, t in loaded.named_graph_tensors().items())
    assert [s.label for s in loaded._steps] == [s.label for s in packed._steps]
    for x in (torch.randn(3, 3, 6, 6), torch.randn(2, 3, 9, 5).contiguous(memory_format=torch.channels_last)):
        assert torch.equal(loaded(x), model(x)) and torch.equal(packed(x), model(x))


def test_a_loaded_models_tensors_are_aligned_as_torch_allocates_them(packed_and_model, tmp_path):
    packed, _ = packed_and_model
    path = tmp_path / "model.safetensors"
    packed.save(path)
    assert all(t.data_ptr() % 64 == 0 for t in packed.named_graph_tensors().values())
    loaded = engine.load(path)
    misaligned = [key for key, t in loaded.named_graph_tensors().items() if t.data_ptr() % 64]
    assert misaligned == []
    # torch's float kernels round by alignment: the loaded model equals the saved one bit for bit
    x = torch.randn(1, 3, 9, 5, generator=torch.Generator().manual_seed(3)).contiguous(
        memory_format=torch.channels_last
    )
    assert torch.equal(loaded(x), packed(x))


def _copy(packed: PackedModel, how: str) -> PackedModel:
    if how == "deepcopy":
        return copy.deepcopy(packed)
    if how == "pickle":
        return pickle.loads(pickle.dumps(packed))
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_and_pickles_have_steps_of_their_own_and_equal_outputs(packed_and_model, how):
    packed, model = packed_and_model
    x = torch.randn(2, 3, 6, 6)
    expected = packed(x)  # its native weight caches are filled
    clone = _copy(packed, how)
    assert clone._steps is not packed._steps
    assert [s.label for s in clone._steps] == [s.label for s in packed._steps]
    for mine, theirs in zip(clone._steps, packed._steps):
        assert mine is not theirs and (mine.cache is None or mine.cache is not theirs.cache)
    assert step_tensors_are_the_buffers(clone)
    assert torch.equal(clone(x), expected)
    # the copy's weights are its own: writing them changes the copy, not the original
    conv = next(n for n in clone.graph["nodes"] if n["op"] == "binary_conv2d")
    clone.named_graph_tensors()[conv["tensors"]["weight"]].bitwise_not_()
    assert not torch.equal(clone(x), expected) and torch.equal(packed(x), model(x))


def test_to_and_cpu_rebuild_the_steps_on_the_models_tensors(packed_and_model):
    packed, model = packed_and_model
    packed = copy.deepcopy(packed)
    x = torch.randn(2, 3, 6, 6)
    for move in (lambda m: m.to(torch.float32), lambda m: m.cpu(), lambda m: m.float()):
        before = list(packed._steps)
        assert move(packed) is packed
        assert all(new is not old for new, old in zip(packed._steps, before))
        assert step_tensors_are_the_buffers(packed)
        assert torch.equal(packed(x), model(x))
    # a move that makes new tensors (as .to() does when it converts): the steps read the new ones
    packed._apply(lambda t: t.clone())
    assert step_tensors_are_the_buffers(packed)
    conv = next(n for n in packed.graph["nodes"] if n["op"] == "binary_conv2d")
    packed.named_graph_tensors()[conv["tensors"]["weight"]].bitwise_not_()
    assert not torch.equal(packed(x), model(x))


# ---------------------------------------------------------------------------
# threads


def test_two_threads_calling_at_once_get_what_serial_calls_get(packed_and_model):
    packed, _ = packed_and_model
    inputs = [[torch.randn(1 + (i + k) % 3, 3, 6, 6) for i in range(8)] for k in range(2)]
    expected = [[packed(x) for x in xs] for xs in inputs]
    results: list[list] = [[], []]
    start = threading.Barrier(2)
    errors = []

    def calls(k: int) -> None:
        try:
            for x in inputs[k]:
                start.wait()  # each call begins with the other thread's
                results[k].append(packed(x))
        except Exception as error:  # reported below, with the thread
            errors.append((k, error))
            start.abort()

    threads = [threading.Thread(target=calls, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for k in range(2):
        assert all(torch.equal(a, b) for a, b in zip(results[k], expected[k], strict=True))
