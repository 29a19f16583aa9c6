"""The model zoo and its constructor: names, building, forward/backward, paper structure, swaps."""

import functools

import pytest
import torch
import torch.fx
from torch import nn

from onebit import models, quant
from onebit.models import BiRealBlock, DenseLayer, ModelConstructor
from onebit.nn import QConv2d, QuantizedLayer
from onebit.nn.twist import TwistConv2d

ZOO = [
    "lenet",
    "lenet_binary",
    "lenet_larq",
    "resnet18",
    "birealnet18",
    "birealnet_small",
    "birealnet_small_react",
    "birealnet_small_react_wide",
    "resnete18",
    "binary_densenet28",
    "binary_densenet37",
    "binary_densenet45",
]


def example(name: str, batch: int = 2) -> torch.Tensor:
    if name in ("lenet", "lenet_binary"):
        return torch.randn(batch, 1, 8, 8)
    if name in ("lenet_larq", "birealnet_small", "birealnet_small_react", "birealnet_small_react_wide"):
        return torch.randn(batch, 1, 28, 28)
    return torch.randn(batch, 3, 32, 32)


class LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps onebit's quantized layers as leaves (as the engine does)."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, QuantizedLayer) or super().is_leaf_module(m, qualname)


def binary_layers(model):
    return [m for m in model.modules() if isinstance(m, QuantizedLayer) and quant.precision_of(m.weight_quantizer) == 1]


def test_names_lists_the_zoo_and_filters_by_pattern():
    assert set(ZOO) <= set(models.names())
    assert models.names("birealnet*") == [
        "birealnet18",
        "birealnet_small",
        "birealnet_small_react",
        "birealnet_small_react_wide",
    ]
    assert models.names("binary_densenet*") == ["binary_densenet28", "binary_densenet37", "binary_densenet45"]


