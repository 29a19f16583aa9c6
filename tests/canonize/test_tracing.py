"""onebit.tracing and onebit.layerkinds: one tracer and one vocabulary of layer kinds, shared by
the canonizers and the packed engine's lowering.

The rules: onebit's quantized layers, QActivation, quantizers and SignThreshold are leaves (one
call_module node each, never traced into); every other module follows torch.fx (torch.nn's modules
leaves, Sequential and user modules traced into); eval-mode identities (exactly the classes of
IDENTITIES, and .contiguous()) are dropped with their readers rewired.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from onebit import layerkinds, quant, tracing
from onebit.canonize import SignThreshold, ThresholdedReLU, adjacency
from onebit.engine.lowering import trace as lowering_trace
from onebit.nn import QActivation, QConv2d, QLinear
from onebit.thresholds import Thresholds


def _sign_threshold(channels: int = 4) -> SignThreshold:
    return SignThreshold(Thresholds(torch.zeros(channels, dtype=torch.int32), torch.ones(channels, dtype=torch.int32)))


def _module_calls(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


# -- leaves ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        QConv2d(4, 4, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="ste_sign"),
        QLinear(4, 4, input_quantizer="ste_sign", weight_quantizer="ste_sign"),
        QActivation("ste_sign"),
        quant.get("ste_sign"),
        _sign_threshold(),
    ],
    ids=["QConv2d", "QLinear", "QActivation", "quantizer", "SignThreshold"],
)
def test_onebit_layers_quantizers_and_sign_thresholds_are_leaves(module):
    assert tracing.is_onebit_leaf(module)
    assert tracing.Tracer().is_leaf_module(module, "m")


def test_a_leaf_is_one_call_never_traced_into():
    model = nn.Sequential(
        QConv2d(3, 4, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="ste_sign"),
        nn.BatchNorm2d(4),
        QActivation("ste_sign"),
        _sign_threshold(),
    )
    gm = fx.GraphModule(model, tracing.Tracer().trace(model))
    assert _module_calls(gm) == ["0", "1", "2", "3"]
    assert [n.op for n in gm.graph.nodes] == ["placeholder"] + ["call_module"] * 4 + ["output"]


def test_other_modules_follow_torch_fx_user_modules_and_sequentials_are_traced_into():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return torch.relu(self.conv(x)) + x

    model = nn.Sequential(Block(), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))
    gm = fx.GraphModule(model, tracing.Tracer().trace(model))
    assert _module_calls(gm) == ["0.conv", "1.0", "1.1"]
    assert any(n.op == "call_function" and n.target is torch.relu for n in gm.graph.nodes)
    relu = ThresholdedReLU(torch.zeros(3), torch.ones(3))
    assert not tracing.is_onebit_leaf(relu)  # a canonized ReLU is not one of onebit's leaves
    assert not tracing.Tracer().is_leaf_module(relu, "relu")


def test_the_canonizers_add_batchnorms_canonized_modules_and_childless_modules_as_leaves():
    class Childless(nn.Module):
        def forward(self, x):
            return x * 2

    assert issubclass(adjacency._Tracer, tracing.Tracer)
    for module in (nn.BatchNorm2d(3), ThresholdedReLU(torch.zeros(3), torch.ones(3)), Childless(), _sign_threshold()):
        assert adjacency._is_leaf(module)
    assert not adjacency._is_leaf(nn.Sequential(nn.ReLU()))
    assert not adjacency._is_leaf(nn.Sequential())


def test_the_engine_traces_with_the_shared_tracer():
    model = nn.Sequential(
        QConv2d(3, 4, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="ste_sign"), nn.Dropout(0.5)
    ).eval()
    gm = lowering_trace.trace(model, torch.randn(1, 3, 6, 6))
    assert _module_calls(gm) == ["0"]
    assert lowering_trace.Tracer is tracing.Tracer
    assert lowering_trace.drop_identities is tracing.drop_identities
    # a single leaf is traced as a one-layer Sequential: one call of it
    single = lowering_trace.trace(QActivation("ste_sign"), torch.randn(1, 3))
    assert _module_calls(single) == ["0"]


def test_is_sign_threshold_is_an_isinstance_check():
    class Shifted(SignThreshold):
        pass

    assert tracing.is_sign_threshold(_sign_threshold())
    assert tracing.is_sign_threshold(Shifted(_sign_threshold().thresholds))
    assert not tracing.is_sign_threshold(nn.BatchNorm2d(4))


# -- identities -----------------------------------------------------------------------


class _WithIdentities(nn.Module):
    def __init__(self, identity: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.identity = identity

    def forward(self, x):
        y = self.identity(self.conv(x)).contiguous()
        return torch.relu(y)


def _traced(model: nn.Module) -> fx.GraphModule:
    gm = fx.GraphModule(model, tracing.Tracer().trace(model))
    tracing.drop_identities(gm, dict(gm.named_modules()))
    return gm


@pytest.mark.parametrize("identity", layerkinds.IDENTITIES, ids=lambda c: c.__name__)
def test_eval_mode_identities_and_contiguous_are_dropped_and_readers_rewired(identity):
    gm = _traced(_WithIdentities(identity()))
    assert _module_calls(gm) == ["conv"]
    assert not any(n.op == "call_method" for n in gm.graph.nodes)
    relu = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert relu.args[0].target == "conv"
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(fx.Interpreter(gm.eval()).run(x), torch.relu(gm.conv(x)))


def test_only_the_exact_identity_classes_are_dropped():
    class MyDropout(nn.Dropout):
        pass

    gm = _traced(_WithIdentities(MyDropout()))  # traced into (not torch.nn's): its F.dropout stays
    assert _module_calls(gm) == ["conv"]
    assert any(n.op == "call_function" and n.target is F.dropout for n in gm.graph.nodes)


def test_contiguous_with_a_memory_format_is_kept():
    class Model(nn.Module):
        def forward(self, x):
            return x.contiguous(memory_format=torch.channels_last)

    gm = _traced(Model())
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_method", "output"]


# -- layer kinds ----------------------------------------------------------------------


def test_layer_kinds():
    for bn in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2), nn.LazyBatchNorm2d()):
        assert isinstance(bn, layerkinds.BATCHNORMS)
    assert not isinstance(nn.LayerNorm(2), layerkinds.BATCHNORMS)
    assert layerkinds.CONVOLUTIONS == (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    assert layerkinds.WEIGHT_LAYERS == (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    assert isinstance(QConv2d(2, 2, 1), layerkinds.WEIGHT_LAYERS)  # onebit's layers are their torch kinds
    assert isinstance(QLinear(2, 2), layerkinds.WEIGHT_LAYERS)
    assert set(layerkinds.IDENTITIES) == {
        nn.Identity,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
    }
    assert nn.AdaptiveMaxPool2d in layerkinds.MAX_POOLS and nn.MaxPool1d in layerkinds.MAX_POOLS
    assert nn.AdaptiveAvgPool2d in layerkinds.ADAPTIVE_AVG_POOLS and nn.AvgPool3d in layerkinds.AVG_POOLS
    assert F.relu in layerkinds.RELU_FUNCTIONS and torch.relu in layerkinds.RELU_FUNCTIONS
    assert F.adaptive_max_pool2d in layerkinds.MAX_POOL_FUNCTIONS
    assert F.dropout2d in layerkinds.DROPOUT_FUNCTIONS


def test_the_canonizers_classify_with_the_shared_kinds():
    def kind(m):
        return adjacency._classify_module(m)[0]

    assert kind(nn.Conv3d(2, 2, 1)) == kind(nn.Linear(2, 2)) == "layer"
    assert all(kind(c().eval()) == "identity" for c in layerkinds.IDENTITIES)
    assert kind(nn.Dropout().train()) == "other"
    assert all(kind(c(2)) == "maxpool" for c in layerkinds.MAX_POOLS)
    assert all(kind(c(2)) == "avgpool" for c in layerkinds.AVG_POOLS + layerkinds.ADAPTIVE_AVG_POOLS)
