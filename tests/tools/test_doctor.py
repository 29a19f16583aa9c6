"""doctor(): one broken model per failure kind, the right layer named; healthy models pass."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit import models, quant
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


@pytest.mark.parametrize(
    "build",
    [healthy, lambda: models.create("lenet_binary", in_channels=1, width=8)],
    ids=["hand-built", "lenet_binary"],
)
@pytest.mark.parametrize("with_targets", [True, False])
def test_healthy_models_are_ok(build, with_targets):
    x, y = batch()
    report = doctor(build(), x, y if with_targets else None)
    assert report.ok, str(report)
    assert report.findings == []
    assert len(report.sites) >= 3 and all(g.rms > 0 for g in report.gradients)


def test_relu_straight_into_a_sign_gives_constant_output():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        QConv2d(8, 8, 3, padding=1, **Q),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
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
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        QConv2d(8, 8, 3, padding=1, **Q),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
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


class SteppingInt8(quant.Int8):
    """Writes its step at every call, calibrated or not."""

    def forward(self, x):
        with torch.no_grad():
            self.log_step.add_(0.01)
        return super().forward(x)


def test_an_int8_quantizer_calibrating_on_its_first_batch_is_not_a_mutation_later_writes_are():
    model = models.create("birealnet_small", in_channels=1, float_layers="int8")
    report = doctor(model, *batch())
    assert report.layers("mutates_parameter") == []
    assert not bool(model.stem.conv.input_quantizer.calibrated)  # the doctor put it back
    stepping = nn.Sequential(
        nn.Flatten(), QLinear(64, 10, input_quantizer=SteppingInt8(), weight_quantizer="int8_weight")
    )
    stepping(batch()[0])  # calibrated: from now on a write is the module's own
    assert doctor(stepping, *batch()).layers("mutates_parameter") == ["1.input_quantizer"]


class HandSign(nn.Module):
    def forward(self, x):
        return torch.sign(x)


def test_zeros_into_a_hand_written_sign():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), HandSign(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(288, 10)
    )
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
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.Linear(32, 32), GradScale(1e-6), nn.Linear(32, 32), nn.Linear(32, 10)
    )
    report = doctor(model, *batch())
    assert report.layers("vanishing_gradient") == ["2"]


def test_exploding_gradient():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), GradScale(1e7), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 10)
    )
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


# --- signs however they are written -------------------------------------------------------------


class BinActive(torch.autograd.Function):
    """The XNOR forum thread's sign: a custom autograd Function, STE clipped to |x| <= 1, sign(0) = 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sign()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class BinConv2d(nn.Module):
    """The thread's block: BatchNorm, then the sign inside ``forward``, then a float conv."""

    def __init__(self, c_in, c_out, bn=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in) if bn else nn.Identity()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = BinActive.apply(self.bn(x))
        return self.relu(self.conv(x))


class ForumNet(nn.Module):
    def __init__(self, bn=True, clamp=False):
        super().__init__()
        self.clamp = clamp
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = BinConv2d(8, 8, bn=bn)
        self.head = nn.Linear(8 * 64, 10)

    def forward(self, x):
        if self.clamp:  # the thread's trick, in the parent's forward
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.data.clamp_(min=0.01)
        return self.head(self.block(self.relu(self.stem(x))).flatten(1))


def test_a_custom_autograd_function_sign_is_a_site_named_after_the_module_that_calls_it():
    report = doctor(ForumNet(bn=True), *batch())
    assert [(s.layer, s.quantizer) for s in report.sites] == [("block", "BinActive")]
    assert report.ok, str(report)  # BatchNorm before the sign: varied inputs, STE passes gradient


def test_forum_model_with_a_relu_into_its_sign_is_not_ok():
    report = doctor(ForumNet(bn=False), *batch())
    assert not report.ok and "No problems found" not in str(report)
    assert report.layers("sign_of_zero") == ["block"] and "ReLU" in report.of_kind("sign_of_zero")[0].message


