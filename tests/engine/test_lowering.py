"""``lower``: an eval-mode model -> the packed engine's graph and tensors (``onebit.engine.lowering``).

On tiny models: the ops a binary chain becomes (with and without ``fold_batchnorm``), the integer
thresholds a BatchNorm + sign becomes against the model's own decisions, the fallbacks and their
reasons, unsupported modules named, and that lowering is deterministic and leaves the model alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import onebit.models
from onebit.engine import graph as G
from onebit.engine.lowering import UnsupportedModelError, lower
from onebit.nn import QActivation, QConv2d, QConv3d

SIGN = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}


def randomized(model: nn.Module, seed: int = 4) -> nn.Module:
    """BatchNorm statistics with positive, negative and zero scales and ties at integers; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * 4)
                m.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.1)
                m.weight.copy_(torch.randn(c, generator=g))
                m.weight[::4] = 0.0  # a constant channel: sign(beta)
                m.bias.copy_(torch.randn(c, generator=g))
                m.running_mean[1::4] = m.running_mean[1::4].round()  # ties: BN(acc) == 0 at an integer acc
                m.bias[1::4] = 0.0
    return model.eval()


def sign_chain(weights: str = "ste_sign") -> nn.Sequential:
    """sign -> binary conv -> BatchNorm -> sign -> binary conv (signs as QActivations, convs weight-only)."""
    torch.manual_seed(0)
    return randomized(
        nn.Sequential(
            QActivation("ste_sign"),
            QConv2d(3, 8, 3, padding=1, bias=False, weight_quantizer=weights),
            nn.BatchNorm2d(8),
            QActivation("ste_sign"),
            QConv2d(8, 4, 3, padding=1, bias=False, weight_quantizer=weights),
        )
    )


def run_nodes(graph: dict, tensors: dict, x: torch.Tensor):
    """The graph run node by node with each op's float semantics."""
    env = {graph["input"]["name"]: x}
    for node in graph["nodes"]:
        roles = {role: tensors[key] for role, key in node.get("tensors", {}).items()}
        env[node["name"]] = G.OPS[node["op"]].fn(roles, G.attrs(node), *[env[i] for i in node["inputs"]])
    return env[graph["outputs"][0]]


def ops_of(graph: dict) -> list[tuple[str, list[str], str | None]]:
    return [(node["op"], node["inputs"], node.get("module")) for node in graph["nodes"]]


# ---------------------------------------------------------------------------
# binary chains


@pytest.mark.parametrize("fold_batchnorm", [False, True])
@pytest.mark.parametrize("weights", ["ste_sign", "magnitude_aware_sign"])
def test_sign_binary_conv_batchnorm_sign_binary_conv_keeps_its_activations_packed(fold_batchnorm, weights):
    model, x = sign_chain(weights), torch.randn(2, 3, 6, 6)
    graph, tensors = lower(model, x, fold_batchnorm=fold_batchnorm)
    # the signs are packs; BatchNorm + sign are the first conv's integer thresholds, written as the
    # second conv's packed, padded input (whatever fold_batchnorm says: there is no float BatchNorm)
    assert ops_of(graph) == [
        ("pack", ["input"], None),
        ("binary_conv2d_threshold", ["input_packed"], "1"),
        ("binary_conv2d", ["_1"], "4"),
    ]
    assert graph["input"] == {
        "name": "input",
        "rank": 4,
        "channels": 3,
        "dtype": "float32",
        "example_shape": [2, 3, 6, 6],
    }
    assert graph["outputs"] == ["_4"] and graph["output_kind"] == "tensor" and graph["fallbacks"] == []
    threshold = graph["nodes"][1]["attrs"]
    assert (threshold["out_padding"], threshold["out_pad_value"], threshold["out_groups"]) == ([1, 1], 0.0, 1)
    G.validate(graph, tensors)
    assert set(tensors) == {key for node in graph["nodes"] for key in node["tensors"].values()}
    assert torch.equal(run_nodes(graph, tensors, x), model(x))


