"""A max pool after an int8 conv (and its BatchNorm), fused: the pool takes the conv's integer sums and
the float epilogue runs on the pooled pixels only. Specified against the model itself (conv, BatchNorm,
``max_pool2d`` in float), bit for bit, signed zeros included, on every ISA and both layouts; and the
cases where pooling the sums would not give torch's pool stay unfused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import float_bits
from exported_programs import gives_in_fresh_process, saved_and_loaded
from onebit import engine
from onebit.engine import ops, reference
from onebit.engine.graph.int8 import integer_max_pool
from onebit.nn.layers import QConv2d

native = pytest.mark.skipif(not ops.native_available(), reason="no native kernels")

POOLS = [
    # kernel, stride, padding, dilation, ceil_mode
    (3, 2, 1, 1, False),  # a ResNet stem's
    (2, 2, 0, 1, False),
    (3, 1, 1, 2, False),
    (2, 3, 1, 1, True),
]


def conv_pool_model(seed: int, pool, *, batchnorm: bool = True, groups: int = 1, bn_weight=None) -> nn.Module:
    """int8 conv -> [BatchNorm] -> MaxPool2d, the BatchNorm's scales of both signs."""
    torch.manual_seed(seed)
    k, stride, padding, dilation, ceil_mode = pool
    layers = [QConv2d(4, 12, 3, padding=1, groups=groups, input_quantizer="int8", weight_quantizer="int8_weight")]
    if batchnorm:
        layers.append(nn.BatchNorm2d(12))
    layers.append(nn.MaxPool2d(k, stride, padding, dilation, ceil_mode=ceil_mode))
    model = nn.Sequential(*layers)
    model.train()
    model(torch.randn(8, 4, 13, 11))  # calibrates the int8 step
    if batchnorm:
        bn = model[1]
        bn.weight.data = torch.randn(12) if bn_weight is None else bn_weight
        bn.bias.data = torch.randn(12)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooled_sums_are_the_models_pool(engine_backend, pool, channels_last):
    model = conv_pool_model(0, pool, groups=2 if pool[3] == 2 else 1)
    x = torch.randn(3, 4, 13, 11) * 1.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = engine.pack(model, x)
    if ops.native_available():
        assert [step.label for step in packed._steps] == ["int8_conv2d+batch_norm+max_pool2d"]
        assert (packed._steps[0].pool.sign == torch.sign(model[1].weight).int()).all()
    with torch.no_grad():
        want, got = model(x), packed(x)
    assert got.shape == want.shape and torch.equal(float_bits(got), float_bits(want))


@native
def test_a_pool_right_after_the_conv_fuses_too():
    model = conv_pool_model(1, POOLS[0], batchnorm=False)
    x = torch.randn(2, 4, 13, 11)
    packed = engine.pack(model, x)
    assert [step.label for step in packed._steps] == ["int8_conv2d+max_pool2d"]
    with torch.no_grad():
        assert torch.equal(float_bits(packed(x)), float_bits(model(x)))


@native
def test_bands_of_pooled_rows_over_two_threads():
    """Big enough to run on two threads: bands of pooled rows that start inside an image (their first
    window computes conv rows the band before computed too) and bands that cross images."""
    torch.manual_seed(6)
    model = nn.Sequential(
        QConv2d(3, 32, 5, stride=2, padding=2, input_quantizer="int8", weight_quantizer="int8_weight"),
        nn.BatchNorm2d(32),
        nn.MaxPool2d(3, 2, 1),
    )
    model.train()
    model(torch.randn(4, 3, 48, 40))
    model[1].weight.data = torch.randn(32)
    model = model.eval()
    x = torch.randn(3, 3, 48, 40)
    packed = engine.pack(model, x)
    assert [step.label for step in packed._steps] == ["int8_conv2d+batch_norm+max_pool2d"]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                assert torch.equal(float_bits(packed(x)), float_bits(model(x)))
    finally:
        torch.set_num_threads(threads)


def unfusable_weights():
    zero = torch.randn(12)
    zero[5] = 0.0  # a constant channel: no direction
    huge = torch.randn(12)
    huge[2] = 3e38  # the epilogue overflows to inf for large sums
    tiny = torch.full((12,), 1e-44)  # underflows: zeros of both signs, where torch's pool keeps the first
    return {"zero": zero, "overflow": huge, "signed zeros": tiny}


@native
@pytest.mark.parametrize("case", list(unfusable_weights()))
def test_pool_stays_unfused_where_the_sums_would_differ(case):
    model = conv_pool_model(2, POOLS[0], bn_weight=unfusable_weights()[case])
    if case == "signed zeros":
        model[1].bias.data.zero_()
        model[1].running_mean.zero_()
    x = torch.randn(3, 4, 13, 11) * 1.5
    packed = engine.pack(model, x)
    assert "max_pool2d" in [step.label for step in packed._steps]  # a step of its own
    with torch.no_grad():
        want, got = model(x), packed(x)
    if case == "signed zeros":  # the case is real: the model's output holds both zeros
        assert bool((want == 0).any()) and bool(torch.signbit(want[want == 0]).any())
        assert not bool(torch.signbit(want[want == 0]).all())
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(float_bits(got.nan_to_num()), float_bits(want.nan_to_num()))


