"""``fuse``: the one stage that turns a graph into the steps a packed model runs (``onebit.engine.fuse``).

On small hand-built graphs: which nodes each binary conv absorbs (its ``pack``, a BatchNorm as its
epilogue, a shortcut ``add``) and when it must not, the steps' labels, ``free`` lists and relayouts,
that the graph is left as it was, and that running the steps equals running the graph's nodes one
by one with ``OPS[op].fn``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from onebit.engine import graph as G
from onebit.engine import ops
from onebit.engine.fuse import find_fusions, fuse
from onebit.engine.lowering import lower
from onebit.engine.torch_rounding import batchnorm_epilogue, batchnorm_rounding
from onebit.nn import QConv2d, QLinear

BACKENDS = ["reference"] + (["native"] if ops.native_available() else [])
NATIVE = ops.native_available()
needs_epilogue = pytest.mark.skipif(
    not NATIVE or batchnorm_rounding() is None,
    reason="BatchNorm epilogues need the native kernels and torch's rounding",
)
SIGN = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}


class Net:
    """A graph built by hand, node by node, on an input ``x`` of ``[N, 4, H, W]``; its tensors random."""

    def __init__(self, channels: int = 4, seed: int = 0):
        self.channels, self.nodes, self.tensors = channels, [], {}
        self.g = torch.Generator().manual_seed(seed)

    def _node(self, name: str, op: str, inputs: list[str], attrs: dict | None = None, tensors: dict | None = None):
        refs = {}
        for role, t in (tensors or {}).items():
            self.tensors[f"{name}.{role}"] = t
            refs[role] = f"{name}.{role}"
        self.nodes.append({"name": name, "op": op, "inputs": inputs, "attrs": attrs or {}, "tensors": refs})
        return name

    def pack(self, name: str, x: str = "x") -> str:
        return self._node(name, "pack", [x], {"padding": [1, 1], "pad_value": 0.0, "groups": 1})

    def conv(self, name: str, xp: str, *, bias: bool = True, **flags) -> str:
        c = self.channels
        attrs = {
            "in_channels": c,
            "out_channels": c,
            "kernel_size": [3, 3],
            "stride": [1, 1],
            "padding": [1, 1],
            "dilation": [1, 1],
            "groups": 1,
            "pad_value": 0.0,
        }
        tensors = {"weight": ops.pack_weights(torch.randn(c, c, 3, 3, generator=self.g)), "scale": self._rand() + 0.5}
        if bias:
            tensors["bias"] = torch.randn(c, generator=self.g)
        name = self._node(name, "binary_conv2d", [xp], attrs, tensors)
        self.nodes[-1].update(flags)
        return name

    def bn(self, name: str, x: str) -> str:
        c = self.channels
        tensors = {
            "running_mean": torch.randn(c, generator=self.g) * 3,
            "running_var": self._rand() * 4 + 0.1,
            "weight": torch.randn(c, generator=self.g),
            "bias": torch.randn(c, generator=self.g),
        }
        return self._node(name, "batch_norm", [x], {"num_features": c, "eps": 1e-5}, tensors)

    def add(self, name: str, *inputs: str, alpha: float = 1.0, other: float = 0.0) -> str:
        return self._node(name, "add", list(inputs), {"other": other, "alpha": alpha})

    def relu(self, name: str, x: str) -> str:
        return self._node(name, "relu", [x])

    def _rand(self) -> torch.Tensor:
        return torch.rand(self.channels, generator=self.g)

    def graph(self, *outputs: str) -> tuple[dict, dict]:
        graph = {
            "input": {"name": "x", "rank": 4, "channels": self.channels, "dtype": "float32"},
            "nodes": self.nodes,
            "outputs": list(outputs),
        }
        G.validate(graph, self.tensors)
        return graph, self.tensors


def labels(steps) -> list[str]:
    return [step.label for step in steps]


def run_steps(steps, graph: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """The steps run as a packed model runs them; every value but the outputs is freed by the end."""
    env = {graph["input"]["name"]: x}
    for step in steps:
        env[step.output] = step.run(*[env[ref] for ref in step.inputs])
        for ref in step.free:
            del env[ref]
    assert set(env) == set(graph["outputs"])
    return [env[name] for name in graph["outputs"]]


def run_nodes(graph: dict, tensors: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """The graph's specification: each node's ``OPS[op].fn``, one by one, nothing fused."""
    env = {graph["input"]["name"]: x}
    for node in graph["nodes"]:
        roles = {role: tensors[key] for role, key in node.get("tensors", {}).items()}
        env[node["name"]] = G.OPS[node["op"]].fn(roles, G.attrs(node), *[env[ref] for ref in node["inputs"]])
    return [env[name] for name in graph["outputs"]]


def residual_block() -> tuple[dict, dict]:
    """x -> pack -> conv -> bn -> add(bn, x): a Bi-Real block."""
    net = Net()
    net.add("sum", net.bn("bn", net.conv("conv", net.pack("xp"))), "x")
    return net.graph("sum")


# ---------------------------------------------------------------------------
# what fuses


@needs_epilogue
def test_pack_batchnorm_and_shortcut_add_fuse_into_the_conv_step_at_the_adds_place():
    graph, tensors = residual_block()
    steps = fuse(graph, tensors, native=True)
    assert labels(steps) == ["pack+binary_conv2d+batch_norm+add"]
    (step,) = steps
    assert (step.op, step.output, step.inputs) == ("binary_conv2d", "sum", ("x", "x"))  # the shortcut comes last
    assert step.layer is not None and step.cache is not None
    scale, shift, fma = batchnorm_epilogue(
        tensors["bn.running_mean"], tensors["bn.running_var"], tensors["bn.weight"], tensors["bn.bias"], 1e-5
    )
    assert torch.equal(step.epilogue.bn_scale, scale) and torch.equal(step.epilogue.bn_shift, shift)
    assert step.epilogue.bn_fma == fma
    fusions = find_fusions(graph["nodes"], {"sum"}, tensors, True)
    assert fusions.packs == {1: graph["nodes"][0]}
    assert list(fusions.batchnorms) == [1] and fusions.batchnorms[1][0] is graph["nodes"][2]
    assert fusions.adds == {1: (graph["nodes"][3], "x")}


def test_without_native_kernels_no_batchnorm_epilogue_or_bound_layer_is_made():
    graph, tensors = residual_block()
    steps = fuse(graph, tensors, native=False)
    # the BatchNorm stays torch's op, so the conv is not the add's only input's producer either
    assert labels(steps) == ["pack+binary_conv2d", "batch_norm", "add"]
    assert all(step.epilogue is None and step.layer is None for step in steps)
    assert find_fusions(graph["nodes"], {"sum"}, tensors, False).batchnorms == {}


def threshold_chains():
    """A binary conv, max pool, BatchNorm, binary conv (thresholded bits pooled); and a binary MLP whose
    BatchNorm1d becomes a thresholded binary linear layer."""
    torch.manual_seed(0)
    convs = nn.Sequential(
        QConv2d(3, 16, 3, padding=1, **SIGN),
        nn.MaxPool2d(3, 2, padding=1),
        nn.BatchNorm2d(16),
        QConv2d(16, 8, 3, padding=1, **SIGN),
    )
    mlp = nn.Sequential(QLinear(20, 32, **SIGN), nn.BatchNorm1d(32), QLinear(32, 10, **SIGN))
    for model in (convs, mlp):
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                with torch.no_grad():
                    m.running_mean.uniform_(-3, 3), m.weight.uniform_(-1, 1)
    return (convs.eval(), torch.randn(2, 3, 9, 9)), (mlp.eval(), torch.randn(5, 20))


@pytest.mark.skipif(not NATIVE, reason="bound layers are native")
def test_threshold_convs_bit_pools_and_linear_layers_run_bound_layers_that_check_arguments_once_per_shape(
    monkeypatch,
):
    """Their operands checked once, when the steps are made, and a call's numbers once per input shape: later
    calls run the kernels straight away. A binary linear layer packs its float features itself."""
    from onebit import engine
    from onebit.engine import geometry
    from onebit.engine.kernels import conv, conv_layer, plans, pool

    (convs, x), (mlp, features) = threshold_chains()
    packed_convs, packed_mlp = engine.pack(convs, x), engine.pack(mlp, features)
    assert labels(packed_convs._steps) == ["pack+binary_conv2d_threshold", "max_pool_bits", "binary_conv2d"]
    assert labels(packed_mlp._steps) == ["pack+binary_linear_threshold", "binary_linear"]
    assert all(step.layer is not None for step in packed_convs._steps + packed_mlp._steps)
    expected = (packed_convs(x), packed_mlp(features))
    checks = []

    def counted(fn):
        return lambda *args, **kwargs: (checks.append(fn.__name__), fn(*args, **kwargs))[1]

    monkeypatch.setattr(pool, "check_pool_bits", counted(geometry.check_pool_bits))
    monkeypatch.setattr(conv_layer, "check_thresholds", counted(geometry.check_thresholds))
    monkeypatch.setattr(conv, "check_thresholds", counted(geometry.check_thresholds))  # the ops' path
    monkeypatch.setattr(conv_layer, "conv_plan", counted(plans.conv_plan))
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(packed_convs(x), expected[0]) and torch.equal(packed_mlp(features), expected[1])
    assert checks == []
    packed_convs(torch.randn(1, 3, 7, 7))  # a new shape: its numbers checked once
    assert sorted(set(checks)) == ["check_pool_bits", "conv_plan"]
    assert torch.equal(packed_convs(x), convs(x)) and torch.equal(packed_mlp(features), mlp(features))


@pytest.mark.skipif(not NATIVE, reason="BatchNorm epilogues need the native kernels")
def test_a_batchnorm_whose_rounding_cannot_be_matched_stays_torchs_op(monkeypatch):
    from onebit.engine import torch_rounding

    monkeypatch.setattr(torch_rounding, "batchnorm_epilogue", lambda *args: None)
    graph, tensors = residual_block()
    steps = fuse(graph, tensors, native=True)
    assert labels(steps) == ["pack+binary_conv2d", "batch_norm", "add"]
    assert steps[0].layer is not None and steps[0].epilogue is None


@pytest.mark.parametrize("native", [False, True] if NATIVE else [False])
def test_an_add_of_a_conv_and_a_shortcut_fuses_without_a_batchnorm(native):
    net = Net()
    net.add("sum", "x", net.conv("conv", net.pack("xp")))  # the shortcut first: the conv's output second
    graph, tensors = net.graph("sum")
    (step,) = fuse(graph, tensors, native=native)
    assert (step.label, step.output, step.inputs) == ("pack+binary_conv2d+add", "sum", ("x", "x"))
    assert step.free == ("x",)


def test_add_of_two_convs_is_fused_into_the_first_and_runs_after_the_second():
    net = Net()
    first = net.conv("c1", net.pack("xp1"))
    second = net.conv("c2", net.pack("xp2"))
    net.add("sum", first, second)
    graph, tensors = net.graph("sum")
    steps = fuse(graph, tensors, native=False)
    assert [(s.label, s.output, s.inputs) for s in steps] == [
        ("pack+binary_conv2d", "c2", ("x",)),
        ("pack+binary_conv2d+add", "sum", ("x", "c2")),  # the shortcut c2 is computed before it
    ]


def _two_readers_of_the_pack():
    net = Net()
    xp = net.pack("xp")
    return net, (net.conv("c1", xp), net.conv("c2", xp))


def _two_readers_of_the_conv():
    net = Net()
    conv = net.conv("conv", net.pack("xp"))
    return net, (net.bn("bn", conv), net.relu("r", conv))


def _two_readers_of_the_batchnorm():
    net = Net()
    bn = net.bn("bn", net.conv("conv", net.pack("xp")))
    return net, (net.add("sum", bn, "x"), net.relu("r", bn))


def _conv_is_an_output():
    net = Net()
    conv = net.conv("conv", net.pack("xp"))
    return net, (conv, net.add("sum", conv, "x"))


def _batchnorm_is_an_output():
    net = Net()
    bn = net.bn("bn", net.conv("conv", net.pack("xp")))
    return net, (bn, net.add("sum", bn, "x"))


def _add_with_alpha():
    net = Net()
    return net, (net.add("sum", net.conv("conv", net.pack("xp")), "x", alpha=2.0),)


def _add_of_the_conv_with_itself():
    net = Net()
    conv = net.conv("conv", net.pack("xp"))
    return net, (net.add("sum", conv, conv),)


def _add_of_a_number():
    net = Net()
    return net, (net.add("sum", net.conv("conv", net.pack("xp")), other=1.0),)


#: case -> (its graph, the step labels with BatchNorm epilogues, without them)
NOT_FUSED = {
    "two readers of the pack": (_two_readers_of_the_pack, ["pack", "binary_conv2d", "binary_conv2d"], None),
    "two readers of the conv": (_two_readers_of_the_conv, ["pack+binary_conv2d", "batch_norm", "relu"], None),
    "two readers of the batchnorm": (
        _two_readers_of_the_batchnorm,
        ["pack+binary_conv2d+batch_norm", "add", "relu"],
        ["pack+binary_conv2d", "batch_norm", "add", "relu"],
    ),
    "the conv is an output": (_conv_is_an_output, ["pack+binary_conv2d", "add"], None),
    "the batchnorm is an output": (
        _batchnorm_is_an_output,
        ["pack+binary_conv2d+batch_norm", "add"],
        ["pack+binary_conv2d", "batch_norm", "add"],
    ),
    "add with alpha 2": (_add_with_alpha, ["pack+binary_conv2d", "add"], None),
    "add(conv, conv)": (_add_of_the_conv_with_itself, ["pack+binary_conv2d", "add"], None),
    "add of a number": (_add_of_a_number, ["pack+binary_conv2d", "add"], None),
}


@pytest.mark.parametrize("case", list(NOT_FUSED))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_fuses_into_a_value_with_two_readers_or_an_output_or_into_an_add_it_cannot_take(case, backend):
    build, with_epilogues, without = NOT_FUSED[case]
    net, outputs = build()
    graph, tensors = net.graph(*outputs)
    native = backend == "native"
    epilogues = native and batchnorm_rounding() is not None
    steps = fuse(graph, tensors, native=native)
    assert labels(steps) == (with_epilogues if epilogues or without is None else without)
    x = torch.randn(2, 4, 5, 5)
    with ops.use_backend(backend):
        assert all(torch.equal(a, b) for a, b in zip(run_steps(steps, graph, x), run_nodes(graph, tensors, x)))


# ---------------------------------------------------------------------------
# frees, relayouts, runtime state


def test_each_value_is_freed_after_its_last_reader_and_outputs_never():
    net = Net()
    conv = net.conv("conv", net.pack("xp"))
    bn = net.bn("bn", conv)
    r = net.relu("r", bn)
    net.add("sum", r, "x")
    graph, tensors = net.graph("sum", "bn")
    steps = fuse(graph, tensors, native=False)
    assert [(s.label, s.inputs, s.free) for s in steps] == [
        ("pack+binary_conv2d", ("x",), ()),  # x is read again by the add
        ("batch_norm", ("conv",), ("conv",)),
        ("relu", ("bn",), ()),  # bn is an output
        ("add", ("r", "x"), ("r", "x")),
    ]
    x = torch.randn(1, 4, 4, 4)
    assert all(torch.equal(a, b) for a, b in zip(run_steps(steps, graph, x), run_nodes(graph, tensors, x)))


def test_outputs_pass_on_as_written_but_1d_convs_are_contiguous_and_layout_bound_ops_get_the_models_layout():
    net = Net()
    xp = net.pack("xp")
    net.conv("c1", xp)
    net.conv("c2", xp, conv1d=True)  # a 1-d conv run as a 1 x k 2-d conv
    net.relu("r", "c1")
    graph, tensors = net.graph("r", "c2")
    steps = fuse(graph, tensors, native=False)
    assert [(s.output, s.relayout) for s in steps] == [("xp", None), ("c1", None), ("c2", "contiguous"), ("r", None)]
    # binary convs and relu give the same values in any layout: none waits for the model's layout
    assert [s.model_layout for s in steps] == [False, False, False, False]
    assert all(s.model_layout == (not G.OPS[s.op].layout_free) for s in steps)


def test_steps_carry_the_nodes_module_and_each_weighted_conv_its_own_cache():
    net = Net()
    xp = net.pack("xp")
    net.conv("c1", xp, module="block.conv1")
    net.conv("c2", xp)
    graph, tensors = net.graph("c1", "c2")
    steps = fuse(graph, tensors, native=False)
    assert [s.module for s in steps] == ["", "block.conv1", ""]
    if NATIVE:  # the kernels keep each conv's prepared weights: one cache each, none for a pack
        assert steps[0].cache is None and steps[1].cache is not None and steps[1].cache is not steps[2].cache
    assert steps[1].tensors["weight"] is tensors["c1.weight"]  # the model's tensors, not copies


@pytest.mark.parametrize("native", [False, True] if NATIVE else [False])
def test_fuse_reads_the_graph_and_its_tensors_without_changing_them(native):
    net = Net()
    net.add("sum", net.bn("bn", net.conv("conv", net.pack("xp"))), "x")
    graph, tensors = net.graph("sum")
    before, saved = copy.deepcopy(graph), {key: t.clone() for key, t in tensors.items()}
    keys = list(tensors)
    fuse(graph, tensors, native=native)
    assert graph == before
    assert list(tensors) == keys and all(torch.equal(tensors[k], saved[k]) for k in keys)


# ---------------------------------------------------------------------------
# fused steps compute what the nodes compute


class BiRealBlock(nn.Module):
    def __init__(self, channels: int, *, stride: int = 1, scale: bool = False):
        super().__init__()
        weights = "magnitude_aware_sign" if scale else "ste_sign"
        self.conv = QConv2d(
            channels, channels, 3, stride, 1, bias=False, input_quantizer="ste_sign", weight_quantizer=weights
        )
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x)) + self.pool(x)


def tiny_models() -> dict[str, nn.Module]:
    def randomized(model):
        g = torch.Generator().manual_seed(3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 3)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 4 + 0.1)
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
        return model.eval()

    return {
        "bireal": randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BiRealBlock(8), BiRealBlock(8, stride=2))),
        "scaled": randomized(nn.Sequential(nn.Conv2d(3, 8, 1), BiRealBlock(8, scale=True), nn.ReLU())),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["bireal", "scaled"])
def test_running_the_steps_equals_running_the_nodes_one_by_one(backend, channels_last, name):
    model = tiny_models()[name]
    x = torch.randn(2, 3, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    graph, tensors = lower(model, x)
    steps = fuse(graph, tensors, native=NATIVE)  # the reference backend runs native steps as well
    blocks = 2 if name == "bireal" else 1
    if NATIVE and batchnorm_rounding() is not None:  # each block's conv: one step with its pack, BatchNorm and add
        assert labels(steps).count("pack+binary_conv2d+batch_norm+add") == blocks
    assert len(steps) == len(graph["nodes"]) - sum(label.count("+") for label in labels(steps))  # each "+": one node
    with ops.use_backend(backend):
        (fused,) = run_steps(steps, graph, x)
        (by_node,) = run_nodes(graph, tensors, x)
    assert torch.equal(fused, by_node)
    assert torch.allclose(fused, model(x), atol=1e-4, rtol=0)
