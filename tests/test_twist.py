"""TwistConv2d: permuted groups, the twist, residual iterations, binary use."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit.math import sign
from onebit.nn.twist import TwistConv2d, coordinate_maps, sobel_kernels


def reference_coordinates(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.tensor([(2 * i + 1) / w - 1 for i in range(w)]).view(1, 1, 1, w).expand(1, 1, h, w)
    ys = torch.tensor([(2 * i + 1) / h - 1 for i in range(h)]).view(1, 1, h, 1).expand(1, 1, h, w)
    return xs, ys


def block_off_diagonal(w: torch.Tensor, groups: int, c_in: int) -> torch.Tensor:
    """Full kernel where output group i reads input group i - 1 (independent of the layer's code)."""
    c_out = w.shape[0]
    go, gi = c_out // groups, c_in // groups
    full = torch.zeros(c_out, c_in, *w.shape[2:])
    for i in range(groups):
        j = (i - 1) % groups
        full[i * go : (i + 1) * go, j * gi : (j + 1) * gi] = w[i * go : (i + 1) * go]
    return full


def test_sobel_pair_is_a_derivative_and_its_rotation():
    kx, ky = sobel_kernels()
    assert torch.equal(ky, torch.rot90(kx, 1, dims=(0, 1)))
    ramp = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 5, 5)
    assert torch.allclose(F.conv2d(ramp, kx.view(1, 1, 3, 3))[0, 0], torch.full((3, 3), 1.0))


def test_coordinate_maps_are_pixel_centres_in_minus_one_one():
    xs, ys = coordinate_maps(torch.zeros(2, 3, 4, 5))
    rx, ry = reference_coordinates(4, 5)
    assert torch.allclose(xs, rx) and torch.allclose(ys, ry)


@pytest.mark.parametrize("groups", [2, 4])
def test_permuted_groups_equal_a_cyclic_block_off_diagonal_conv(groups):
    torch.manual_seed(0)
    layer = TwistConv2d(8, 12, groups=groups, twist=False)
    x = torch.randn(2, 8, 7, 6)
    full = block_off_diagonal(layer.weight.detach(), groups, 8)
    assert torch.allclose(layer(x), F.conv2d(x, full, padding=1), atol=1e-5)
    assert torch.equal(layer.dense_weight().detach(), full)


def test_output_group_reads_only_the_previous_input_group():
    torch.manual_seed(0)
    layer = TwistConv2d(6, 6, groups=3, twist=True)
    x = torch.randn(1, 6, 5, 5)
    x2 = x.clone()
    x2[:, 2:4] += 1.0  # change input group 1
    changed = (layer(x) - layer(x2)).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [False, False, False, False, True, True]  # only output group 2


def test_unpermuted_grouped_conv_matches_torch():
    torch.manual_seed(0)
    layer = TwistConv2d(8, 8, groups=4, twist=False, permute=False)
    x = torch.randn(1, 8, 6, 6)
    assert torch.allclose(layer(x), F.conv2d(x, layer.weight, padding=1, groups=4), atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_twist_adds_coordinate_weighted_derivative_convs(stride):
    torch.manual_seed(0)
    layer = TwistConv2d(4, 6, stride=stride, groups=2)
    x = torch.randn(2, 4, 9, 7)
    kx, ky = sobel_kernels()
    xp = torch.cat([x[:, 2:], x[:, :2]], dim=1)  # group i reads group i - 1
    main = F.conv2d(xp, layer.weight, None, stride, 1, 1, 2)
    gx = F.conv2d(xp, layer.twist_x * kx, None, stride, 1, 1, 2)
    gy = F.conv2d(xp, layer.twist_y * ky, None, stride, 1, 1, 2)
    xs, ys = reference_coordinates(*main.shape[2:])
    expected = main + xs * gx + ys * gy
    out = layer(x)
    assert out.shape == nn.Conv2d(4, 6, 3, stride, 1)(x).shape
    assert torch.allclose(out, expected, atol=1e-5)


def test_iterations_are_small_residual_steps():
    torch.manual_seed(0)
    layer = TwistConv2d(4, 4, groups=2, iters=3)
    x = torch.randn(1, 4, 5, 5)
    y = x
    for _ in range(3):
        y = y + layer.step(y) / 3
    assert torch.allclose(layer(x), y, atol=1e-6)
    with pytest.raises(ValueError, match="iters > 1"):
        TwistConv2d(4, 8, iters=2)
    with pytest.raises(ValueError, match="iters > 1"):
        TwistConv2d(4, 4, stride=2, iters=2)


def test_binary_twist_quantizes_inputs_weights_and_coefficients():
    torch.manual_seed(0)
    layer = TwistConv2d(4, 4, groups=2, input_quantizer="ste_sign", weight_quantizer="ste_sign")
    twin = TwistConv2d(4, 4, groups=2)
    with torch.no_grad():
        twin.weight.copy_(sign(layer.weight))
        twin.twist_x.copy_(sign(layer.twist_x))
        twin.twist_y.copy_(sign(layer.twist_y))
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(layer(x), twin(sign(x)), atol=1e-5)
    weights = [p.detach().clone() for p in layer.parameters()]
    layer(x).square().sum().backward()
    for p, before in zip(layer.parameters(), weights):
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert torch.equal(p.detach(), before)  # forward never writes latent weights


def test_bad_arguments_and_inputs_are_named():
    with pytest.raises(ValueError, match="3x3"):
        TwistConv2d(4, 4, kernel_size=5, padding=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        TwistConv2d(3, 4, groups=2)
    with pytest.raises(ValueError, match="4 channels"):
        TwistConv2d(4, 4)(torch.randn(1, 3, 5, 5))


def test_traces_with_fx():
    layer = TwistConv2d(4, 4, groups=2, iters=2, input_quantizer="ste_sign", weight_quantizer="ste_sign")
    traced = torch.fx.symbolic_trace(layer)
    x = torch.randn(1, 4, 5, 5)
    assert torch.allclose(traced(x), layer(x))