def test_a_parent_clamping_batchnorm_weights_is_named_not_the_batchnorm():
    model = ForumNet(clamp=True)
    with torch.no_grad():
        model.block.bn.weight.fill_(-0.5)
    report = doctor(model, *batch())
    found = report.of_kind("mutates_parameter")
    assert [f.layer for f in found] == [""] and "block.bn.weight" in found[0].message
    assert str(found[0]).startswith("<model>: mutates_parameter")
    assert torch.equal(model.block.bn.weight, torch.full((8,), -0.5))  # restored


class BareSign(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.sign(self.bn(self.fc1(x.flatten(1)))))


def test_a_bare_torch_sign_in_forward_blocks_the_gradient_and_is_reported_first():
    report = doctor(BareSign(), *batch())
    assert [(s.layer, s.quantizer) for s in report.sites] == [("", "torch.sign")]
    kinds = [f.kind for f in report.findings]
    assert kinds[0] == "blocked_gradient" and report.findings[0].layer == ""
    assert set(report.layers("zero_gradient")) == {"fc1", "bn"}  # consequences, after the cause
    assert all(k in ("zero_gradient",) for k in kinds[1:])


def test_tensor_sign_and_onebit_sign_in_a_forward_are_one_site_each():
    from onebit.math import sign

    class TwoSigns(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            h = x.flatten(1).sign() * 0.5  # Tensor.sign
            return self.fc(sign(h + x.flatten(1)))  # onebit's sign: torch.sign, then add_ and sign_ on its result

    report = doctor(TwoSigns(), *batch())
    assert len(report.sites) == 2 and {s.layer for s in report.sites} == {""}


def test_causes_come_before_their_consequences():
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        GradScale(1e7),
        nn.Linear(32, 32),
        nn.ReLU(),
        QActivation("ste_sign"),
        nn.Linear(32, 10),
    )
    report = doctor(model, *batch())
    kinds = [f.kind for f in report.findings]
    assert "exploding_gradient" in kinds and "constant_output" in kinds
    assert kinds.index("constant_output") < kinds.index("exploding_gradient")


def test_a_model_without_any_sign_is_not_ok():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    report = doctor(model, *batch())
    assert report.layers("no_binarization") == [""]
    assert not report.ok and "no_binarization" in str(report) and "float network" in str(report)


def test_signs_inside_onebit_layers_are_not_counted_twice():
    report = doctor(healthy(), *batch())
    assert [s.layer for s in report.sites if not s.weights] == ["2", "5", "7"]


FORUM_FILE = """
import torch
from torch import nn


class BinActive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sign()

    @staticmethod
    def backward(ctx, grad):
        return grad


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.fc(BinActive.apply(self.relu(self.conv(x))).flatten(1))


def make():
    return Net()
"""


def test_cli_doctor_on_a_users_file(tmp_path, capsys):
    path = tmp_path / "forum.py"
    path.write_text(FORUM_FILE)
    for target in (f"{path}:Net", f"{path}:make"):
        assert main(["doctor", target, "--input-shape", "3,4,4", "--batch-size", "16"]) == 1
        out = capsys.readouterr().out
        assert "BinActive" in out and "sign_of_zero" in out and "<model>" in out
    assert main(["doctor", str(path), "--input-shape", "3,4,4", "--batch-size", "16"]) == 1  # its only module
    assert "forum.py:Net" in capsys.readouterr().out
    two = tmp_path / "two.py"
    two.write_text(FORUM_FILE + "\n\nclass Other(Net):\n    pass\n")
    assert main(["doctor", str(two), "--input-shape", "3,4,4"]) == 2  # two candidates: say which
    err = capsys.readouterr().err
    assert "Net, Other" in err and "FILE.py:NAME" in err
    assert main(["doctor", f"{path}:Net"]) == 2
    assert "--input-shape" in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["100000,100000,100000", "0,4,4", "3,-4,4"])
def test_cli_doctor_refuses_an_input_shape_it_cannot_allocate_or_build_in_one_line(tmp_path, shape):
    path = tmp_path / "forum.py"
    path.write_text(FORUM_FILE)
    result = subprocess.run(
        [sys.executable, "-m", "onebit", "doctor", f"{path}:Net", "--input-shape", shape],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--input-shape" in lines[0] and shape in lines[0]
    if shape.startswith("100000"):  # the size it would need, found before allocating
        assert "64,000,000,000,000,000 float32 values" in lines[0] and "GiB" in lines[0]