def test_unknown_model_and_unknown_argument_are_value_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*birealnet18"):
        models.create("resnet19")
    with pytest.raises(ValueError, match="conv_lauer"):
        models.create("birealnet18", conv_lauer="float")


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_builds_runs_forward_and_backward(name):
    torch.manual_seed(0)
    x = example(name)
    model = models.create(name, num_classes=7, in_channels=x.shape[1])
    y = model(x)
    assert y.shape == (2, 7)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    last = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    assert first.weight.grad.abs().sum() > 0 and last.weight.grad.abs().sum() > 0
    model.eval()
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", ["resnet18", "birealnet18", "resnete18", "binary_densenet28"])
def test_fx_traceable_with_onebit_layers_as_leaves(name):
    x = example(name, batch=1)
    model = models.create(name, in_channels=3).eval()
    graph = torch.fx.GraphModule(model, LeafTracer().trace(model))
    assert torch.allclose(graph(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name", ["birealnet18", "resnete18"])
def test_large_models_accept_any_input_of_at_least_32_pixels(name):
    model = models.create(name, num_classes=3).eval()
    for shape in [(1, 3, 32, 32), (1, 3, 45, 37), (1, 3, 64, 64)]:
        assert model(torch.randn(shape)).shape == (1, 3)
    small = models.create(name, num_classes=3, stem="small").eval()
    assert small(torch.randn(1, 3, 28, 28)).shape == (1, 3)
    assert isinstance(small.stem.conv, nn.Conv2d) and small.stem.conv.stride == (1, 1)


def test_birealnet18_follows_the_paper():
    model = models.create("birealnet18", num_classes=10)
    assert type(model.stem.conv) is nn.Conv2d and model.stem.conv.kernel_size == (7, 7)  # float stem
    assert type(model.head.fc) is nn.Linear  # float classifier
    blocks = [m for m in model.modules() if isinstance(m, BiRealBlock)]
    assert len(blocks) == 16  # one real-valued shortcut around each of the 16 binary convs
    for b in blocks:
        assert isinstance(b.conv, QConv2d) and b.conv.kernel_size == (3, 3)
        assert isinstance(b.conv.input_quantizer, quant.ApproxSign)
        assert isinstance(b.conv.weight_quantizer, quant.MagnitudeAwareSign)
        assert isinstance(b.bn, nn.BatchNorm2d)
    downsampling = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(downsampling) == 3
    for b in downsampling:  # real-valued downsampling: average pooling, float 1x1 conv, BN
        kinds = [type(m) for m in b.shortcut]
        assert kinds == [nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d]
    assert len(binary_layers(model)) == 16


def test_resnete18_and_densenet_use_plain_sign_and_float_transitions():
    resnete = models.create("resnete18")
    assert all(
        isinstance(m.input_quantizer, quant.Sign) and isinstance(m.weight_quantizer, quant.Sign)
        for m in binary_layers(resnete)
    )
    assert len(binary_layers(resnete)) == 16
    dense = models.create("binary_densenet28")
    layers = [m for m in dense.modules() if isinstance(m, DenseLayer)]
    assert len(layers) == 6 + 6 + 6 + 5
    assert all(isinstance(layer.conv, QConv2d) and layer.conv.out_channels == 64 for layer in layers)
    assert len(binary_layers(dense)) == 23  # every other conv (stem, transitions) stays float


def test_lenet_larq_has_larqs_93k_binary_weights():
    model = models.create("lenet_larq", in_channels=1)
    n = sum(m.weight.numel() for m in binary_layers(model))
    assert n == 93_088
    assert models.create("lenet_larq", in_channels=1, binary=False)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "conv_layer, expected",
    [("float", nn.Conv2d), ("binary", QConv2d), ("twist", TwistConv2d), (nn.Conv2d, nn.Conv2d)],
)
def test_constructor_swaps_the_block_convolution(conv_layer, expected):
    model = models.create("birealnet18", conv_layer=conv_layer).eval()
    convs = [b.conv for b in model.modules() if isinstance(b, BiRealBlock)]
    assert len(convs) == 16 and all(type(c) is expected for c in convs)
    assert type(model.stem.conv) is nn.Conv2d and type(model.head.fc) is nn.Linear
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_conv_layer_callables_get_bias_false_and_twist_accepts_it():
    calls = []

    def conv_layer(c_in, c_out, kernel_size, **kwargs):
        calls.append(kwargs)
        return TwistConv2d(c_in, c_out, kernel_size, **kwargs)

    net = ModelConstructor(
        block="bireal", layers=(1, 1), widths=(8, 16), stem="small", stem_width=8, conv_layer=conv_layer
    )()
    assert calls and all(kw["bias"] is False and kw["padding"] == 1 for kw in calls)
    auto = ModelConstructor(
        block="bireal",
        layers=(1,),
        widths=(64,),
        stem="small",
        stem_width=64,
        conv_layer=functools.partial(TwistConv2d, groups="auto"),
    )()
    assert [m.groups for m in auto.modules() if isinstance(m, TwistConv2d)] == [2]
    assert net(torch.randn(2, 3, 8, 8)).shape == auto(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_quantizers_go_to_convs_that_accept_them():
    twist = models.create("birealnet18", conv_layer="twist")
    conv = twist.stage2[1].conv
    assert isinstance(conv.input_quantizer, quant.ApproxSign) and isinstance(
        conv.weight_quantizer, quant.MagnitudeAwareSign
    )
    binary_resnet = models.create("resnet18", conv_layer="binary")  # "binary" defaults to ste_sign
    assert len(binary_layers(binary_resnet)) == 16
    assert binary_layers(binary_resnet)[0].input_quantizer is not binary_layers(binary_resnet)[1].input_quantizer


def test_constructor_swaps_activation_norm_and_block():
    net = ModelConstructor(
        block="basic",
        layers=(1, 1),
        widths=(8, 16),
        stem="small",
        stem_width=8,
        act_fn="prelu",
        norm_layer=lambda c: nn.GroupNorm(2, c),
    )()
    assert any(isinstance(m, nn.PReLU) and m.num_parameters == 8 for m in net.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    bireal = ModelConstructor(block="bireal", layers=(1, 1), widths=(8, 16), stem="small", stem_width=8)()
    assert sum(isinstance(m, BiRealBlock) for m in bireal.modules()) == 2
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown conv_layer"):
        ModelConstructor(conv_layer="ternary")()
    with pytest.raises(ValueError, match="unknown block"):
        ModelConstructor(block="bottleneck")()


def test_float_twin_has_no_binary_layer():
    twin = models.create("birealnet18", conv_layer="float")
    assert binary_layers(twin) == []
    assert sum(p.numel() for p in twin.parameters()) == sum(
        p.numel() for p in models.create("birealnet18").parameters()
    )


@pytest.mark.parametrize("name", models.names())
def test_packs_with_the_engine_bit_identical_in_both_layouts(name):
    """Every zoo model, with BatchNorm statistics that put values near 0, gives the model's bits."""
    from onebit import engine

    torch.manual_seed(0)
    x = example(name, batch=2)
    model = models.create(name, in_channels=x.shape[1]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    packed = engine.pack(model, x)
    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            xx = x.contiguous(memory_format=fmt)
            assert torch.equal(packed(xx), model(xx))


def test_affine_pre_sign_shifts_and_scales_the_sign_path_only():
    torch.manual_seed(0)

    def conv(c_in, c_out, stride):
        return QConv2d(
            c_in,
            c_out,
            3,
            stride=stride,
            padding=1,
            bias=False,
            input_quantizer="approx_sign",
            weight_quantizer="magnitude_aware_sign",
        )

    block = BiRealBlock(8, 8, 1, conv=conv, act_fn="prelu", norm_layer=nn.BatchNorm2d, pre_sign="affine")
    assert type(block.pre) is nn.Conv2d and block.pre.groups == 8  # a depthwise 1x1 conv: a float op for every tool
    assert torch.equal(block.pre.weight, torch.ones(8, 1, 1, 1)) and torch.equal(block.pre.bias, torch.zeros(8))
    with torch.no_grad():
        block.pre.weight.uniform_(0.5, 2.0)
        block.pre.bias.uniform_(-0.5, 0.5)
        block.bn.running_mean.uniform_(-0.3, 0.3)
        block.act.weight.uniform_(-0.5, 0.5)
    block.eval()
    x = torch.randn(2, 8, 6, 6)
    a, b = block.pre.weight.view(1, 8, 1, 1), block.pre.bias.view(1, 8, 1, 1)
    signs = torch.where(a * x + b >= 0, 1.0, -1.0)  # the cut moves to x = -b/a, per channel
    w = block.conv.weight
    w_q = w.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
    bn = block.bn
    y = (torch.nn.functional.conv2d(signs, w_q, padding=1) - bn.running_mean.view(1, 8, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, 8, 1, 1) + bn.eps
    ) * bn.weight.view(1, 8, 1, 1) + bn.bias.view(1, 8, 1, 1)
    s = y + x  # the shortcut carries x itself, not the shifted x
    slope = block.act.weight.view(1, 8, 1, 1)
    expected = torch.where(s >= 0, s, slope * s)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_pre_sign_is_off_by_default_and_only_for_blocks_with_a_sign_path():
    plain = models.create("birealnet_small", in_channels=1)
    assert not any(".pre." in k for k in plain.state_dict())  # existing runs load unchanged
    react = models.create("birealnet_small_react", in_channels=1)
    blocks = [m for m in react.modules() if isinstance(m, BiRealBlock)]
    assert len(blocks) == 6 and all(
        isinstance(b.act, nn.PReLU) and b.act.num_parameters == b.out_channels for b in blocks
    )
    assert [b.pre.in_channels for b in blocks] == [32, 32, 32, 64, 64, 128]
    assert len(binary_layers(react)) == 6
    wide = models.create("birealnet_small_react_wide", in_channels=1)
    wide_blocks = [m for m in wide.modules() if isinstance(m, BiRealBlock)]
    assert [b.pre.in_channels for b in wide_blocks] == [32, 48, 48, 96, 96, 192]  # the stem stays 32 wide
    assert [b.out_channels for b in wide_blocks] == [48, 48, 96, 96, 192, 192]
    assert len(binary_layers(wide)) == 6
    with pytest.raises(ValueError, match="no sign path"):
        ModelConstructor(block="basic", layers=(1,), widths=(8,), pre_sign="affine")()
    with pytest.raises(ValueError, match="unknown pre_sign"):
        models.create("birealnet_small", pre_sign="rsign")
