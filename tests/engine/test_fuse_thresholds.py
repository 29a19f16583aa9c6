"""The graph fusions of ``onebit.engine.fuse``: pure passes ``(graph, tensors) -> (graph, tensors)``.

On the lowering's plain graphs (``lower_computation``: each layer its own nodes) and on hand-edited
copies of them: a BatchNorm or a canonized ``sign_threshold`` whose only reader is one pack read
by binary layers becomes the layer's integer thresholds (with a max pool between: pooled bits;
after a binary linear layer: ``binary_linear_threshold``), and ``fold_batchnorm`` folds a BatchNorm
into a magnitude-aware conv's scale and bias; each chain that breaks a condition is left as it is,
and the graph and tensors passed in are never changed.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from onebit.engine import graph as G
from onebit.engine.fuse.batchnorm import fold_batchnorm, folded_scale_bias
from onebit.engine.fuse.passes import fuse_graph
from onebit.engine.fuse.thresholds import fuse_thresholds
from onebit.engine.lowering import lower, lower_computation
from onebit.nn import QActivation, QConv2d, QLinear
from onebit.thresholds import accumulator_bound, batchnorm_sign_thresholds

SIGN = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}
MAGNITUDE = {"input_quantizer": "ste_sign", "weight_quantizer": "magnitude_aware_sign"}


def randomized(model: nn.Module, seed: int = 3) -> nn.Module:
    """BatchNorm statistics with scales of both signs and constant channels; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * 4)
                m.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.1)
                m.weight.copy_(torch.randn(c, generator=g))
                m.weight[::4] = 0.0
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def conv_chain(first: dict = SIGN, pool: bool = False, bias: bool = False) -> nn.Sequential:
    """binary conv -> [max pool] -> BatchNorm -> binary conv."""
    torch.manual_seed(0)
    layers = [QConv2d(3, 16, 3, padding=1, bias=bias, **first)]
    layers += [nn.MaxPool2d(3, 2, padding=1)] if pool else []
    layers += [nn.BatchNorm2d(16), QConv2d(16, 8, 3, padding=1, pad_value=-1.0, groups=2, **SIGN)]
    return randomized(nn.Sequential(*layers))


def linear_chain(first: dict = SIGN) -> nn.Sequential:
    torch.manual_seed(0)
    return randomized(nn.Sequential(QLinear(20, 32, **first), nn.BatchNorm1d(32), QLinear(32, 10, **SIGN)))


def ops_of(graph: dict) -> list[str]:
    return [node["op"] for node in graph["nodes"]]


def node(graph: dict, op: str) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == op)


def run_nodes(graph: dict, tensors: dict, x: torch.Tensor) -> torch.Tensor:
    """The graph run node by node with each op's reference semantics."""
    env = {graph["input"]["name"]: x}
    for n in graph["nodes"]:
        roles = {role: tensors[key] for role, key in n.get("tensors", {}).items()}
        env[n["name"]] = G.OPS[n["op"]].fn(roles, G.attrs(n), *[env[i] for i in n["inputs"]])
    return env[graph["outputs"][0]]


def unchanged_by(fusion, graph: dict, tensors: dict):
    """``fusion(graph, tensors)``, checking that it leaves both as they were."""
    before_graph, before_tensors = json.dumps(graph), {key: t.clone() for key, t in tensors.items()}
    ids = {key: id(t) for key, t in tensors.items()}
    out = fusion(graph, tensors)
    assert json.dumps(graph) == before_graph
    assert {key: id(t) for key, t in tensors.items()} == ids
    assert all(torch.equal(tensors[key], t) for key, t in before_tensors.items())
    return out


# ---------------------------------------------------------------------------
# the lowering's plain graph


def test_the_lowering_emits_each_layer_as_its_own_nodes():
    model, x = conv_chain(pool=True), torch.randn(2, 3, 8, 8)
    graph, tensors = lower_computation(model, x)
    assert ops_of(graph) == ["pack", "binary_conv2d", "max_pool2d", "batch_norm", "pack", "binary_conv2d"]
    G.validate(graph, tensors)
    assert torch.equal(run_nodes(graph, tensors, x), model(x))


