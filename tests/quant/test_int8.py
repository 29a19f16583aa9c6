"""8-bit quantizers: int8_weight (per output channel) and int8 (per tensor, a learned step):
values against naive loops, idempotence, calibration, the LSQ gradient, state_dict."""

import math

import pytest
import torch

from onebit import quant

# ----------------------------------------------------------------------------- int8_weight


def naive_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels and scales channel by channel, element by element."""
    levels = torch.empty_like(w)
    scales = torch.empty(w.shape[0], dtype=w.dtype)
    for o in range(w.shape[0]):
        row = w[o].reshape(-1)
        a = max(float(row.abs().max()), 1e-5)
        scale = torch.tensor(a, dtype=w.dtype) / 127
        scales[o] = scale
        flat = levels[o].view(-1)
        for i, v in enumerate(row):
            flat[i] = min(max(float(torch.round(v / scale)), -127.0), 127.0)
    return levels, scales


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 7), (3, 2, 5)])
def test_int8_weight_levels_and_scales_follow_the_definition_per_output_channel(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w[1] = 0.0  # an all-zero channel: levels 0
    levels, scale = quant.Int8Weight().factor(w)
    want_levels, want_scale = naive_int8_weight(w)
    assert torch.equal(levels, want_levels) and torch.equal(scale, want_scale)
    assert torch.equal(levels[1], torch.zeros_like(levels[1]))
    peaks = levels.reshape(shape[0], -1).abs().amax(dim=1)
    assert peaks.tolist() == [127.0, 0.0] + [127.0] * (shape[0] - 2)  # each channel's maximum is a full level
    q = quant.get("int8_weight")(w)
    assert torch.equal(q, levels * scale.reshape([-1] + [1] * (w.dim() - 1)))
    assert quant.factor_code_of(quant.Int8Weight()) == quant.IntegerCode.signed(8)


def test_int8_weight_levels_are_every_integer_in_range_not_only_odd_ones():
    w = torch.arange(-127.0, 128.0).reshape(1, -1) * 0.01
    levels, scale = quant.Int8Weight().factor(w)
    assert levels.flatten().tolist() == list(range(-127, 128))
    assert torch.equal(scale, torch.tensor([1.27]) / 127)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_int8_weight_is_bitwise_idempotent(dtype):
    q = quant.Int8Weight()
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(32, 16, 3, 3, generator=gen) * 10.0 ** torch.randint(-4, 3, (32, 1, 1, 1), generator=gen)
        w = w.to(dtype)
        once = q(w)
        assert torch.equal(q(once), once)
        assert torch.equal(q.factor(once)[1], q.factor(w)[1])


def test_int8_weight_passes_the_gradient_straight_through_and_never_writes_the_weight():
    w = torch.randn(6, 4, requires_grad=True)
    before = w.detach().clone()
    g = torch.randn(6, 4)
    quant.Int8Weight()(w).backward(g)
    assert torch.allclose(w.grad, g, rtol=1e-6, atol=0)  # d(levels * scale)/dw = scale / scale
    assert torch.equal(w.detach(), before)


# ----------------------------------------------------------------------------- int8


def naive_int8(x: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x_int element by element, with s = fl32(1 / step): ``round`` ties to even, clamp to 127."""
    s = torch.reciprocal(torch.tensor(step, dtype=torch.float32)).to(x.dtype)
    x_int = torch.tensor([min(max(float(torch.round(v * s)), -127.0), 127.0) for v in x.reshape(-1)], dtype=x.dtype)
    return x_int.reshape(x.shape), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_int8_computes_the_integers_of_its_step(dtype):
    q = quant.Int8(step=0.02).eval()
    x = (torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    x[0, :4] = torch.tensor([0.01, 0.03, -0.05, 9.0], dtype=dtype)  # ties (to even) and a clamped value
    x_int, s = q.integer_factor(x)
    want_int, want_s = naive_int8(x, 0.02)
    assert torch.equal(x_int, want_int) and torch.equal(s, want_s)
    assert x_int[0, :4].tolist() == [0.0, 2.0, -2.0, 127.0]
    assert torch.equal(q(x), want_int / want_s)
    assert torch.equal(q.divisor(), torch.reciprocal(torch.tensor(0.02)))
    assert quant.integer_code_of(q) == quant.IntegerCode.signed(8)


def test_int8_is_bitwise_idempotent_once_calibrated():
    q = quant.Int8()
    for scale in (1e-3, 1.0, 300.0):
        q = quant.Int8()
        x = torch.randn(64, 33) * scale
        once = q(x)
        assert torch.equal(q(once), once)


def test_int8_calibrates_on_its_first_training_batch_only():
    x = torch.randn(8, 3, 5, 5) * 0.7
    x[0, 0, 0, 0] = 50.0  # an outlier: 3 std is below max|x|
    q = quant.Int8()
    assert not bool(q.calibrated)
    q(x)
    want = min(3.0 * x.std(correction=0).item(), x.abs().max().item()) / 127
    assert q.step.item() == pytest.approx(want, rel=1e-6) and bool(q.calibrated)
    q(x * 10.0)  # a later batch leaves the step to training
    assert q.step.item() == pytest.approx(want, rel=1e-6)
    q = quant.Int8()
    q(torch.tensor([-1.0, 1.0] * 8))  # std 1: max|x| below 3 std, the step covers max|x|
    assert q.step.item() == pytest.approx(1.0 / 127, rel=1e-6)


def test_int8_in_eval_mode_keeps_its_step_uncalibrated():
    q = quant.Int8(step=0.05).eval()
    q(torch.randn(10) * 100)
    assert not bool(q.calibrated) and q.step.item() == pytest.approx(0.05)


def test_int8_step_and_calibration_survive_the_state_dict():
    trained = quant.Int8()
    trained(torch.randn(100) * 3)
    loaded = quant.Int8()
    loaded.load_state_dict(trained.state_dict())
    assert bool(loaded.calibrated) and torch.equal(loaded.step, trained.step)
    loaded(torch.randn(100) * 50)  # a loaded quantizer is not calibrated again
    assert torch.equal(loaded.step, trained.step)


def test_int8_gradients_are_lsq_straight_through_inside_and_the_scaled_step_gradient():
    step = 0.05
    q = quant.Int8(step=step).eval()  # eval mode: no calibration, the step stays 0.05; gradients still flow
    x = torch.linspace(-8.0, 8.0, 101, dtype=torch.float64).requires_grad_(True)
    g = torch.linspace(0.5, 1.5, 101, dtype=torch.float64)
    q(x).backward(g)
    xd = x.detach()
    s = 1.0 / q.step.detach().double()  # d = exp(log 0.05) in float32
    inside = (xd * s).abs() <= 127
    x_int = torch.round(xd * s).clamp(-127, 127)
    assert torch.allclose(x.grad, g * inside, rtol=1e-12, atol=0)  # s / s, one rounding each
    lsq = torch.where(inside, x_int - xd * s, x_int)  # dq/dd: x_int - x / d inside, +-127 outside
    want = (g * lsq).sum() / math.sqrt(101 * 127)
    assert inside.any() and (~inside).any()
    assert q.log_step.grad.item() == pytest.approx(want.item() * q.step.item(), rel=1e-5)  # dd/dlog_step = d


def test_int8_loads_a_state_dict_that_holds_the_step_itself():
    old = {"step": torch.tensor(0.0314), "calibrated": torch.tensor(True)}  # as Int8 saved it before
    q = quant.Int8()
    q.load_state_dict(old)
    assert bool(q.calibrated) and q.step.item() == pytest.approx(0.0314, rel=1e-6)
    assert set(q.state_dict()) == {"log_step", "calibrated"}


def test_adam_moves_the_step_by_a_fraction_of_itself():
    """One Adam update of lr changes log d by about lr: the step moves by ~lr of itself, whatever its size."""
    for step in (0.001, 0.02, 0.5):
        q = quant.Int8(step=step).eval()  # eval: no calibration, the gradient still flows
        opt = torch.optim.Adam(q.parameters(), lr=0.005)
        q(torch.linspace(-3.0, 3.0, 64)).pow(2).sum().backward()
        opt.step()
        assert abs(q.step.item() / step - 1.0) == pytest.approx(0.005, rel=0.02)


def test_int8_refuses_a_step_that_is_not_positive():
    for bad in (0.0, -1.0, "1", True):
        with pytest.raises(ValueError, match="step"):
            quant.Int8(step=bad)
    assert quant.get({"name": "int8", "step": 0.25}).step.item() == 0.25


def test_signed_codes_bound_their_integers():
    assert quant.IntegerCode.signed(8).largest == 127
    assert quant.IntegerCode.absmax(8).largest == 128
    assert quant.IntegerCode.symmetric(3).largest == 7 and quant.IntegerCode.binary().largest == 1
    with pytest.raises(ValueError, match="signed"):
        quant.IntegerCode("signed", 1)


def _calibrate_on_rank(rank: int, init_file: str, steps) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        q = quant.Int8()
        q(torch.tensor([-1.0, 1.0] * 8) * (rank + 1))  # clip 1 on rank 0, 2 on rank 1
        steps[rank] = q.step.item()
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_of_a_process_group_calibrate_to_one_step(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    steps = ctx.Manager().dict()
    workers = [ctx.Process(target=_calibrate_on_rank, args=(r, str(tmp_path / "init"), steps)) for r in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert steps[0] == steps[1] == pytest.approx(1.5 / 127, rel=1e-6)


def test_int8_weight_scales_are_fixed_points_for_every_float32_mantissa():
    mantissas = torch.arange(2**23, dtype=torch.int32) | (127 << 23)  # every float32 in [1, 2)
    for a in (mantissas.view(torch.float32), mantissas.view(torch.float32) * 2.0**-20):
        scale = a / 127
        assert torch.equal((scale * 127) / 127, scale)  # the maximum of q(w) gives back the same scale
