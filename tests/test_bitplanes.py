"""k-bit and ternary convolutions by bit planes: exact against a float64 convolution of the levels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onebit.engine import kernels as K
from onebit.engine import ops
from onebit.engine.bitplanes import PlaneCode, bitplane_conv2d_int, stack_weight_planes

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="the native kernels are not built")

ACT_CODES = [PlaneCode.symmetric(1), PlaneCode.symmetric(2), PlaneCode.symmetric(3), PlaneCode.unsigned(1),
             PlaneCode.unsigned(2), PlaneCode.unsigned(4), PlaneCode.binary()]  # fmt: skip
WEIGHT_CODES = [PlaneCode.binary(), PlaneCode.ternary(), PlaneCode.symmetric(2), PlaneCode.symmetric(3)]


def random_levels(code: PlaneCode, shape, gen) -> torch.Tensor:
    lo, hi = code.levels
    v = torch.randint(lo, hi + 1, shape, generator=gen).float()
    if code.kind == "symmetric":
        v = torch.where(torch.remainder(v, 2) == 1, v, v + torch.where(v < hi, 1.0, -1.0))
    if code.kind == "binary":
        v = torch.where(v >= 0, 1.0, -1.0)
    return v


@pytest.mark.parametrize("code", ACT_CODES + [PlaneCode.ternary()], ids=lambda c: f"{c.kind}{c.bits}")
def test_planes_sum_back_to_every_level(code):
    lo, hi = code.levels
    levels = torch.arange(lo, hi + 1).float()
    if code.kind == "symmetric":
        levels = levels[torch.remainder(levels, 2) == 1]
    if code.kind == "binary":
        levels = torch.tensor([-1.0, 1.0])
    planes = code.split(levels)
    assert planes.shape[0] == code.planes and set(planes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(code.join(planes), levels.double())


def test_levels_outside_the_code_are_refused():
    with pytest.raises(ValueError, match="level 2.0 is not a symmetric 2-bit"):
        PlaneCode.symmetric(2).split(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="level 0.5 is not a ternary"):
        PlaneCode.ternary().split(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="bits must be an integer in"):
        PlaneCode.unsigned(0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ACT_CODES), st.sampled_from(WEIGHT_CODES), st.integers(1, 2), st.sampled_from([1, 2]),
    st.integers(1, 70), st.integers(1, 9), st.sampled_from([1, 3]), st.integers(0, 2), st.integers(1, 2),
    st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_bitplane_conv_equals_the_float64_conv_of_the_levels(act, wcode, n, groups, cg, cog, k, pad, stride, seed):
    gen = torch.Generator().manual_seed(seed)
    cin, cout = cg * groups, cog * groups
    h = w = 7
    x_int = random_levels(act, (n, cin, h, w), gen)
    levels = random_levels(wcode, (cout, cg, k, k), gen)
    expected = F.conv2d(x_int.double(), levels.double(), None, stride, pad, 1, groups)
    stacked = stack_weight_planes(levels, wcode, act.planes, groups)
    packed = K.pack_weights(stacked, act.planes * groups)
    sums = wcode.split(levels).sum(dim=(2, 3, 4)).double()
    got = bitplane_conv2d_int(
        x_int, packed, sums, act=act, weight=wcode, in_channels=cin, out_channels=cout, kernel_size=(k, k),
        stride=(stride, stride), padding=(pad, pad), groups=groups,
    )  # fmt: skip
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), expected)