def test_the_check_reads_the_directions_from_the_factors():
    """``integer_max_pool``: +1 where scale x bn_scale > 0, -1 where < 0; None for a zero factor."""
    a = {"in_channels": 2, "out_channels": 3, "kernel_size": [1, 1], "groups": 1, "divisor": 10.0}
    t = {"scale": torch.tensor([0.5, 0.5, -0.5]), "bias": torch.zeros(3)}
    pool_attrs = {"kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "ceil_mode": False}
    epilogue = engine.steps.Epilogue(torch.tensor([2.0, -2.0, -2.0]), torch.tensor([1.0, 0.0, 0.0]), False)
    pool = integer_max_pool(t, a, epilogue, pool_attrs)
    assert pool is not None and pool.sign.tolist() == [1, -1, 1] and pool.attrs == pool_attrs
    epilogue = engine.steps.Epilogue(torch.tensor([2.0, 0.0, 1.0]), torch.zeros(3), False)
    assert integer_max_pool(t, a, epilogue, pool_attrs) is None


@native
def test_nan_input_propagates_as_in_the_model():
    model = conv_pool_model(3, POOLS[0])
    x = torch.randn(2, 4, 13, 11)
    packed = engine.pack(model, x)
    x[1, 2, 5, 5] = float("nan")
    with torch.no_grad():
        want, got = model(x), packed(x)
    assert bool(got[1].isnan().any()) and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(float_bits(got.nan_to_num()), float_bits(want.nan_to_num()))


@native
@pytest.mark.parametrize("channels_last", [False, True])
def test_custom_op_with_a_pool_is_conv_batchnorm_and_max_pool(channels_last):
    """``torch.ops.onebit.int8_conv2d`` with ``pool`` (what a traced program calls): the reference conv,
    its BatchNorm and torch's pool, with and without a NaN in the input, in the layout it says."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (24, 8, 3, 3), generator=gen, dtype=torch.int8)
    scale, bias = torch.rand(24, generator=gen) * 0.01 + 1e-3, torch.randn(24, generator=gen)
    bn = (torch.randn(24, generator=gen), torch.randn(24, generator=gen), True)
    sign = torch.sign(bn[0]).int()
    x = torch.randn(2, 16, 15, 9, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    window = [3, 3, 2, 2, 1, 1, 1, 1, 0]
    conv = ([1, 1], [1, 1], [1, 1], 2)
    for poisoned in (False, True):
        if poisoned:
            x = x.clone()
            x[1, 3, 4, 4] = float("nan")
        got = torch.ops.onebit.int8_conv2d(x, w, *conv, 30.0, scale, bias, *bn, False, window, sign)
        want = reference.max_pool2d(reference.int8_conv2d(x, w, 30.0, scale, bias, *conv, bn), 3, 2, 1)
        assert got.shape == want.shape == (2, 24, 8, 5)
        assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().any()) == poisoned
        assert torch.equal(float_bits(got.nan_to_num()), float_bits(want.nan_to_num()))
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert got.is_contiguous(memory_format=layout)


@native
def test_pool_fused_model_exports_and_loads_in_a_fresh_process(tmp_path):
    model = conv_pool_model(4, POOLS[0])
    x = torch.randn(2, 4, 13, 11)
    packed = engine.pack(model, x)
    program = torch.export.export(packed, (x,))
    assert "torch.ops.onebit.int8_conv2d" in program.graph_module.code
    assert "max_pool2d" not in program.graph_module.code  # the pool is the op's
    loaded = saved_and_loaded(program, tmp_path / "pooled.pt2")
    with torch.no_grad():
        want = model(x)
        assert torch.equal(float_bits(loaded(x)), float_bits(want))
    result = gives_in_fresh_process(tmp_path / "pooled.pt2", x, want)
    assert result.returncode == 0, result.stderr


@native
@pytest.mark.parametrize(
    ("window", "message"),
    [
        ([3, 3, 2, 2, 2, 2, 1, 1, 0], r"padding \[2, 2\] exceeds half its kernel \[3, 3\]"),
        ([9, 9, 1, 1, 0, 0, 1, 1, 0], r"window \[9, 9\] is larger than the conv's output \[8, 8\]"),
    ],
)
def test_a_pool_that_does_not_fit_is_refused_by_name(window, message):
    from onebit.engine.kernels import int8 as kernels

    w = torch.randint(-127, 128, (16, 3, 3, 3), dtype=torch.int8)
    a = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "divisor": 10.0}
    with pytest.raises(ValueError, match=message):
        kernels.int8_conv2d(torch.randn(1, 3, 8, 8), w, None, None, a, pool=(window, torch.ones(16, dtype=torch.int32)))
