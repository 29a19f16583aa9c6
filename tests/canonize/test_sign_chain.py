"""onebit.sign_chain: the BatchNorm -> sign chain, one finder for the canonizer and the engine.

``source -> [before] -> batchnorm -> [after] -> readers``: back from the BatchNorm's first input
through the steps the view crosses before it; forward along every path to readers that take the
sign, through the steps the view crosses after it; otherwise the chain has a problem.
"""

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from onebit import quant
from onebit.canonize import UnmergeableError, fold_thresholds
from onebit.nn import QActivation, QConv2d, QLinear
from onebit.sign_chain import find_sign_chain, takes_sign


@dataclass(eq=False)
class Node:
    name: str
    kind: str = "other"  # other | pool | flatten | sign
    module: nn.Module | None = None
    inputs: list = field(default_factory=list)
    users: list = field(default_factory=list)
    alone: bool = True


class View:
    """A toy graph: pools cross before the BatchNorm, flattens after it."""

    def inputs(self, node):
        return node.inputs

    def users(self, node):
        return node.users

    def module(self, node):
        return node.module

    def reads_alone(self, node, value):
        return node.alone

    def crosses_before(self, node):
        return node.kind == "pool"

    def crosses_after(self, node):
        return node.kind == "flatten"

    def describe(self, node):
        return node.name


def chain_of(*nodes: Node) -> list[Node]:
    for a, b in zip(nodes, nodes[1:]):
        a.users.append(b)
        b.inputs.append(a)
    return list(nodes)


def sign_node(name: str) -> Node:
    return Node(name, "sign", QActivation("ste_sign"))


def test_takes_sign_asks_the_input_quantizer_the_activation_or_the_quantizer():
    assert takes_sign(QConv2d(2, 2, 1, input_quantizer="ste_sign"))
    assert takes_sign(QLinear(2, 2, input_quantizer="approx_sign"))
    assert not takes_sign(QConv2d(2, 2, 1, input_quantizer=None, weight_quantizer="ste_sign"))
    assert takes_sign(QActivation("ste_sign"))
    assert takes_sign(quant.get("ste_sign"))
    assert not takes_sign(nn.ReLU())
    assert not takes_sign(None)


def test_a_chain_through_pools_before_and_flattens_after():
    src, pool, bn, flat, sign = chain_of(
        Node("conv"), Node("pool", "pool"), Node("bn"), Node("flat", "flatten"), sign_node("s")
    )
    chain = find_sign_chain(View(), bn)
    assert chain.problem is None
    assert chain.source is src and chain.before == [pool]
    assert chain.after == [flat] and chain.readers == [sign]


def test_every_path_must_reach_a_sign():
    src, bn, sign = chain_of(Node("conv"), Node("bn"), sign_node("s"))
    relu = Node("relu", inputs=[bn])
    bn.users.append(relu)
    chain = find_sign_chain(View(), bn)
    assert chain.problem == "its output goes to relu, which does not take its sign first"
    assert chain.readers == [] and chain.after == []
    assert chain.source is src  # the source is found whatever the readers


def test_problems_name_why():
    _, bn = chain_of(Node("conv"), Node("bn"))
    assert find_sign_chain(View(), bn).problem == "its output is not used"
    _, bn, flat = chain_of(Node("conv"), Node("bn"), Node("flat", "flatten"))
    assert find_sign_chain(View(), bn).problem == "its output is not used"
    _, bn, sign = chain_of(Node("conv"), Node("bn"), sign_node("s"))
    sign.alone = False  # reads the BatchNorm with another argument
    assert find_sign_chain(View(), bn).problem == "its output goes to s, which does not take its sign first"


def test_a_batchnorm_without_input_has_no_source():
    bn, sign = chain_of(Node("bn"), sign_node("s"))
    chain = find_sign_chain(View(), bn)
    assert chain.source is None and chain.before == [] and chain.problem is None


def test_a_step_that_reads_several_values_ends_the_walk_back():
    other = Node("other")
    src, pool, bn, _ = chain_of(Node("conv"), Node("pool", "pool"), Node("bn"), sign_node("s"))
    pool.inputs.append(other)
    chain = find_sign_chain(View(), bn)
    assert chain.source is pool and chain.before == []


def _binary_conv(c_in, c_out, **kw):
    return QConv2d(c_in, c_out, 3, padding=1, bias=False, input_quantizer="ste_sign", weight_quantizer="ste_sign", **kw)


def test_the_canonizer_and_the_engine_find_the_same_chains():
    """conv -> maxpool -> bn -> dropout -> signs folds in both; a BatchNorm also read by a ReLU folds in neither."""
    from onebit import engine

    torch.manual_seed(0)
    model = nn.Sequential(
        _binary_conv(3, 8), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.Dropout(), _binary_conv(8, 8), nn.BatchNorm2d(8)
    ).eval()
    with torch.no_grad():
        model[2].running_mean.uniform_(-3, 3)
        model[2].weight.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    ops = [n["op"] for n in engine.pack(model, x).graph["nodes"]]
    assert "binary_conv2d_threshold" in ops and "max_pool_bits" in ops
    with fold_thresholds(model) as handle:
        assert list(handle.thresholds) == ["2"]

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.next = _binary_conv(3, 8), nn.BatchNorm2d(8), _binary_conv(8, 8)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.next(y) + torch.relu(y)

    branch = Branch().eval()
    ops = [n["op"] for n in engine.pack(branch, x).graph["nodes"]]
    assert "binary_conv2d_threshold" not in ops
    with pytest.raises(UnmergeableError, match="goes to .*relu.*, which does not take its sign first"):
        fold_thresholds(branch)