def test_lower_is_the_plain_graph_through_the_passes():
    model, x = conv_chain(MAGNITUDE), torch.randn(2, 3, 8, 8)
    for fold in (False, True):
        graph, tensors = lower(model, x, fold_batchnorm=fold)
        want_graph, want_tensors = fuse_graph(*lower_computation(model, x), fold_batchnorm=fold)
        assert graph == want_graph and list(tensors) == list(want_tensors)
        assert all(torch.equal(tensors[key], want_tensors[key]) for key in tensors)


# ---------------------------------------------------------------------------
# thresholds


@pytest.mark.parametrize("first", [SIGN, MAGNITUDE], ids=["sign", "magnitude_aware"])
@pytest.mark.parametrize("bias", [False, True])
def test_batchnorm_before_binary_convs_becomes_the_convs_thresholds(first, bias):
    model, x = conv_chain(first, bias=bias), torch.randn(2, 3, 8, 8)
    graph, tensors = lower_computation(model, x)
    fused, fused_tensors = unchanged_by(fuse_thresholds, graph, tensors)
    assert ops_of(fused) == ["pack", "binary_conv2d_threshold", "binary_conv2d"]
    conv, reader_pack = graph["nodes"][1], graph["nodes"][3]
    thresholded = fused["nodes"][1]
    assert thresholded["name"] == conv["name"] and fused["nodes"][2]["inputs"] == [conv["name"]]
    attrs = thresholded["attrs"]
    assert attrs == {
        **conv["attrs"],
        "out_padding": reader_pack["attrs"]["padding"],
        "out_pad_value": reader_pack["attrs"]["pad_value"],
        "out_groups": reader_pack["attrs"]["groups"],
    }
    scale = tensors.get(conv["tensors"].get("scale", ""))
    conv_bias = tensors.get(conv["tensors"].get("bias", ""))
    want = batchnorm_sign_thresholds(model[1], accumulator_bound(3, 1, (3, 3)), scale=scale, bias=conv_bias)
    roles = {role: fused_tensors[key] for role, key in thresholded["tensors"].items()}
    assert torch.equal(roles["thresholds"], want.threshold) and roles["thresholds"].dtype == torch.int32
    assert torch.equal(roles["direction"], want.direction.to(torch.int8))
    assert set(fused_tensors) == {key for n in fused["nodes"] for key in n["tensors"].values()}
    G.validate(fused, fused_tensors)
    assert torch.equal(run_nodes(fused, fused_tensors, x), model(x))


def test_a_max_pool_between_becomes_the_max_pool_of_the_thresholded_bits():
    model, x = conv_chain(pool=True), torch.randn(2, 3, 9, 9)
    fused, fused_tensors = unchanged_by(fuse_thresholds, *lower_computation(model, x))
    assert ops_of(fused) == ["pack", "binary_conv2d_threshold", "max_pool_bits", "binary_conv2d"]
    bits, pooled = fused["nodes"][1], fused["nodes"][2]
    assert (bits["attrs"]["out_padding"], bits["attrs"]["out_pad_value"]) == ([0, 0], 0.0)
    assert pooled["inputs"] == [bits["name"]] and fused["nodes"][3]["inputs"] == [pooled["name"]]
    assert pooled["attrs"]["padding"] == [1, 1] and pooled["attrs"]["out_pad_value"] == -1.0
    G.validate(fused, fused_tensors)
    assert torch.equal(run_nodes(fused, fused_tensors, x), model(x))


def test_batchnorm1d_before_binary_linears_becomes_binary_linear_threshold():
    model, x = linear_chain(MAGNITUDE), torch.randn(5, 20)
    fused, fused_tensors = unchanged_by(fuse_thresholds, *lower_computation(model, x))
    assert ops_of(fused) == ["pack_features", "binary_linear_threshold", "binary_linear"]
    G.validate(fused, fused_tensors)
    assert torch.equal(run_nodes(fused, fused_tensors, x), model(x))


