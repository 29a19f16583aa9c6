"""binarize(): a new model whose convs and linears are binary, the original untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import sign_reference
from onebit import binarize, quant
from onebit.nn import QConv1d, QConv2d, QConv3d, QLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4, bias=False),
            nn.BatchNorm2d(12),
            nn.Conv2d(12, 12, 1),
        )
        self.seq = nn.Conv1d(4, 4, 3, padding=1)
        self.vol = nn.Conv3d(2, 2, 3, padding=1, padding_mode="replicate")
        self.fc = nn.Linear(12, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(self.fc(x.mean(dim=(2, 3))))


def test_every_conv_and_linear_but_first_and_last_becomes_binary():
    model = Net()
    b = binarize(model)
    assert type(b.stem) is nn.Conv2d and type(b.head) is nn.Linear
    assert isinstance(b.body[1], QConv2d) and isinstance(b.body[3], QConv2d)
    assert isinstance(b.seq, QConv1d) and isinstance(b.vol, QConv3d) and isinstance(b.fc, QLinear)
    assert isinstance(b.body[0], nn.BatchNorm2d)


def test_hyperparameters_and_weights_are_copied():
    model = Net()
    b = binarize(model)
    for name in ("body.1", "body.3", "seq", "vol"):
        old, new = model.get_submodule(name), b.get_submodule(name)
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
        ):
            assert getattr(old, attr) == getattr(new, attr), (name, attr)
        assert (old.bias is None) == (new.bias is None)
        assert torch.equal(old.weight, new.weight) and old.weight.data_ptr() != new.weight.data_ptr()
        assert isinstance(new.input_quantizer, quant.Sign) and isinstance(new.weight_quantizer, quant.Sign)
        assert new.pad_value == 0.0


def test_the_original_model_is_untouched():
    model = Net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    binarize(model, keep_first=False, keep_last=False)
    assert {n: type(m) for n, m in model.named_modules()} == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_binarized_layer_computes_signs_of_input_and_weight():
    model = Net().eval()
    b = binarize(model).eval()
    x = torch.randn(2, 8, 9, 9)
    layer = model.body[1]
    expected = F.conv2d(F.pad(sign_reference(x), (2, 2, 2, 2)), sign_reference(layer.weight), None, 2, 0, 2, 4)
    assert torch.equal(b.body[1](x), expected)


def test_keep_first_and_keep_last_can_be_turned_off():
    b = binarize(Net(), keep_first=False, keep_last=False)
    assert isinstance(b.stem, QConv2d) and isinstance(b.head, QLinear)


def test_exclude_by_name_and_pattern():
    b = binarize(Net(), exclude=["fc", "body.*"])
    assert type(b.fc) is nn.Linear and type(b.body[1]) is nn.Conv2d and isinstance(b.seq, QConv1d)


def test_exclude_of_an_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="'nonexistent'"):
        binarize(Net(), exclude=["nonexistent"])


def test_quantizer_options():
    b = binarize(Net(), input_quantizer=None, weight_quantizer="magnitude_aware_sign")
    assert b.fc.input_quantizer is None and isinstance(b.fc.weight_quantizer, quant.MagnitudeAwareSign)
    shared = quant.ApproxSign()
    b = binarize(Net(), input_quantizer=shared)
    assert isinstance(b.fc.input_quantizer, quant.ApproxSign)
    assert b.fc.input_quantizer is not b.seq.input_quantizer  # one quantizer module per layer
    with pytest.raises(ValueError, match="unknown quantizer"):
        binarize(Net(), weight_quantizer="nope")


def test_a_bare_layer_is_converted_when_asked():
    conv = nn.Conv2d(3, 4, 3)
    assert type(binarize(conv)) is nn.Conv2d
    assert isinstance(binarize(conv, keep_first=False, keep_last=False), QConv2d)


def test_training_mode_and_requires_grad_are_preserved():
    model = Net().eval()
    model.fc.weight.requires_grad_(False)
    b = binarize(model)
    assert not b.training and not b.fc.training and not b.fc.weight.requires_grad


def test_state_dict_keys_survive_conversion():
    model = Net()
    b = binarize(model, keep_first=False, keep_last=False)
    assert list(b.state_dict()) == list(model.state_dict())
    b.load_state_dict(model.state_dict())


def test_binarized_model_trains_end_to_end():
    model = binarize(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("seq", "vol")):
            continue  # not on the forward path of Net
        assert p.grad is not None, name
    opt.step()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = self.a  # the same module under a second name
        self.blocks = nn.Sequential(self.a, nn.ReLU(), self.a)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.blocks(self.b(self.a(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_a_tied_module_becomes_one_binary_module_under_every_name():
    model = Tied()
    b = binarize(model)
    assert isinstance(b.a, QConv2d)
    assert b.a is b.b and b.blocks[0] is b.a and b.blocks[2] is b.a
    assert len([m for m in b.modules() if isinstance(m, QConv2d)]) == 1
    assert torch.equal(b.a.weight, model.a.weight)
    x = torch.randn(2, 3, 6, 6)
    conv = b.a  # forward: a, b, a, relu, a -- four calls of the one binary conv
    h = F.relu(conv(conv(conv(b.stem(x)))))
    assert torch.equal(b(x), b.head(conv(h).mean(dim=(2, 3))))


def test_a_tied_module_excluded_under_its_second_name_stays_float():
    b = binarize(Tied(), exclude=["b"])
    assert type(b.a) is nn.Conv2d and b.a is b.b and b.blocks[0] is b.a


def test_exclude_takes_a_string_as_one_pattern():
    model = Net()
    b = binarize(model, exclude="fc")
    assert type(b.fc) is nn.Linear and isinstance(b.seq, QConv1d)
    b = binarize(model, exclude="body.*")
    assert type(b.body[1]) is nn.Conv2d and isinstance(b.fc, QLinear)
    with pytest.raises(ValueError, match="'nope'"):
        binarize(model, exclude="nope")