def test_the_thresholds_decide_as_the_model_does_for_every_reachable_accumulator():
    model = sign_chain()
    graph, tensors = lower(model, torch.randn(1, 3, 6, 6))
    node = graph["nodes"][1]
    thresholds, direction = (tensors[node["tensors"][role]] for role in ("thresholds", "direction"))
    reach = 3 * 3 * 3  # 27 taps of +-1 (zero-padded ones add 0): every integer in [-27, 27]
    acc = torch.arange(-reach, reach + 1, dtype=torch.float32)
    with torch.no_grad():  # sign weights: the conv's output is the accumulator itself, then the model's BN and sign
        model_sign = model[3](model[2](acc.view(1, 1, -1, 1).expand(1, 8, -1, 1)))[0, :, :, 0]
    thr = thresholds.view(8, 1).double()
    engine_sign = torch.where(torch.where(direction.view(8, 1) > 0, acc < thr, acc > thr), -1.0, 1.0)
    assert torch.equal(engine_sign, model_sign)
    assert set(direction.tolist()) == {-1, 1}  # both directions are exercised


def magnitude_aware_then_relu() -> nn.Sequential:
    """A magnitude-aware binary conv whose BatchNorm is followed by a ReLU (no thresholds)."""
    torch.manual_seed(1)
    binary = {"input_quantizer": "ste_sign", "weight_quantizer": "magnitude_aware_sign"}
    return randomized(
        nn.Sequential(
            QConv2d(3, 8, 3, padding=1, bias=False, **binary),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            QConv2d(8, 4, 3, padding=1, bias=False, **binary),
        )
    )


