"""merge_batchnorm / fold_thresholds: same outputs while merged, bit-exact model after remove()."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit import models
from onebit.canonize import (
    CanonizationWarning,
    CompositeHandle,
    HandleOrderError,
    MergeBatchNorm,
    ThresholdedReLU,
    UnmergeableError,
    canonize,
    merge_batchnorm,
)
from onebit.nn import QConv2d, QLinear

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_batchnorms(model: nn.Module, eps: float | None = None, negative: bool = True) -> nn.Module:
    """Random statistics and affine parameters; about a third of the scales negative."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, BN_TYPES):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                if m.weight is not None:
                    w = torch.rand(c, generator=g) * 1.5 + 0.25
                    if negative:
                        w = torch.where(torch.rand(c, generator=g) < 0.35, -w, w)
                    m.weight.copy_(w)
                    m.bias.copy_(torch.randn(c, generator=g))
            if eps is not None:
                m.eps = eps
    return model.eval()


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_exact(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def assert_merged_identity(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, BN_TYPES):
            assert m.eps == 0.0, name
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean)), name
            assert torch.equal(m.running_var, torch.ones_like(m.running_var)), name
            if m.weight is not None:
                assert torch.equal(m.weight, torch.ones_like(m.weight)), name
                assert torch.equal(m.bias, torch.zeros_like(m.bias)), name


def check_roundtrip(model: nn.Module, x: torch.Tensor, identity: bool = True) -> CompositeHandle:
    """Outputs before == during (1e-5) and == after (bit for bit); state_dict restored exactly."""
    eps_before = {n: m.eps for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    with torch.no_grad():
        y0 = model(x)
    before = snapshot(model)
    handle = merge_batchnorm(model)
    assert handle.registered
    with torch.no_grad():
        y1 = model(x)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    if identity:
        assert_merged_identity(model)
        # the merged BatchNorms may be dropped: they are exactly the identity map
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                spatial = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}[type(m)]
                probe = torch.randn(4, m.num_features, *([3] * spatial))
                assert torch.equal(m(probe), probe)
    handle.remove()
    assert not handle.registered
    with torch.no_grad():
        y2 = model(x)
    assert torch.equal(y2, y0)
    assert_bit_exact(model, before)
    assert {n: m.eps for n, m in model.named_modules() if isinstance(m, BN_TYPES)} == eps_before
    assert not any(m._forward_hooks for m in model.modules())
    return handle


# --------------------------------------------------------------------------- left merges


@pytest.mark.parametrize("bias", [True, False])
def test_conv_then_batchnorm_merges_left(bias):
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8)))
    check_roundtrip(model, torch.randn(4, 3, 9, 9))


def test_linear_then_batchnorm_merges_left():
    model = randomize_batchnorms(nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)))
    check_roundtrip(model, torch.randn(5, 10))


def test_large_eps_is_accounted_for():
    model = randomize_batchnorms(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)), eps=1e-3
    )
    with torch.no_grad():
        model[1].running_var.mul_(1e-3)  # eps is now as large as the variance: dropping it would be visible
    check_roundtrip(model, torch.randn(2, 3, 8, 8))


def test_input_binary_layer_then_batchnorm_merges_left():
    """A sign on the input happens before the weights, so the merge stays exact."""
    conv = QConv2d(4, 6, 3, padding=1, input_quantizer="ste_sign", pad_value=-1.0)
    model = randomize_batchnorms(nn.Sequential(conv, nn.BatchNorm2d(6)))
    check_roundtrip(model, torch.randn(3, 4, 7, 7))


# --------------------------------------------------------------------------- right merges


