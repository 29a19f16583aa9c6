"""The specification of ``onebit.engine.ops.max_pool2d``: torch's ``F.max_pool2d`` of a float32
``[N, C, H, W]`` map, bit for bit (the first of a window's largest values in (kh, kw) order, so that
-0.0 and +0.0 keep torch's choice; a NaN wins, the last one of a window), read from NCHW or
channels_last memory and written in channels_last, on every instruction set the machine supports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onebit import _C
from onebit.engine import ops
from onebit.engine.kernels import pool

ISAS = _C.supported_isas()
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}

pytestmark = pytest.mark.usefixtures("restore_isa_and_threads")  # tests switch ISAs and threads


@pytest.fixture
def native_for_every_size(monkeypatch):
    """Small maps take the native pool too (by default torch pools them)."""
    monkeypatch.setattr(pool, "NATIVE_POOL_MIN_ELEMENTS", 1)


def tied_values(shape, generator) -> torch.Tensor:
    """Few distinct values, so windows hold ties: -0.0 beside +0.0, NaNs with different payloads,
    infinities."""
    pick = torch.tensor([-0.0, 0.0, 1.0, -1.0, 2.0, float("inf"), float("-inf")])
    x = pick[torch.randint(0, len(pick), shape, generator=generator)]
    nan = torch.rand(shape, generator=generator) < 0.03
    payloads = torch.randint(1, 1 << 22, shape, generator=generator, dtype=torch.int32) | 0x7F800000
    return torch.where(nan, payloads.view(torch.float32), x)


def random_window(generator) -> dict:
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=generator))  # noqa: E731
    kh, kw, dh, dw = r(1, 4), r(1, 4), r(1, 2), r(1, 2)
    return {
        "kernel_size": (kh, kw),
        "stride": (r(1, 3), r(1, 3)),
        "padding": (r(0, kh // 2), r(0, kw // 2)),
        "dilation": (dh, dw),
        "ceil_mode": bool(r(0, 1)),
    }


def assert_torchs_pool(out: torch.Tensor, x: torch.Tensor, window: dict) -> None:
    expected = F.max_pool2d(x, **window)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.contiguous().view(torch.int32), expected.contiguous().view(torch.int32)), window


@pytest.mark.usefixtures("native_for_every_size")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", FORMATS)
def test_max_pool2d_equals_torchs_bit_for_bit(isa, layout):
    _C.set_isa(isa)
    generator = torch.Generator().manual_seed(len(isa) * 7 + len(layout))
    for case in range(60):
        n, c = int(torch.randint(1, 3, (), generator=generator)), int(torch.randint(1, 70, (), generator=generator))
        window = random_window(generator)
        (kh, kw), (dh, dw) = window["kernel_size"], window["dilation"]
        h, w = (int(torch.randint(d * (k - 1) + 1, 24, (), generator=generator)) for k, d in ((kh, dh), (kw, dw)))
        x = tied_values((n, c, h, w), generator).contiguous(memory_format=FORMATS[layout])
        torch.set_num_threads(1 + case % 2)
        assert_torchs_pool(ops.max_pool2d(x, **window), x, window)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", FORMATS)
def test_a_resnet_stem_pool_equals_torchs(isa, layout):
    """The 3x3, stride 2, padding 1 pool of a 64-channel 112x112 map, on two threads."""
    _C.set_isa(isa)
    torch.set_num_threads(2)
    x = tied_values((2, 64, 112, 112), torch.Generator().manual_seed(1)).contiguous(memory_format=FORMATS[layout])
    window = {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1, "ceil_mode": False}
    assert_torchs_pool(ops.max_pool2d(x, **window), x, window)


def test_strided_views_and_the_reference_backend_give_torchs_pool():
    x = tied_values((2, 8, 40, 40), torch.Generator().manual_seed(2))
    window = {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1, "ceil_mode": True}
    for view in (x[:, :, 3:33, 5:35], x[:, ::2], x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[..., ::2]):
        assert_torchs_pool(ops.max_pool2d(view, **window), view, window)
    with ops.use_backend("reference"):
        assert_torchs_pool(ops.max_pool2d(x, **window), x, window)


def test_gradients_flow_as_through_torchs_pool():
    x = torch.randn(1, 4, 64, 64, requires_grad=True)
    ops.max_pool2d(x, 2, 2).sum().backward()
    y = x.detach().clone().requires_grad_()
    F.max_pool2d(y, 2, 2).sum().backward()
    assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 3, "stride": 1, "padding": 2}, "padding .* at most half the pooling window"),
        ({"kernel_size": 0, "stride": 1}, "kernel_size, stride and dilation must be positive"),
        ({"kernel_size": 9, "stride": 1}, "too small for pooling window 9x9"),
        ({"kernel_size": (2, 2, 2), "stride": 1}, "kernel_size must be an int or a pair of ints"),
    ],
)
def test_bad_windows_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.max_pool2d(torch.randn(1, 2, 8, 8), **kwargs)


def test_other_dtypes_and_ranks_are_refused():
    with pytest.raises(ValueError, match="x must have dtype torch.float32"):
        ops.max_pool2d(torch.randn(1, 2, 8, 8, dtype=torch.float64), 2, 2)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        ops.max_pool2d(torch.randn(2, 8, 8), 2, 2)