def test_the_noact_pattern_fuses_as_a_sign_input():
    """BatchNorm -> QActivation(sign) -> convs without input quantizer: the convs pack the BatchNorm."""
    torch.manual_seed(0)
    model = randomized(
        nn.Sequential(
            QConv2d(3, 16, 3, padding=1, **SIGN),
            nn.BatchNorm2d(16),
            QActivation("ste_sign"),
            QConv2d(16, 8, 3, padding=1, weight_quantizer="ste_sign"),
        )
    )
    x = torch.randn(2, 3, 8, 8)
    fused, fused_tensors = fuse_thresholds(*lower_computation(model, x))
    assert ops_of(fused) == ["pack", "binary_conv2d_threshold", "binary_conv2d"]
    assert torch.equal(run_nodes(fused, fused_tensors, x), model(x))


def as_sign_threshold(graph: dict, tensors: dict, thresholds: torch.Tensor, direction: torch.Tensor):
    """The plain graph with its batch_norm replaced by a sign_threshold of these thresholds."""
    graph, tensors = copy.deepcopy(graph), dict(tensors)
    bn = node(graph, "batch_norm")
    bn.update(op="sign_threshold", attrs={"channels": thresholds.numel()})
    bn["tensors"] = {"thresholds": "st__thresholds", "direction": "st__direction"}
    tensors.update({"st__thresholds": thresholds.to(torch.int32), "st__direction": direction.to(torch.int8)})
    return graph, tensors


def test_a_sign_threshold_fuses_clamped_to_the_reachable_accumulators():
    model, x = conv_chain(), torch.randn(2, 3, 8, 8)
    k = accumulator_bound(3, 1, (3, 3))
    thresholds = torch.tensor([-1000, -k - 1, -k, 0, 3, k, k + 1, 1000] * 2)
    direction = torch.tensor([1, -1] * 8)
    graph, tensors = as_sign_threshold(*lower_computation(model, x), thresholds, direction)
    fused, fused_tensors = unchanged_by(fuse_thresholds, graph, tensors)
    assert ops_of(fused) == ["pack", "binary_conv2d_threshold", "binary_conv2d"]
    roles = {role: fused_tensors[key] for role, key in fused["nodes"][1]["tensors"].items()}
    assert torch.equal(roles["thresholds"], thresholds.clamp(-k - 1, k + 1).to(torch.int32))
    assert torch.equal(roles["direction"], direction.to(torch.int8))
    assert torch.equal(run_nodes(fused, fused_tensors, x), run_nodes(graph, tensors, x))


def test_a_sign_threshold_after_a_scaled_layer_is_left():
    """Its thresholds hold on the exact accumulator, not on ``acc * scale + bias``."""
    graph, tensors = lower_computation(conv_chain(MAGNITUDE), torch.randn(2, 3, 8, 8))
    graph, tensors = as_sign_threshold(graph, tensors, torch.zeros(16), torch.ones(16))
    assert "sign_threshold" in ops_of(fuse_thresholds(graph, tensors)[0])


class _TwoReaders(nn.Module):
    """binary conv -> BatchNorm, then ``readers(self, conv_output, bn_output)``."""

    def __init__(self, readers):
        super().__init__()
        self.conv, self.bn = QConv2d(3, 16, 3, padding=1, **SIGN), nn.BatchNorm2d(16)
        self.same = QConv2d(16, 8, 3, padding=1, **SIGN)
        self.other_layout = QConv2d(16, 8, 1, **SIGN)
        self.float_conv = nn.Conv2d(16, 8, 1)
        self.readers = readers

    def forward(self, x):
        acc = self.conv(x)
        return self.readers(self, acc, self.bn(acc))