def test_fold_batchnorm_puts_the_batchnorm_into_the_binary_convs_scale_and_bias():
    model, x = magnitude_aware_then_relu(), torch.randn(2, 3, 6, 6)
    graph, tensors = lower(model, x)
    assert [node["op"] for node in graph["nodes"]] == [
        "pack",
        "binary_conv2d",
        "batch_norm",
        "relu",
        "pack",
        "binary_conv2d",
    ]
    assert torch.equal(run_nodes(graph, tensors, x), model(x))  # kept as the model's op: bit for bit
    folded, folded_tensors = lower(model, x, fold_batchnorm=True)
    assert [node["op"] for node in folded["nodes"]] == ["pack", "binary_conv2d", "relu", "pack", "binary_conv2d"]
    conv = folded["nodes"][1]["tensors"]
    alpha = tensors[graph["nodes"][1]["tensors"]["scale"]].double()
    bn = model[1]
    g = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    assert torch.allclose(folded_tensors[conv["scale"]].double(), alpha * g, rtol=1e-6, atol=0)
    expected_bias = bn.bias.detach().double() - bn.running_mean.double() * g
    assert torch.allclose(folded_tensors[conv["bias"]].double(), expected_bias, rtol=1e-6, atol=1e-6)
    assert torch.allclose(run_nodes(folded, folded_tensors, x), model(x), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# fallbacks and unsupported models


FALLBACKS = {
    "float input": (
        nn.Sequential(nn.Conv2d(3, 8, 3), QConv2d(8, 4, 3, weight_quantizer="ste_sign")),
        ["conv2d", "qconv2d"],
        "its input is float (input_quantizer=None on a value that is not the output of a sign)",
    ),
    "reflect padding": (
        nn.Sequential(nn.Conv2d(3, 8, 3), QConv2d(8, 4, 3, padding=1, padding_mode="reflect", **SIGN)),
        ["conv2d", "sign", "qconv2d"],
        "padding_mode='reflect' (the packed kernels pad with a constant)",
    ),
    "float weights": (
        nn.Sequential(nn.Conv2d(3, 8, 3), QConv2d(8, 4, 3, input_quantizer="ste_sign")),
        ["conv2d", "sign", "qconv2d"],
        "its weights are float (weight_quantizer=None)",
    ),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_a_binary_layer_that_runs_in_float_is_listed_with_its_reason(case):
    model, ops, reason = FALLBACKS[case]
    model, x = model.eval(), torch.randn(2, 3, 7, 7)
    graph, tensors = lower(model, x)
    assert [node["op"] for node in graph["nodes"]] == ops
    assert graph["fallbacks"] == [{"module": "1", "reason": reason}]
    layer = graph["nodes"][-1]
    weight = model[1].weight.detach()
    if model[1].weight_quantizer is None:
        assert set(layer["tensors"]) == {"weight", "bias"} and torch.equal(tensors[layer["tensors"]["weight"]], weight)
    else:  # +-1 weights are kept as bits (bit c of a word set: channel c is -1)
        assert set(layer["tensors"]) == {"weight_bits", "bias"}
        words = tensors[layer["tensors"]["weight_bits"]]  # [C_out, KH, KW, 1]: 8 input channels, one word
        bits = (words >> torch.arange(8)) & 1
        assert torch.equal(bits.permute(0, 3, 1, 2), (weight < 0).long())
    assert torch.equal(run_nodes(graph, tensors, x), model(x))


def test_every_fallback_is_listed_in_the_models_order_and_float_layers_are_not():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        QConv2d(8, 8, 3, padding=1, padding_mode="circular", **SIGN),
        QConv2d(8, 4, 3, weight_quantizer="ste_sign"),
        QConv2d(4, 4, 1, **SIGN),
    ).eval()
    graph, _ = lower(model, torch.randn(1, 3, 9, 9))
    assert [f["module"] for f in graph["fallbacks"]] == ["1", "2"]
    assert [node["op"] for node in graph["nodes"]][-2:] == ["pack", "binary_conv2d"]  # the last one packs


class Sine(nn.Module):
    def forward(self, x):
        return torch.sin(x)


@pytest.mark.parametrize(
    "model,message",
    [
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.GELU())),
            r"^the packed engine does not support module '1\.1' \(GELU\)$",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), Sine()),
            r"^the packed engine does not support node 'sin' \(call_function sin\)",
        ),
        (
            nn.Sequential(nn.Identity(), QConv3d(3, 4, 1, **SIGN)),
            r"^the packed engine does not support module '1' \(QConv3d\): only 1-d and 2-d convolutions",
        ),
    ],
)
def test_an_unsupported_module_or_function_is_named(model, message):
    x = torch.randn(1, 3, 5, 5, 5) if isinstance(model[1], QConv3d) else torch.randn(1, 3, 6, 6)
    with pytest.raises(UnsupportedModelError, match=message) as caught:
        lower(model.eval(), x)
    assert isinstance(caught.value, ValueError)


# ---------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("name", ["sign_chain", "magnitude_aware_then_relu", "lenet_binary"])
def test_lowering_twice_gives_identical_graphs_and_tensors_and_leaves_the_model_alone(name):
    if name == "lenet_binary":
        model = randomized(onebit.models.create("lenet_binary", num_classes=10, in_channels=1))
        x = torch.randn(2, 1, 8, 8)
    else:
        model = {"sign_chain": sign_chain, "magnitude_aware_then_relu": magnitude_aware_then_relu}[name]()
        x = torch.randn(2, 3, 6, 6)
    state = {key: t.clone() for key, t in model.state_dict().items()}
    first, first_tensors = lower(model, x)
    second, second_tensors = lower(model, x)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True) and first == second
    assert list(first_tensors) == list(second_tensors)
    for key, t in first_tensors.items():
        assert t.dtype == second_tensors[key].dtype and torch.equal(t, second_tensors[key])
        assert t.data_ptr() != second_tensors[key].data_ptr() or t.numel() == 0  # copies, not shared state
    assert all(torch.equal(t, state[key]) for key, t in model.state_dict().items()) and not model.training
