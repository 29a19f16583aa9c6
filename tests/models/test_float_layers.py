"""float_layers="int8": the stem conv, the downsampling shortcut (and transition) convs and the
classifier of zoo models and of binarize()'s kept layers become int8 QConv2d / QLinear."""

import pytest
import torch
from torch import nn

from onebit import binarize, models, quant
from onebit.cli.train import parse_model_args
from onebit.models import ModelConstructor
from onebit.models.constructor import BiRealBlock
from onebit.nn import QConv2d, QLinear


def int8_layers(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (QConv2d, QLinear))
        and isinstance(m.input_quantizer, quant.Int8)
        and isinstance(m.weight_quantizer, quant.Int8Weight)
    ]


@pytest.mark.parametrize(
    "name, kept",
    [
        (
            "birealnet18",
            ["stem.conv", "stage2.0.shortcut.1", "stage3.0.shortcut.1", "stage4.0.shortcut.1", "head.fc"],
        ),
        (
            "birealnet_small_react_wide",
            ["stem.conv", "stage1.0.shortcut.1", "stage2.0.shortcut.1", "stage3.0.shortcut.1", "head.fc"],
        ),
        ("resnet18", ["stem.conv", "stage2.0.shortcut.0", "stage3.0.shortcut.0", "stage4.0.shortcut.0", "head.fc"]),
        ("binary_densenet28", ["stem.conv", "stage1.6.conv", "stage2.6.conv", "stage3.6.conv", "head.fc"]),
    ],
)
def test_int8_float_layers_are_exactly_the_layers_that_stay_float(name, kept):
    plain = models.create(name)
    int8 = models.create(name, float_layers="int8")
    assert int8_layers(int8) == kept
    assert int8_layers(plain) == []
    plain_modules, int8_modules = dict(plain.named_modules()), dict(int8.named_modules())
    for layer in kept:  # the same layer, quantized: same hyperparameters and weight shape
        assert type(plain_modules[layer]) in (nn.Conv2d, nn.Linear)
        assert plain_modules[layer].weight.shape == int8_modules[layer].weight.shape
        assert int8_modules[layer].extra_repr() == plain_modules[layer].extra_repr()
    others = [n for n in plain_modules if not any(n == k or n.startswith(k + ".") for k in kept)]
    assert [type(plain_modules[n]) for n in others] == [type(int8_modules[n]) for n in others]


def test_float_layers_default_is_float_and_unchanged():
    default, explicit = models.create("birealnet18"), models.create("birealnet18", float_layers="float")
    assert list(default.state_dict()) == list(explicit.state_dict())
    assert type(default.stem.conv) is nn.Conv2d and type(default.head.fc) is nn.Linear


def test_an_int8_zoo_model_trains_and_calibrates_its_int8_inputs():
    torch.manual_seed(0)
    model = models.create("birealnet_small_react_wide", in_channels=1, float_layers="int8")
    x = torch.randn(4, 1, 28, 28)
    model(x).logsumexp(dim=1).mean().backward()
    for name in int8_layers(model):
        layer = model.get_submodule(name)
        assert bool(layer.input_quantizer.calibrated), name
        assert layer.input_quantizer.log_step.grad is not None and layer.weight.grad is not None, name


@pytest.mark.parametrize("bad", ["int4", "INT8", 8, None])
def test_a_bad_float_layers_value_names_the_option_and_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"float_layers must be one of 'float', 'int8', got"):
        models.create("birealnet18", float_layers=bad)
    with pytest.raises(ValueError, match=r"binarize: float_layers must be one of 'float', 'int8', got"):
        binarize(nn.Sequential(nn.Linear(3, 3)), float_layers=bad)


def test_a_block_class_without_float_layers_is_refused_for_int8():
    class OwnBlock(BiRealBlock):
        def __init__(self, in_channels, out_channels, stride=1, *, conv, act_fn, norm_layer):
            super().__init__(in_channels, out_channels, stride, conv=conv, act_fn=act_fn, norm_layer=norm_layer)

    constructor = ModelConstructor(block=OwnBlock, layers=(1, 1), widths=(8, 16), stem="small", stem_width=8)
    constructor()  # float: built as before
    with pytest.raises(ValueError, match="float_layers='int8': block OwnBlock takes no float_layers"):
        constructor.replace(float_layers="int8")()


def test_the_command_line_model_argument_reaches_the_constructor():
    kwargs = parse_model_args(["float_layers=int8"])
    assert kwargs == {"float_layers": "int8"}
    assert len(int8_layers(models.create("birealnet_small", in_channels=1, **kwargs))) == 5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.side = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.side(self.body(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_binarize_puts_its_kept_layers_in_int8_with_their_weights():
    torch.manual_seed(1)
    model = Net()
    b = binarize(model, float_layers="int8", exclude=["side"])
    assert int8_layers(b) == ["stem", "side", "head"]
    assert isinstance(b.body.input_quantizer, quant.Sign)
    for name in ("stem", "side", "head"):
        assert torch.equal(b.get_submodule(name).weight, model.get_submodule(name).weight)
        assert torch.equal(b.get_submodule(name).bias, model.get_submodule(name).bias)
    assert b.stem._onebit_name == "stem"
    default = binarize(model)
    assert type(default.stem) is nn.Conv2d and type(default.head) is nn.Linear
    b(torch.randn(2, 3, 6, 6))


def test_binarize_refuses_an_int8_layer_past_the_bound_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(2000, 3))
    with pytest.raises(ValueError, match=r"float_layers='int8' cannot make layer '2' int8: .*2000 taps per output"):
        binarize(model, float_layers="int8")
