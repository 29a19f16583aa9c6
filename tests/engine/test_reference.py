"""onebit.engine.reference: the pure-torch kernels' building blocks against plain Python."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from onebit.engine import reference as R


def test_popcount_counts_the_bits_of_every_word():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**63), 2**63 - 1, (500,), generator=gen, dtype=torch.int64)
    words = torch.cat([words, torch.tensor([0, -1, 1, -(2**63), 2**63 - 1])])
    assert R.popcount(words).tolist() == [(w & (2**64 - 1)).bit_count() for w in words.tolist()]


def _round_to_float32(q: Fraction) -> float:
    """The float32 nearest to ``q`` (ties to even), by exact comparison of the neighbours."""
    guess = torch.tensor(float(q), dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    candidates = [torch.nextafter(guess, -inf), guess, torch.nextafter(guess, inf)]

    def distance(c):
        even = (c.view(torch.int32) & 1) == 0
        return abs(Fraction(float(c)) - q), not bool(even)

    return float(min(candidates, key=distance))


def test_fused_multiply_add_rounds_once():
    gen = torch.Generator().manual_seed(1)
    x, s, t = (torch.randn(2000, generator=gen) * 10 ** torch.randint(-3, 4, (2000,), generator=gen) for _ in "xst")
    # products near ties: x * s exactly representable halfway cases come from small integers
    x[:100], s[:100], t[:100] = torch.tensor(2**24 + 1.0), 0.5, torch.tensor(2.0**-30)
    got = R.fused_multiply_add(x, s, t)
    want = [
        _round_to_float32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))
        for a, b, c in zip(x.tolist(), s.tolist(), t.tolist())
    ]
    assert got.tolist() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32])
def test_threshold_negative_follows_each_channels_direction(dtype):
    acc = torch.tensor([[-2, 0, 3], [5, -5, 0]], dtype=dtype).view(2, 3, 1, 1)
    thresholds = torch.tensor([0, 0, 3], dtype=torch.int32)
    direction = torch.tensor([1, -1, 1], dtype=torch.int8)
    got = R.threshold_negative(acc, thresholds, direction).view(2, 3).tolist()
    assert got == [[True, False, False], [False, False, True]]
    assert R.threshold_signs(acc, thresholds, direction).view(2, 3).tolist() == [[-1, 1, 1], [1, 1, -1]]


def test_a_nan_accumulator_is_never_negative():
    acc = torch.full((1, 2, 1, 1), float("nan"))
    direction = torch.tensor([1, -1], dtype=torch.int8)
    assert not R.threshold_negative(acc, torch.zeros(2, dtype=torch.int32), direction).any()


def test_ternary_weights_pack_and_unpack():
    levels = torch.randint(-1, 2, (5, 13), generator=torch.Generator().manual_seed(2)).float()
    wp = R.pack_ternary_weights(levels)
    assert wp.shape == (5, R.ternary_row_bytes(13)) == (5, 4)
    assert torch.equal(R.unpack_ternary_weights(wp, 13), levels)
    with pytest.raises(ValueError, match="ternary levels must all be -1, 0 or \\+1"):
        R.pack_ternary_weights(torch.full((2, 3), 0.5))


def test_absmax8_scales_each_token_to_127():
    x = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0]])
    q, s = R.absmax8(x)
    assert q.tolist() == [[32.0, -127.0, 64.0], [0.0, 0.0, 0.0]]
    assert s.view(-1).tolist() == [63.5, pytest.approx(1.27e7)]
