"""int8 QConv2d / QLinear: ``conv(x_int, levels) / s * scale + bias``, an exact integer sum up to the
bound taps * 127^2 < 2^24 (1040 taps), and refused past it."""

import pytest
import torch
import torch.nn.functional as F

from onebit import quant
from onebit.nn import QConv2d, QLinear

INT8 = {"input_quantizer": "int8", "weight_quantizer": "int8_weight"}


def int8_reference(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 integer sum of the layer's integers, and from it the layer's output in float32:
    ``fl(fl(fl(acc / s) * scale) + bias)``."""
    s = layer.input_quantizer.divisor()
    x_int = torch.round(x.double() * s.double()).clamp(-127, 127)
    levels, scale = quant.Int8Weight().factor(layer.weight.detach())
    if isinstance(layer, QLinear):
        acc = x_int @ levels.double().T
        shape = [-1]
    else:
        acc = F.conv2d(x_int, levels.double(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
        shape = [-1, 1, 1]
    y = acc.float() / s * scale.reshape(shape)
    if layer.bias is not None:
        y = y + layer.bias.detach().reshape(shape)
    return acc, y


def extreme(layer, signs: torch.Tensor) -> torch.Tensor:
    """An input whose integers are +-127 with the given signs (far past the clip: clamped)."""
    return signs * (1000.0 * layer.input_quantizer.step.item() * 127)


def at_the_bound_conv() -> tuple[QConv2d, torch.Tensor]:
    """65 channels x 4 x 4 = 1040 taps, weights +-1 (levels +-127); output 0 sums +127 * 127 at every
    tap, output 1 -127 * 127, output 2 a random mix."""
    torch.manual_seed(0)
    layer = QConv2d(65, 3, 4, bias=True, **INT8).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.where(torch.rand(3, 65, 4, 4) < 0.5, -1.0, 1.0))
    signs = layer.weight.detach()[0].unsqueeze(0)
    x = torch.cat([extreme(layer, signs), extreme(layer, -signs), extreme(layer, torch.sign(torch.randn(1, 65, 4, 4)))])
    return layer, x


def test_an_int8_conv_at_the_bound_is_the_exact_integer_sum():
    layer, x = at_the_bound_conv()
    assert layer.taps() == 1040
    acc, want = int8_reference(layer, x)
    assert acc[0, 0].item() == 1040 * 127 * 127 == 16_774_160 < 2**24
    assert acc[1, 0].item() == -16_774_160
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, want)
    x_last = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(layer(x_last), want)


def test_an_int8_linear_at_the_bound_is_the_exact_integer_sum():
    torch.manual_seed(1)
    layer = QLinear(1040, 2, **INT8).eval()
    with torch.no_grad():
        layer.weight.copy_(torch.where(torch.rand(2, 1040) < 0.5, -1.0, 1.0))
    x = torch.stack([extreme(layer, layer.weight.detach()[0]), extreme(layer, -layer.weight.detach()[1])])
    acc, want = int8_reference(layer, x)
    assert acc[0, 0].item() == 16_774_160 and acc[1, 1].item() == -16_774_160
    with torch.no_grad():
        assert torch.equal(layer(x), want)


@pytest.mark.parametrize(
    "make",
    [
        lambda: QConv2d(6, 8, 3, stride=2, padding=1, **INT8),
        lambda: QConv2d(8, 4, 3, padding=2, dilation=2, groups=2, bias=False, **INT8),
        lambda: QLinear(20, 5, **INT8),
    ],
)
def test_an_int8_layer_is_its_integer_sum_then_three_roundings(make):
    torch.manual_seed(2)
    layer = make()
    x = torch.randn(3, 20) if isinstance(layer, QLinear) else torch.randn(3, layer.in_channels, 9, 9)
    layer(x * 1.3)  # calibrates on this first training batch
    layer.eval()
    x = x * 2.0  # beyond the calibrated range too: clamped
    _, want = int8_reference(layer, x)
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, want)
    plain = layer.input_quantizer(x)  # q_in(x) in float, against the float layer of q_w(W)
    if isinstance(layer, QLinear):
        float_y = F.linear(plain, layer.quantized_weight(), layer.bias)
    else:
        float_y = F.conv2d(
            plain, layer.quantized_weight(), layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
        )
    assert torch.allclose(y, float_y.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, taps, limit",
    [
        (lambda: QLinear(1041, 2, **INT8), 1041, 1040),
        (lambda: QConv2d(66, 3, 4, **INT8), 1056, 1040),
        (lambda: QConv2d(2082, 4, 1, groups=2, **INT8), 1041, 1040),
        (lambda: QConv2d(116, 4, 3, input_quantizer="absmax8", weight_quantizer="int8_weight"), 1044, 1032),
        (lambda: QLinear(132_105, 1, input_quantizer="int8", weight_quantizer="ste_sign"), 132_105, 132_104),
    ],
)
def test_a_layer_past_the_bound_is_refused_naming_its_taps_and_the_bound(make, taps, limit):
    with pytest.raises(ValueError, match=rf"{taps} taps per output, over the {limit} .* < 2\^24"):
        make()


def test_layers_at_the_bound_or_without_an_int8_code_are_built():
    QConv2d(2080, 4, 1, groups=2, **INT8)  # 1040 per group
    QLinear(132_104, 1, input_quantizer="int8", weight_quantizer="ste_sign")
    QLinear(5000, 2, input_quantizer="int8")  # float weights: no integer sum to bound
    QLinear(5000, 2, input_quantizer="ste_sign", weight_quantizer="ste_sign")


def test_an_int8_layer_trains_its_weight_and_step_and_calibrates_once():
    torch.manual_seed(3)
    layer = QConv2d(4, 6, 3, padding=1, **INT8)
    x = torch.randn(2, 4, 8, 8)
    layer(x).square().mean().backward()
    q = layer.input_quantizer
    assert bool(q.calibrated) and q.log_step.grad is not None and q.log_step.grad.item() != 0.0
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    step = q.step.detach().clone()
    layer(x * 3)
    assert torch.equal(q.step.detach(), step)
    keys = set(layer.state_dict())
    assert {"input_quantizer.log_step", "input_quantizer.calibrated", "weight"} <= keys
