"""A packed BitLinear's RMSNorm inside its native call: torch's ``F.rms_norm``, bit for bit.

The native norm is checked against ATen's cascade sum written out here in float32 torch ops, for every
vector width onebit can sum in, and against ``F.rms_norm`` itself for the width torch's own sum takes
(asked by the probe). A bound layer with a norm is ``F.rms_norm`` then the op, with the norm inside the
native call when the probe finds torch's order, and ``F.rms_norm`` itself when it does not.
"""

from __future__ import annotations

import copy
import math
import struct

import pytest
import torch
import torch.nn.functional as F

from conftest import float_bits
from onebit import _C
from onebit.engine import kernels as K
from onebit.engine import ops
from onebit.engine.graph.quantized import NORM_ORDER
from onebit.engine.kernels.rms_norm import NORM_LANES, rms_norm
from onebit.engine.sum_order import TORCH_SUM_LANES, NormOrderProbe

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="no native kernels")

F32 = torch.float32


def cascade_sum(values: torch.Tensor, lanes: int) -> torch.Tensor:
    """ATen's ``vectorized_inner_sum`` of a float32 row, every add rounded to float32: ``lanes``-wide vectors
    read as rows of four accumulators carried up four levels every 2^p rows, then the lanes one by one."""

    def row_sum(vectors: torch.Tensor) -> torch.Tensor:  # ATen's row_sum over [n, width] vectors
        size = vectors.shape[0] // 4
        power = max(4, (1 if size <= 2 else math.ceil(math.log2(size))) // 4)
        step, mask = 1 << power, (1 << power) - 1
        acc = torch.zeros(4, 4, vectors.shape[1], dtype=F32)  # [level, accumulator, lane]
        i = 0
        while i + step <= size:
            for _ in range(step):
                acc[0] = acc[0] + vectors[4 * i : 4 * i + 4]
                i += 1
            for level in range(1, 4):
                acc[level] = acc[level] + acc[level - 1]
                acc[level - 1] = 0.0
                if i & (mask << (level * power)):
                    break
        for rest in range(i, size):
            acc[0] = acc[0] + vectors[4 * rest : 4 * rest + 4]
        for level in range(1, 4):
            acc[0] = acc[0] + acc[level]
        total = acc[0, 0]
        for v in range(4 * size, vectors.shape[0]):
            total = total + vectors[v]
        for k in range(1, 4):
            total = total + acc[0, k]
        return total

    k = values.shape[0]
    if k < lanes:  # ATen's scalar_inner_sum: row_sum over single floats
        return torch.zeros((), dtype=F32) + row_sum(values.reshape(-1, 1))[0]
    whole = k // lanes * lanes
    partials = row_sum(values[:whole].reshape(-1, lanes))
    total = torch.zeros((), dtype=F32)
    for v in values[whole:]:
        total = total + v
    for v in partials:
        total = total + v
    return total


def f32(v: float) -> float:
    """``v`` rounded to float32: a sum, quotient or square root of float32 values computed in double and
    rounded so is the correctly rounded float32 result (53 >= 2 * 24 + 2 bits)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def rms_norm_spec(x: torch.Tensor, eps: float, lanes: int) -> torch.Tensor:
    """``x * (1 / sqrt(sum(x^2) / K + eps))``, each operation rounded to float32, the sum in ``cascade_sum``'s
    order."""
    rows = []
    for row in x:
        mean = f32(cascade_sum(row * row, lanes).item() / row.shape[0])
        r = f32(1.0 / f32(math.sqrt(f32(mean + f32(eps)))))
        rows.append(row * torch.tensor(r, dtype=F32))
    return torch.stack(rows) if rows else x.clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(float_bits(a), float_bits(b))


def torch_lanes(shape) -> int:
    """The width packed BitLinears sum a token shape in (0: none gives torch's bits)."""
    return NORM_ORDER(torch.empty(shape))


@pytest.mark.parametrize("lanes", NORM_LANES)
@pytest.mark.parametrize("features", [1, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 100, 255, 1000, 4096, 4103])
def test_native_norm_sums_in_the_cascade_order_of_each_width(isa, lanes, features):
    gen = torch.Generator().manual_seed(features)
    x = torch.randn(3, features, generator=gen) * torch.exp(torch.randn(3, 1, generator=gen))
    assert same_bits(rms_norm(x, 1e-5, lanes=lanes), rms_norm_spec(x, 1e-5, lanes))


@pytest.mark.parametrize("features", [8192 + 5, 131072 + 3])
def test_native_norm_carries_sums_up_every_level_of_the_cascade(isa, features):
    # 8,192 features carry sums to the second level, 131,072 to the third (8 lanes: rows of 4 vectors, 16 a step)
    gen = torch.Generator().manual_seed(features)
    x = torch.randn(1, features, generator=gen)
    assert same_bits(rms_norm(x, 1e-5, lanes=8), rms_norm_spec(x, 1e-5, 8))


def test_the_widths_are_different_orders():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4096, generator=gen)
    results = {lanes: rms_norm(x, 1e-6, lanes=lanes) for lanes in NORM_LANES}
    for a in NORM_LANES:
        for b in NORM_LANES:
            if a < b:
                assert not torch.equal(results[a], results[b]), (a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("tokens", "features"), [(1, 4096), (3, 1000), (8, 4096), (1, 5), (2, 11008)])
def test_torch_sums_common_shapes_in_an_order_onebit_makes(threads, tokens, features):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lanes = torch_lanes((tokens, features))
        assert lanes in NORM_LANES  # torch's order found: 8 on x86-64
        gen = torch.Generator().manual_seed(tokens * features)
        x = torch.randn(tokens, features, generator=gen) * 3
        assert same_bits(rms_norm(x, 1e-5, lanes=lanes), F.rms_norm(x, (features,), eps=1e-5))
    finally:
        torch.set_num_threads(previous)


def test_special_values_normalize_as_torch_does():
    lanes = torch_lanes((6, 40))
    x = torch.randn(6, 40)
    x[0, 3] = float("nan")  # NaN everywhere
    x[1, 7] = float("inf")  # NaN at the infinity, 0 elsewhere
    x[2] = 0.0  # zeros: eps keeps the divisor finite
    x[3, ::2] = -0.0
    x[4] = 1e30  # squares overflow to inf
    x[5] = 1e-30  # squares underflow to 0
    assert same_bits(rms_norm(x, 1e-6, lanes=lanes), F.rms_norm(x, (40,), eps=1e-6))


def test_native_norm_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="lanes must be one of"):
        rms_norm(torch.ones(1, 8), 1e-6, lanes=2)
    with pytest.raises(ValueError, match="float32 CPU"):
        rms_norm(torch.ones(1, 8, dtype=torch.float64), 1e-6, lanes=8)
    with pytest.raises(ValueError, match="no features"):
        rms_norm(torch.ones(2, 0), 1e-6, lanes=8)
    strided = torch.randn(3, 40)[:, ::2]
    assert torch.equal(rms_norm(strided, 1e-6, lanes=8), rms_norm(strided.contiguous(), 1e-6, lanes=8))


