"""TwistConv2d computes ConvTwist as its post defines it: permuted groups, one twist kernel and its
rotation, coordinate maps over the output grid, Euler iterations; binary use."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit import models
from onebit.math import sign
from onebit.nn.twist import TwistConv2d, auto_groups, coordinate_maps


class PostConvTwist(nn.Module):
    """A plain transcription of the post's ConvTwist forward (the permutation as a full
    block-off-diagonal kernel at groups=1, numpy coordinate maps), independent of onebit's code."""

    def __init__(self, ni, nf, stride=1, groups=1, iters=4, twist=True):
        super().__init__()
        self.same = ni == nf and stride == 1
        self.groups, self.iters, self.stride, self.twist = groups, iters, stride, twist
        self.conv = nn.Conv2d(ni, nf, 3, stride=stride, padding=1, bias=False, groups=groups)
        self.coeff_Ax = nn.Parameter(torch.zeros(nf, ni // groups))
        self.coeff_Ay = nn.Parameter(torch.zeros(nf, ni // groups))

    def kernel(self, cx, cy):
        dx = torch.Tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        dy = torch.Tensor([[1, 2, 1], [0, 0, 0], [-1, -2, -1]])
        return cx[:, :, None, None] * dx + cy[:, :, None, None] * dy

    def full_kernel(self, k):
        if self.groups == 1:
            return k
        n = self.groups
        a, b = k.shape[0] // n, k.shape[1]
        full = torch.zeros(a * n, b * n, 3, 3)
        for i in range(n):
            j = (i - 1) % n
            full[a * i : a * (i + 1), b * j : b * (j + 1)] = k[a * i : a * (i + 1)]
        return full

    def _conv(self, x, k=None):
        k = self.conv.weight if k is None else k
        return F.conv2d(x, self.full_kernel(k), padding=1, stride=self.stride)

    def forward(self, inpt):
        out = self._conv(inpt)
        if not self.twist:
            return out
        _, _, h, w = out.shape
        XX = torch.from_numpy(np.indices((1, 1, h, w))[3] * 2 / w - 1).type(out.dtype)
        YY = torch.from_numpy(np.indices((1, 1, h, w))[2] * 2 / h - 1).type(out.dtype)
        kx = self.kernel(self.coeff_Ax, self.coeff_Ay)
        ky = kx.transpose(2, 3).flip(3)
        out = out + XX * self._conv(inpt, kx) + YY * self._conv(inpt, ky)
        if self.same and self.iters > 1:
            out = inpt + out / self.iters
            for _ in range(self.iters - 1):
                out = out + (self._conv(out) + XX * self._conv(out, kx) + YY * self._conv(out, ky)) / self.iters
            out = out - inpt
        return out


def post_twin(layer: TwistConv2d) -> PostConvTwist:
    post = PostConvTwist(layer.in_channels, layer.out_channels, layer.stride[0], layer.groups, layer.iters, layer.twist)
    with torch.no_grad():
        post.conv.weight.copy_(layer.weight)
        if layer.twist:
            post.coeff_Ax.copy_(layer.coeff_x)
            post.coeff_Ay.copy_(layer.coeff_y)
    return post


@pytest.mark.parametrize(
    "c_in, c_out, groups, stride, iters",
    [
        (8, 8, 2, 1, 4),
        (8, 8, 2, 1, 1),
        (12, 12, 3, 1, 2),
        (8, 16, 2, 1, 4),
        (16, 8, 4, 2, 4),
        (6, 6, 1, 1, 3),
        (64, 64, "auto", 1, 4),
        (128, 64, "auto", 2, 4),
        (16, 16, "auto", 1, 4),
        (4, 6, 2, 2, 1),
    ],
)
def test_twist_conv_equals_the_posts_conv_twist(c_in, c_out, groups, stride, iters):
    torch.manual_seed(0)
    layer = TwistConv2d(c_in, c_out, stride=stride, groups=groups, iters=iters)
    x = torch.randn(2, c_in, 9, 7)
    expected = post_twin(layer)(x)
    out = layer(x)
    assert out.shape == expected.shape == nn.Conv2d(c_in, c_out, 3, stride, 1)(x).shape
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_without_the_twist_it_is_the_posts_permuted_grouped_conv():
    torch.manual_seed(0)
    layer = TwistConv2d(8, 8, groups=4, twist=False)  # iters=4 is ignored: the post returns the conv
    x = torch.randn(2, 8, 6, 5)
    assert not hasattr(layer, "coeff_x")
    assert torch.allclose(layer(x), post_twin(layer)(x), atol=1e-5)
    assert torch.allclose(layer(x), F.conv2d(x, layer.dense_weight(), padding=1), atol=1e-5)


def test_defaults_and_parameters_follow_the_post():
    torch.manual_seed(0)
    layer = TwistConv2d(64, 64)
    assert layer.iters == 4 and layer.groups == 2 and layer.twist and layer.permute
    assert [n for n, _ in layer.named_parameters()] == ["weight", "coeff_x", "coeff_y"]
    assert layer.weight.shape == (64, 32, 3, 3) and layer.coeff_x.shape == layer.coeff_y.shape == (64, 32)
    bound = 1 / (32 * 9) ** 0.5  # nn.Conv2d's kaiming-uniform bound for a fan-in of 32 * 9
    assert layer.weight.abs().max() <= bound
    std = layer.weight.std().item()  # the coefficients are N(0, std(weight))
    assert 0.8 * std < layer.coeff_x.std().item() < 1.2 * std and abs(layer.coeff_y.mean().item()) < 0.2 * std


@pytest.mark.parametrize(
    "c_in, c_out, expected", [(64, 64, 2), (128, 256, 4), (256, 64, 8), (32, 32, 1), (48, 96, 1), (64, 3, 1)]
)
def test_auto_groups_follow_the_posts_rule(c_in, c_out, expected):
    assert auto_groups(c_in, c_out) == expected
    assert TwistConv2d(c_in, c_out, groups="auto").groups == expected


def test_coordinate_maps_span_the_output_grid_from_minus_one():
    xs, ys = coordinate_maps(torch.zeros(2, 3, 4, 5))
    assert xs.shape == ys.shape == (1, 1, 4, 5)
    assert torch.equal(xs[0, 0, 0], torch.tensor([-1.0, -0.6, -0.2, 0.2, 0.6]))
    assert torch.equal(ys[0, 0, :, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5]))


def test_the_y_kernel_is_the_x_kernel_rotated_by_90_degrees():
    torch.manual_seed(0)
    layer = TwistConv2d(4, 4, groups=2)
    kx, ky = layer.twist_kernels()
    assert torch.equal(ky, torch.rot90(kx, -1, dims=(2, 3)))
    a, b = layer.coeff_x.detach()[0, 0], layer.coeff_y.detach()[0, 0]
    dx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    dy = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
    assert torch.allclose(kx[0, 0], a * dx + b * dy) and torch.allclose(ky[0, 0], b * dx - a * dy)


def test_output_group_reads_only_the_previous_input_group():
    torch.manual_seed(0)
    layer = TwistConv2d(6, 6, groups=3, iters=1)
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


def test_iterations_need_equal_shapes_else_one_pass():
    torch.manual_seed(0)
    for c_out, stride in [(8, 1), (4, 2)]:
        layer = TwistConv2d(4, c_out, stride=stride, iters=4)
        x = torch.randn(1, 4, 6, 6)
        assert not layer.iterates and torch.equal(layer(x), layer.step(x))
    layer = TwistConv2d(4, 4, iters=3)
    x = torch.randn(1, 4, 6, 6)
    z = x + layer.step(x) / 3
    for _ in range(2):
        z = z + layer.step(z) / 3
    assert layer.iterates and torch.equal(layer(x), z - x)


def test_binary_twist_quantizes_inputs_weights_and_coefficients():
    torch.manual_seed(0)
    layer = TwistConv2d(4, 6, groups=2, input_quantizer="ste_sign", weight_quantizer="ste_sign")
    twin = TwistConv2d(4, 6, groups=2)
    with torch.no_grad():
        twin.weight.copy_(sign(layer.weight))
        twin.coeff_x.copy_(sign(layer.coeff_x))
        twin.coeff_y.copy_(sign(layer.coeff_y))
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(layer(x), twin(sign(x)), atol=1e-5)
    weights = [p.detach().clone() for p in layer.parameters()]
    layer(x).square().sum().backward()
    for p, before in zip(layer.parameters(), weights):
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert torch.equal(p.detach(), before)  # forward never writes latent weights


def test_magnitude_aware_weights_scale_the_conv_of_the_levels():
    torch.manual_seed(0)
    layer = TwistConv2d(4, 4, groups=2, iters=1, twist=False, weight_quantizer="magnitude_aware_sign")
    x = torch.randn(2, 4, 5, 5)
    alpha = layer.weight.detach().abs().mean(dim=(1, 2, 3))
    xp = torch.cat([x[:, 2:], x[:, :2]], dim=1)
    expected = F.conv2d(xp, sign(layer.weight.detach()), padding=1, groups=2) * alpha.view(1, -1, 1, 1)
    assert torch.equal(layer(x), expected)


def test_bad_arguments_and_inputs_are_named():
    with pytest.raises(ValueError, match="3x3"):
        TwistConv2d(4, 4, kernel_size=5, padding=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        TwistConv2d(3, 4, groups=2)
    with pytest.raises(ValueError, match="no bias"):
        TwistConv2d(4, 4, bias=True)
    with pytest.raises(ValueError, match="4 channels"):
        TwistConv2d(4, 4)(torch.randn(1, 3, 5, 5))


def test_accepts_the_conv2d_arguments_a_constructor_passes():
    layer = TwistConv2d(8, 8, 3, stride=1, padding=1, bias=False)
    assert layer.bias is None and layer(torch.randn(1, 8, 4, 4)).shape == (1, 8, 4, 4)


def test_traces_with_fx():
    layer = TwistConv2d(4, 4, groups=2, iters=2, input_quantizer="ste_sign", weight_quantizer="ste_sign")
    traced = torch.fx.symbolic_trace(layer)
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(traced(x), layer(x))


def test_zoo_with_twist_convs_trains():
    torch.manual_seed(0)
    model = models.ModelConstructor(
        block="bireal", layers=(1, 1), widths=(8, 16), stem="small", stem_width=8, conv_layer="twist", num_classes=2
    )()
    assert any(isinstance(m, TwistConv2d) and m.iterates for m in model.modules())
    x = torch.randn(16, 3, 8, 8)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()  # a learnable rule
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