@pytest.mark.parametrize(
    "readers",
    [
        lambda m, acc, y: m.same(y) + m.float_conv(y),  # a float reader beside the binary conv
        lambda m, acc, y: m.same(y) + m.other_layout(y),  # two packed layouts
        lambda m, acc, y: (m.same(y), y),  # the BatchNorm is an output
        lambda m, acc, y: torch.relu(y),  # no binary reader
        lambda m, acc, y: m.same(y) + m.float_conv(acc),  # the conv has another reader
        lambda m, acc, y: (m.same(y), acc),  # the conv is an output
    ],
    ids=["float_reader", "two_layouts", "output", "float_only", "conv_read_twice", "conv_output"],
)
def test_a_batchnorm_with_other_readers_is_left(readers):
    model, x = randomized(_TwoReaders(readers)), torch.randn(2, 3, 8, 8)
    graph, tensors = lower_computation(model, x)
    fused, _ = unchanged_by(fuse_thresholds, graph, tensors)
    assert fused == graph


def test_two_readers_of_one_layout_share_the_thresholded_conv():
    model, x = randomized(_TwoReaders(lambda m, acc, y: m.same(y) * m.same(y))), torch.randn(2, 3, 8, 8)
    fused, fused_tensors = fuse_thresholds(*lower_computation(model, x))
    assert ops_of(fused) == ["pack", "binary_conv2d_threshold", "binary_conv2d", "binary_conv2d", "mul"]
    assert torch.equal(run_nodes(fused, fused_tensors, x), model(x))


def test_the_passes_are_idempotent():
    graph, tensors = fuse_thresholds(*lower_computation(conv_chain(pool=True), torch.randn(2, 3, 9, 9)))
    again, again_tensors = fuse_thresholds(graph, tensors)
    assert again == graph and list(again_tensors) == list(tensors)


# ---------------------------------------------------------------------------
# BatchNorm folding


def magnitude_then_relu(bias: bool = False) -> nn.Sequential:
    torch.manual_seed(1)
    return randomized(
        nn.Sequential(QConv2d(3, 16, 3, padding=1, bias=bias, **MAGNITUDE), nn.BatchNorm2d(16), nn.ReLU())
    )


@pytest.mark.parametrize("bias", [False, True])
def test_fold_batchnorm_puts_the_batchnorm_into_the_scale_and_bias(bias):
    model, x = magnitude_then_relu(bias), torch.randn(2, 3, 8, 8)
    graph, tensors = lower_computation(model, x)
    folded, folded_tensors = unchanged_by(fold_batchnorm, graph, tensors)
    assert ops_of(folded) == ["pack", "binary_conv2d", "relu"]
    conv = graph["nodes"][1]
    assert folded["nodes"][2]["inputs"] == [conv["name"]]
    roles = {role: folded_tensors[key] for role, key in folded["nodes"][1]["tensors"].items()}
    bias_before = tensors[conv["tensors"]["bias"]] if bias else None
    want = folded_scale_bias(model[1], tensors[conv["tensors"]["scale"]], bias_before)
    assert torch.equal(roles["scale"], want[0]) and torch.equal(roles["bias"], want[1])
    assert torch.equal(roles["weight"], tensors[conv["tensors"]["weight"]])
    torch.testing.assert_close(run_nodes(folded, folded_tensors, x), model(x), atol=1e-4, rtol=1e-5)


def test_fold_batchnorm_renames_an_output_and_leaves_convs_without_a_scale():
    torch.manual_seed(1)
    model = randomized(nn.Sequential(QConv2d(3, 16, 3, padding=1, **MAGNITUDE), nn.BatchNorm2d(16)))
    folded, _ = fold_batchnorm(*lower_computation(model, torch.randn(1, 3, 8, 8)))
    assert ops_of(folded) == ["pack", "binary_conv2d"] and folded["outputs"] == [folded["nodes"][1]["name"]]
    plain = lower_computation(magnitude_then_relu(), torch.randn(1, 3, 8, 8))
    unscaled = copy.deepcopy(plain[0])
    del unscaled["nodes"][1]["tensors"]["scale"]
    assert fold_batchnorm(unscaled, plain[1])[0] == unscaled


def test_thresholds_come_before_folding():
    model, x = conv_chain(MAGNITUDE), torch.randn(2, 3, 8, 8)
    graph, tensors = fuse_graph(*lower_computation(model, x), fold_batchnorm=True)
    assert ops_of(graph) == ["pack", "binary_conv2d_threshold", "binary_conv2d"]
    assert torch.equal(run_nodes(graph, tensors, x), model(x))