def test_probe_answers_no_order_where_none_gives_torchs_bits_and_asks_once():
    calls = []

    def off_by_one_ulp(x, eps, *, lanes):  # another rounding: never torch's bits
        calls.append(lanes)
        return torch.nextafter(F.rms_norm(x, (x.shape[1],), eps=eps), torch.tensor(math.inf))

    probe = NormOrderProbe(off_by_one_ulp)
    assert probe(torch.empty(1, 64)) == 0
    assert calls == list(TORCH_SUM_LANES)  # each width tried, none kept
    assert probe(torch.empty(1, 64)) == 0 and len(calls) == len(TORCH_SUM_LANES)  # the answer is kept
    assert probe(torch.empty(0, 64)) == 0 and probe(torch.empty(64)) == 0


@pytest.mark.parametrize("tokens", [0, 1, 3, 9])
@pytest.mark.parametrize("features", [300, 1024 + 77])
def test_bound_layer_with_a_norm_is_rms_norm_then_the_op(tokens, features):
    out = 70
    gen = torch.Generator().manual_seed(tokens + features)
    wp = ops.pack_ternary_weights(torch.randint(-1, 2, (out, features), generator=gen).to(F32))
    scale = torch.rand(out, generator=gen)
    layer = K.TernaryLayer(wp, in_features=features, scale=scale, norm_eps=1e-5, norm_order=NORM_ORDER)
    x = torch.randn(tokens, features, generator=gen) * 5
    if tokens > 1:
        x[1, 4] = float("nan")  # a NaN token's row is NaN, the others are unchanged
    want = K.ternary_linear(F.rms_norm(x, (features,), eps=1e-5), wp, in_features=features, scale=scale)
    assert same_bits(layer(x), want)
    strided = torch.randn(tokens, 2 * features, generator=gen)[:, ::2]
    want = K.ternary_linear(F.rms_norm(strided, (features,), eps=1e-5), wp, in_features=features, scale=scale)
    assert same_bits(layer(strided), want)
    assert same_bits(copy.deepcopy(layer)(x), layer(x))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_prefill_normalized_on_two_threads_is_rms_norm_then_the_op(threads):
    features, out, tokens = 2048, 64, 48  # the tokens split between threads inside the native call
    gen = torch.Generator().manual_seed(threads)
    wp = ops.pack_ternary_weights(torch.randint(-1, 2, (out, features), generator=gen).to(F32))
    layer = K.TernaryLayer(wp, in_features=features, norm_eps=1e-5, norm_order=NORM_ORDER)
    x = torch.randn(tokens, features, generator=gen) * torch.exp(torch.randn(tokens, 1, generator=gen))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = layer(x)
        lanes = NORM_ORDER(x)
        want = K.ternary_linear(F.rms_norm(x, (features,), eps=1e-5), wp, in_features=features)
    finally:
        torch.set_num_threads(before)
    assert lanes in NORM_LANES
    assert same_bits(got, want)


