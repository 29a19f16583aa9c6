"""Bop, weight clipping, binary-parameter discovery and flip counting."""

import pytest
import torch
from torch import nn

from onebit.nn import QConv2d, QLinear
from onebit.nn.twist import TwistConv2d
from onebit.optim import Bop, FlipCounter, binary_parameters, clip_weights


def test_bop_moving_average_and_flip_rule_by_hand():
    w = nn.Parameter(torch.tensor([0.5, -0.5, 0.5, -0.5, 0.0]))
    opt = Bop([w], threshold=0.15, gamma=0.5)
    w.grad = torch.tensor([0.4, 0.4, -0.4, -0.4, 0.2])
    opt.step()
    # m = 0.5 * g = [0.2, 0.2, -0.2, -0.2, 0.1]; flip where |m| > 0.15 and sign(m) == sign(w)
    assert torch.equal(opt.state[w]["exp_avg"], torch.tensor([0.2, 0.2, -0.2, -0.2, 0.1]))
    assert w.tolist() == [-0.5, -0.5, 0.5, 0.5, 0.0]
    w.grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.4])
    opt.step()
    # m = [0.1, 0.1, -0.1, -0.1, 0.25]: only the last passes the threshold; sign(0) = +1 = sign(m): flips
    assert torch.allclose(opt.state[w]["exp_avg"], torch.tensor([0.1, 0.1, -0.1, -0.1, 0.25]))
    assert w.tolist() == [-0.5, -0.5, 0.5, 0.5, -0.0]


def test_bop_never_changes_magnitudes_and_skips_params_without_grad():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(100))
    idle = nn.Parameter(torch.randn(3))
    opt = Bop([w, idle], threshold=1e-8, gamma=1e-1)
    before, idle_before = w.detach().abs().clone(), idle.detach().clone()
    for _ in range(5):
        w.grad = torch.randn(100)
        opt.step()
    assert torch.equal(w.detach().abs(), before)
    assert torch.equal(idle.detach(), idle_before)
    with pytest.raises(ValueError):
        Bop([w], gamma=0.0)


def test_bop_minimizes_a_sign_matching_loss():
    torch.manual_seed(0)
    target = torch.where(torch.randn(256) >= 0, 1.0, -1.0)
    w = nn.Parameter(torch.randn(256) * 0.01)
    opt = Bop([w], threshold=1e-4, gamma=0.1)
    for _ in range(50):
        loss = -(torch.where(w >= 0, 1.0, -1.0) + w - w.detach()).mul(target).sum()  # STE through sign
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(torch.where(w >= 0, 1.0, -1.0), target)


def test_binary_parameters_are_the_1_bit_quantized_weights():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        QConv2d(4, 4, 3, weight_quantizer="ste_sign", input_quantizer="ste_sign"),
        QConv2d(4, 4, 3, weight_quantizer="dorefa"),  # 2-bit: not binary
        QConv2d(4, 4, 3, input_quantizer="ste_sign"),  # float weights
        TwistConv2d(4, 4, weight_quantizer="magnitude_aware_sign"),
        QLinear(4, 2, weight_quantizer="ste_sign"),
    )
    found = binary_parameters(model)
    expected = [model[1].weight, model[4].weight, model[4].coeff_x, model[4].coeff_y, model[5].weight]
    assert [id(p) for p in found] == [id(p) for p in expected]


def test_clip_and_flip_counter():
    w = nn.Parameter(torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0]))
    counter = FlipCounter([w])
    clip_weights([w], 1.0)
    assert w.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert counter.ratio() == 0.0
    with torch.no_grad():
        w[2] = -0.1  # 0 (sign +1) -> negative: a flip
        w[3] = -0.5
    assert counter.ratio() == pytest.approx(2 / 5)
    assert FlipCounter([]).ratio() == 0.0


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "bop"])
def test_weight_decay_leaves_binary_weights_and_quantizer_steps_alone(optimizer):
    """``--weight-decay`` decays the float parameters only: not the latent binary weights (their sign is
    what counts) and not an ``int8`` quantizer's learned step (LSQ's recipe); without it, one group."""
    from onebit.train.build import make_optimizers
    from onebit.train.config import TrainConfig

    model = nn.Sequential(
        QConv2d(3, 8, 3, input_quantizer="int8", weight_quantizer="int8_weight"),
        QConv2d(8, 8, 3, input_quantizer="ste_sign", weight_quantizer="ste_sign"),
    )
    step, binary = model[0].input_quantizer.log_step, model[1].weight
    decay_of = {}
    for opt in make_optimizers(TrainConfig(optimizer=optimizer, weight_decay=1e-3), model, [binary]):
        for group in opt.param_groups:
            for p in group["params"]:
                decay_of[id(p)] = group.get("weight_decay", 0.0)
    assert decay_of[id(step)] == 0.0
    assert decay_of[id(binary)] == 0.0
    assert decay_of[id(model[0].weight)] == 1e-3 and decay_of[id(model[1].bias)] == 1e-3
    (plain,) = make_optimizers(TrainConfig(optimizer="adam"), model, [binary])[:1]
    assert len(plain.param_groups) == 1