def test_batchnorm_then_padded_strided_conv_needs_and_gets_a_bias_map():
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, padding=2)))
    x = torch.randn(3, 4, 11, 11)
    y0 = model(x).detach()
    # the naive merge (constant bias) is wrong on the border: the test can tell
    s = model[0].weight / torch.sqrt(model[0].running_var + model[0].eps)
    t = model[0].bias - model[0].running_mean * s
    naive = F.conv2d(
        x,
        model[1].weight * s.view(1, -1, 1, 1),
        model[1].bias + (model[1].weight * t.view(1, -1, 1, 1)).sum((1, 2, 3)),
        2,
        2,
    )
    assert (naive - y0).abs().max() > 1e-2
    check_roundtrip(model, x)
    # a second input size gets its own map
    check_roundtrip(model, torch.randn(2, 4, 6, 9))


CONV_CASES = [
    dict(cls=nn.Conv2d, k=3, stride=2, padding=2, dilation=1, groups=1, mode="zeros"),
    dict(cls=nn.Conv2d, k=3, stride=1, padding=2, dilation=2, groups=2, mode="zeros"),
    dict(cls=nn.Conv2d, k=(3, 1), stride=(2, 1), padding=(1, 0), dilation=1, groups=4, mode="zeros"),
    dict(cls=nn.Conv2d, k=3, stride=1, padding="same", dilation=1, groups=1, mode="zeros"),
    dict(cls=nn.Conv2d, k=3, stride=1, padding=1, dilation=1, groups=1, mode="reflect"),
    dict(cls=nn.Conv2d, k=3, stride=2, padding=1, dilation=1, groups=2, mode="circular"),
    dict(cls=nn.Conv1d, k=5, stride=3, padding=3, dilation=1, groups=1, mode="zeros"),
    dict(cls=nn.Conv3d, k=3, stride=2, padding=1, dilation=1, groups=1, mode="replicate"),
    dict(cls=nn.Conv3d, k=3, stride=1, padding=1, dilation=1, groups=2, mode="zeros"),
]


@pytest.mark.parametrize(
    "case",
    CONV_CASES,
    ids=lambda c: f"{c['cls'].__name__}-s{c['stride']}-p{c['padding']}-d{c['dilation']}-g{c['groups']}-{c['mode']}",
)
def test_batchnorm_then_any_conv_merges_right(case):
    cls = case["cls"]
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[cls]
    bn = BN_TYPES[nd - 1](4)
    conv = cls(
        4,
        8,
        case["k"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        padding_mode=case["mode"],
    )
    model = randomize_batchnorms(nn.Sequential(bn, conv))
    check_roundtrip(model, torch.randn(2, 4, *([7] * nd)))


def test_batchnorm_then_float_qconv_with_pad_value_merges_right():
    conv = QConv2d(4, 5, 3, padding=1, pad_value=1.0)  # float input and weights, +1 padding
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(4), conv))
    check_roundtrip(model, torch.randn(2, 4, 6, 6))


def test_batchnorm_then_linear_merges_right():
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm1d(7), nn.Linear(7, 3, bias=False)))
    check_roundtrip(model, torch.randn(6, 7))


def test_unbatched_input_through_bias_map():
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)))
    x = torch.randn(1, 3, 5, 5)
    with merge_batchnorm(model):
        merged_conv = model[1]
        y = merged_conv(model[0](x))[0]
        torch.testing.assert_close(merged_conv(x[0]), y)


# --------------------------------------------------------------------------- through ReLU and pooling


def test_batchnorm_relu_conv_with_negative_scales_becomes_thresholded_relu():
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)))
    assert (model[0].weight < 0).any() and (model[0].weight > 0).any()
    relu = model[1]
    x = torch.randn(3, 6, 8, 8)
    y0 = model(x).detach()
    with merge_batchnorm(model) as handle:
        assert isinstance(model[1], ThresholdedReLU)
        torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
        direction = model[1].direction
        assert set(direction.tolist()) == {-1.0, 1.0}
        assert "1.threshold" in model.state_dict()
    assert model[1] is relu and not handle.registered
    check_roundtrip(model, x)


def test_zero_batchnorm_scale_becomes_a_constant_in_the_next_layer():
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)))
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.7  # channel 1 is the constant relu(0.7) everywhere, zero on the padding
    check_roundtrip(model, torch.randn(2, 4, 6, 6))


