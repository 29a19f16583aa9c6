"""doctor(): one broken model per failure kind, the right layer named; healthy models pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit import models
from onebit.cli import main
from onebit.doctor import KINDS, doctor
from onebit.nn import QActivation, QConv2d, QLinear

Q = dict(input_quantizer="ste_sign", weight_quantizer="ste_sign", bias=False)


def batch(n=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def healthy():
    """BatchNorm before every sign."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        QConv2d(8, 16, 3, padding=1, **Q),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(16),
        QActivation("ste_sign"),
        nn.Flatten(),
        QLinear(256, 32, **Q),
        nn.BatchNorm1d(32),
        nn.Linear(32, 10),
    )


@pytest.mark.parametrize("build", [healthy, lambda: models.create("lenet_binary", in_channels=1, width=8)], ids=["hand-built", "lenet_binary"])
@pytest.mark.parametrize("with_targets", [True, False])
def test_healthy_models_are_ok(build, with_targets):
    x, y = batch()
    report = doctor(build(), x, y if with_targets else None)
    assert report.ok, str(report)
    assert report.findings == []
    assert len(report.sites) >= 3 and all(g.rms > 0 for g in report.gradients)


def test_relu_straight_into_a_sign_gives_constant_output():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), QConv2d(8, 8, 3, padding=1, **Q), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(512, 10))
    report = doctor(model, *batch())
    assert not report.ok
    constant = report.of_kind("constant_output")
    assert [f.layer for f in constant] == ["2"]
    assert "ReLU" in constant[0].message and "BatchNorm" in constant[0].message
    assert "2" in report.layers("sign_of_zero")


def test_relu_into_a_qactivation_names_the_activation():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), QActivation("ste_sign"), nn.Linear(16, 10))
    report = doctor(model, *batch())
    assert report.layers("constant_output") == ["3"]


def test_huge_preactivations_outside_the_clip():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), QConv2d(8, 8, 3, padding=1, **Q), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(512, 10))
    with torch.no_grad():
        model[0].weight.mul_(1000.0)
    report = doctor(model, *batch())
    found = report.of_kind("outside_clip")
    assert [f.layer for f in found] == ["1"] and found[0].value >= 0.99
    assert "clip" in found[0].message and "BatchNorm" in found[0].message


def test_latent_weights_outside_the_clip():
    model = healthy()
    with torch.no_grad():
        model[2].weight.copy_(torch.sign(model[2].weight) * 3.0)
    report = doctor(model, *batch())
    assert report.layers("outside_clip") == ["2"]
    assert "latent weights" in report.of_kind("outside_clip")[0].message


class MutatingLinear(nn.Linear):
    """The forum XNOR net's mistake: binarize the parameter in place."""

    def forward(self, x):
        self.weight.data = torch.sign(self.weight.data)
        return F.linear(x, self.weight, self.bias)


def test_module_that_mutates_a_parameter_in_forward():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), MutatingLinear(16, 10))
    before = model[3].weight.detach().clone()
    report = doctor(model, *batch())
    assert report.layers("mutates_parameter") == ["3"]
    assert torch.equal(model[3].weight, before)  # the doctor put it back


class HandSign(nn.Module):
    def forward(self, x):
        return torch.sign(x)


def test_zeros_into_a_hand_written_sign():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), HandSign(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(288, 10))
    report = doctor(model, *batch())
    zero = report.of_kind("sign_of_zero")
    assert [f.layer for f in zero] == ["2"] and "sign(0) = +1" in zero[0].message
    assert report.layers("blocked_gradient") == ["2"]  # torch.sign has no straight-through estimator
    assert report.layers("zero_gradient") == ["0"]  # so the conv before it does not learn


class GradScale(nn.Module):
    """Identity forward; multiplies the gradient by ``factor``."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor + (x - x * self.factor).detach()


def test_where_the_gradient_collapses_along_the_depth():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Linear(32, 32), GradScale(1e-6), nn.Linear(32, 32), nn.Linear(32, 10))
    report = doctor(model, *batch())
    assert report.layers("vanishing_gradient") == ["2"]


def test_exploding_gradient():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), GradScale(1e7), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 10))
    report = doctor(model, *batch())
    assert report.layers("exploding_gradient") == ["1"]


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen_path = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.frozen_path(x.flatten(1)).detach())


def test_zero_and_nan_gradients():
    report = doctor(Detached(), *batch())
    assert report.layers("zero_gradient") == ["frozen_path"]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Linear(8, 10))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    report = doctor(model, *batch())
    assert "2" in report.layers("nan_activation") and {"1", "2"} <= set(report.layers("nan_gradient"))


def test_doctor_leaves_the_model_untouched():
    model = healthy().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    doctor(model, *batch())
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # running stats too
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_report_is_readable_and_kinds_are_known():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), QActivation("ste_sign"), nn.Linear(16, 10))
    report = doctor(model, *batch())
    text = str(report)
    assert "constant_output" in text and "findings" in text and "3" in text
    assert all(f.kind in KINDS for f in report.findings)


def test_cli_doctor_on_a_zoo_model_and_a_missing_run(capsys, tmp_path):
    assert main(["doctor", "lenet_binary", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "sign sites" in out
    assert main(["doctor", str(tmp_path / "nowhere")]) == 2
    assert "error" in capsys.readouterr().err