def _spy_on_native_norm(monkeypatch):
    """The lanes each native call got, and the F.rms_norm calls made (torch.nn.functional's, which the
    layer calls)."""
    seen = {"lanes": [], "rms_norm": 0}
    native, torch_norm = _C.ternary_linear_raw, F.rms_norm

    def ternary_linear_raw(*args):
        seen["lanes"].append(args[10])
        return native(*args)

    def rms_norm_counted(*args, **kwargs):
        seen["rms_norm"] += 1
        return torch_norm(*args, **kwargs)

    monkeypatch.setattr(_C, "ternary_linear_raw", ternary_linear_raw)
    monkeypatch.setattr(F, "rms_norm", rms_norm_counted)
    return seen


def test_bound_layer_normalizes_natively_where_torch_sums_in_its_order_and_with_torch_elsewhere(monkeypatch):
    features, out = 512, 64
    wp = ops.pack_ternary_weights(torch.randint(-1, 2, (out, features)).to(F32))
    layer = K.TernaryLayer(wp, in_features=features, norm_eps=1e-5, norm_order=NORM_ORDER)
    x = torch.randn(2, features)
    want = K.ternary_linear(F.rms_norm(x, (features,), eps=1e-5), wp, in_features=features)
    lanes = torch_lanes((2, features))
    seen = _spy_on_native_norm(monkeypatch)
    assert same_bits(layer(x), want)
    assert seen == {"lanes": [lanes], "rms_norm": 0}  # the norm ran inside the native call
    key = ((2, features), torch.get_num_threads())
    monkeypatch.setitem(NORM_ORDER.answers, key, 0)  # torch sums this shape otherwise
    assert same_bits(layer(x), want)
    assert seen == {"lanes": [lanes, 0], "rms_norm": 1}
    without_probe = K.TernaryLayer(wp, in_features=features, norm_eps=1e-5)  # no order known: torch's norm
    assert same_bits(without_probe(x), want)
    assert seen == {"lanes": [lanes, 0, 0], "rms_norm": 2}


def test_bound_layer_refuses_a_norm_eps_that_is_not_positive():
    wp = torch.zeros(4, 3, dtype=torch.uint8)
    for eps in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="norm_eps must be positive"):
            K.TernaryLayer(wp, in_features=10, norm_eps=eps)


def test_packed_bitlinear_normalizes_inside_the_native_call_bit_for_bit(monkeypatch):
    from torch import nn

    import onebit.engine
    from onebit.nn import BitLinear

    torch.manual_seed(5)
    model = nn.Sequential(BitLinear(300, 96), BitLinear(96, 40, norm=False)).eval()
    packed = onebit.engine.pack(model, torch.randn(2, 7, 300))
    x = torch.randn(2, 7, 300) * 4
    with torch.no_grad():
        want = model(x)
        lanes = torch_lanes((14, 300))  # asked before the spy counts F.rms_norm: the probe calls it
        seen = _spy_on_native_norm(monkeypatch)
        assert same_bits(packed(x), want)
        assert seen == {"lanes": [lanes, 0], "rms_norm": 0}
        with ops.use_backend("reference"):
            assert same_bits(packed(x), want)