@pytest.mark.parametrize("pool", ["adaptive", "avgpool"])
def test_batchnorm_relu_avgpool_linear_with_negative_scales(pool):
    p = nn.AdaptiveAvgPool2d(2) if pool == "adaptive" else nn.AvgPool2d(2)
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(5), nn.ReLU(), p, nn.Flatten(), nn.Linear(20, 3)))
    check_roundtrip(model, torch.randn(4, 5, 4, 4))


class FunctionalHead(nn.Module):
    """torchvision-DenseNet style head: F.relu, pooling and flatten are calls in forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(6)
        self.act = nn.ReLU()
        self.norm5 = nn.BatchNorm2d(6)
        self.classifier = nn.Linear(6, 4)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = self.norm5(x)
        x = F.relu(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def test_functional_relu_head_is_merged_with_the_threshold_in_the_batchnorm():
    model = randomize_batchnorms(FunctionalHead())
    del model.norm  # unused
    x = torch.randn(3, 3, 6, 6)
    y0 = model(x).detach()
    with merge_batchnorm(model):
        torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
        assert model.norm5.eps == 0.0 and set(model.norm5.weight.tolist()) <= {-1.0, 1.0}
    check_roundtrip(model, x, identity=False)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 8, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(6)
        self.layers = nn.ModuleList([DenseLayer(6 + 4 * i, 4) for i in range(3)])
        self.transition = nn.Sequential(nn.BatchNorm2d(18), nn.ReLU(), nn.Conv2d(18, 9, 1), nn.AvgPool2d(2))
        self.norm_final = nn.BatchNorm2d(9)
        self.relu_final = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(9, 5)

    def forward(self, x):
        features = [self.stem_norm(self.stem(x))]
        for layer in self.layers:
            features.append(layer(features))
        x = self.transition(torch.cat(features, 1))
        x = self.pool(self.relu_final(self.norm_final(x)))
        return self.classifier(torch.flatten(x, 1))


def test_densenet_style_graph_is_fully_canonized():
    model = randomize_batchnorms(DenseNetish())
    x = torch.randn(2, 3, 8, 8)
    check_roundtrip(model, x)
    with merge_batchnorm(model):
        assert isinstance(model.layers[0].relu1, ThresholdedReLU)
        assert isinstance(model.relu_final, ThresholdedReLU)
        assert model.stem.bias is not None  # the left merge gave the bias-less stem a bias
        assert "stem.bias" in model.state_dict()
    assert model.stem.bias is None and "stem.bias" not in model.state_dict()


# --------------------------------------------------------------------------- handles


def test_state_dict_is_in_sync_while_merged():
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 2, 1),
            nn.Flatten(),
            nn.BatchNorm1d(2 * 36),
            nn.Linear(72, 3),
        )
    )
    x = torch.randn(2, 3, 8, 8)
    with merge_batchnorm(model):
        merged = model(x).detach()
        state = copy.deepcopy(model.state_dict())
    fresh = copy.deepcopy(model)
    fresh[0].bias = nn.Parameter(torch.zeros(4))
    fresh.load_state_dict(state)
    fresh[1].eps = fresh[5].eps = 0.0  # eps is an attribute, not part of a state_dict
    torch.testing.assert_close(fresh(x), merged, atol=0, rtol=0)


def test_handle_is_a_context_manager_and_remove_is_idempotent():
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = snapshot(model)
    with merge_batchnorm(model) as handle:
        assert isinstance(handle, CompositeHandle) and len(handle) == 1
    handle.remove()
    assert_bit_exact(model, before)
    handle.register()  # registers again from the original model
    assert_merged_identity(model)
    handle.remove()
    assert_bit_exact(model, before)


def _bn_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)
    )
    return randomize_batchnorms(model, eps=1e-3).eval()


def _state(model: nn.Module) -> tuple[dict, dict]:
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    return snapshot(model), eps


def test_removing_a_handle_under_a_later_one_raises_and_changes_nothing():
    model = _bn_model()
    before, eps = _state(model)
    h1 = merge_batchnorm(model)
    h1.remove()
    h2 = merge_batchnorm(model)
    h1.register()  # stacks on h2's changes
    during, eps_during = _state(model)
    with pytest.raises(HandleOrderError, match="remove it first"):
        h2.remove()
    assert h2.registered and h1.registered
    assert_bit_exact(model, during)
    assert _state(model)[1] == eps_during
    h1.remove()
    h2.remove()
    assert_bit_exact(model, before)
    assert _state(model)[1] == eps
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (0, 2, 1)])
def test_stacked_handles_removed_in_any_order_end_exact_or_raise_first(order):
    model = _bn_model()
    before, eps = _state(model)
    handles = [merge_batchnorm(model)]
    handles[0].remove()
    handles += [merge_batchnorm(model), merge_batchnorm(model)]  # the last two merge identities
    handles[0].register()
    pending = list(order)
    while pending:
        for i in list(pending):
            state = _state(model)
            try:
                handles[i].remove()
            except HandleOrderError:
                assert_bit_exact(model, state[0])
                assert _state(model)[1] == state[1]
                continue
            pending.remove(i)
    assert_bit_exact(model, before)
    assert _state(model)[1] == eps


def test_handles_on_separate_models_are_removed_in_any_order():
    a, b = _bn_model(), _bn_model()
    before_a, before_b = snapshot(a), snapshot(b)
    ha, hb = merge_batchnorm(a), merge_batchnorm(b)
    ha.remove()
    hb.remove()
    assert_bit_exact(a, before_a)
    assert_bit_exact(b, before_b)


def test_two_merges_touching_one_layer_come_back_bit_exact():
    # the conv is the right-merge target of bn_in and the left-merge target of bn_out
    model = randomize_batchnorms(
        nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3, padding=1, stride=2), nn.BatchNorm2d(5))
    )
    handle = check_roundtrip(model, torch.randn(2, 3, 7, 7))
    assert len(handle) == 2


def test_composed_canonizers_remove_in_reverse_order():
    model = randomize_batchnorms(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1))
    )
    x = torch.randn(2, 3, 8, 8)
    y0 = model(x).detach()
    before = snapshot(model)
    # the first pass merges bn1 left; the second pass finds bn2 (now fed by an identity BatchNorm) and merges it right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CanonizationWarning)
        handle = canonize(model, [MergeBatchNorm(skip_unmergeable=True), MergeBatchNorm(skip_unmergeable=True)])
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
    assert_merged_identity(model)
    handle.remove()
    assert_bit_exact(model, before)
    assert torch.equal(model(x), y0)


def test_merging_twice_does_not_merge_again():
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3)))
    before = snapshot(model)
    first = merge_batchnorm(model)
    second = merge_batchnorm(model)
    assert len(second) == 0
    second.remove()
    first.remove()
    assert_bit_exact(model, before)


# --------------------------------------------------------------------------- what cannot be merged


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.other(y)  # the conv's output feeds two layers; the BatchNorm feeds an add


def test_batchnorm_whose_input_feeds_several_layers_is_refused_with_its_name():
    model = randomize_batchnorms(Residual())
    before = snapshot(model)
    with pytest.raises(UnmergeableError, match=r"BatchNorm 'bn'.*also feeds Conv2d 'other'"):
        merge_batchnorm(model)
    assert_bit_exact(model, before)  # nothing changed


def test_train_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match="train mode"):
        merge_batchnorm(model)


def test_batchnorm_before_a_sign_input_layer_points_to_thresholds():
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(4),
            QConv2d(4, 4, 3, input_quantizer="ste_sign", weight_quantizer="ste_sign"),
        )
    )
    with pytest.raises(UnmergeableError, match="fold_thresholds"):
        merge_batchnorm(model)


def test_skip_leaves_unmergeable_batchnorms_alone_with_a_warning():
    model = randomize_batchnorms(models.create("lenet_binary", in_channels=1, width=4))
    x = torch.randn(3, 1, 8, 8)
    y0 = model(x).detach()
    before = snapshot(model)
    with pytest.warns(CanonizationWarning) as record:
        handle = merge_batchnorm(model, skip_unmergeable=True)
    warned = " ".join(str(w.message) for w in record)
    assert "BatchNorm '5'" in warned and "BatchNorm '9'" in warned
    # stem conv -> BN (left) and BN -> float classifier (right) are merged
    assert len(handle) == 2 and model[1].eps == 0.0 and model[14].eps == 0.0
    assert model[5].eps != 0.0
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert_bit_exact(model, before)


def test_negative_scale_before_max_pooling_is_refused():
    model = randomize_batchnorms(nn.Sequential(nn.BatchNorm2d(3), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1)))
    with torch.no_grad():
        model[0].weight[1] = -0.5
    with pytest.raises(UnmergeableError, match="max pooling"):
        merge_batchnorm(model)
    randomize_batchnorms(model, negative=False)
    check_roundtrip(model, torch.randn(2, 3, 6, 6))


# --------------------------------------------------------------------------- integer thresholds


def binary_block(pad_value=0.0):
    q = dict(input_quantizer="ste_sign", weight_quantizer="ste_sign", bias=False)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        QConv2d(8, 16, 3, padding=1, pad_value=pad_value, **q),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(16),
        QConv2d(16, 16, 3, padding=1, **q),
        nn.BatchNorm2d(16),
        nn.Flatten(),
        QLinear(16 * 16, 12, **q),
        nn.BatchNorm1d(12),
        QLinear(12, 4, **q),
    )


@pytest.mark.parametrize("pad_value", [0.0, -1.0])
def test_fold_thresholds_is_bit_exact_and_reversible(pad_value):
    from onebit.canonize import SignThreshold, fold_thresholds
    from onebit.thresholds import Thresholds

    model = randomize_batchnorms(binary_block(pad_value))
    with torch.no_grad():
        model[4].running_mean.mul_(9.0)  # thresholds across the accumulator range, some channels constant
        model[6].running_var.mul_(40.0)
    x = torch.randn(16, 1, 8, 8)
    y0 = model(x).detach()
    before = snapshot(model)
    with pytest.raises(UnmergeableError, match="BatchNorm '1'.*Conv2d '0'"):
        fold_thresholds(model)  # BN '1' sits on a float conv: its input is no integer accumulator
    assert_bit_exact(model, before)
    with pytest.warns(CanonizationWarning, match="BatchNorm '1'"):
        handle = fold_thresholds(model, skip_unmergeable=True)
    with handle:
        assert set(handle.thresholds) == {"4", "6", "9"}
        assert all(isinstance(t, Thresholds) for t in handle.thresholds.values())
        assert isinstance(model[4], SignThreshold) and isinstance(model[9], SignThreshold)
        assert torch.equal(model(x), y0)  # bit for bit
        # the thresholds reproduce sign(bn(acc)) on every accumulator value
        acc = torch.arange(-144, 145, dtype=torch.float32).view(1, 1, 1, -1).expand(1, 16, 1, -1)
        expected = torch.where(before_bn(before, "6", acc) < 0, -1.0, 1.0)
        assert torch.equal(model[6](acc), expected)
    assert isinstance(model[4], nn.BatchNorm2d)
    assert_bit_exact(model, before)


def before_bn(state, prefix, acc):
    return F.batch_norm(
        acc,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        False,
        0.0,
        1e-5,
    )


def test_fold_thresholds_refuses_a_batchnorm_on_a_float_accumulator():
    from onebit.canonize import fold_thresholds

    model = randomize_batchnorms(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), QConv2d(4, 2, 3, input_quantizer="ste_sign"))
    )
    with pytest.raises(UnmergeableError, match="not from a binary layer"):
        fold_thresholds(model)
    with pytest.warns(CanonizationWarning):
        assert len(fold_thresholds(model, skip_unmergeable=True)) == 0
