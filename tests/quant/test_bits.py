"""The native bit-packing kernel equals its plain-torch specification on every instruction set."""

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onebit import _C
from onebit.bits import pack_signs, pack_signs_reference, unpack_signs, words_for


def test_convention_on_a_hand_worked_word():
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, -3.0, float("nan")] + [2.0] * 60 + [-1.0])
    words = pack_signs(x)
    assert words.shape == (2,)
    # bits 1 and 4 set in word 0 (the negative values); channel 66 is bit 2 of word 1
    assert words[0].item() == (1 << 1) | (1 << 4)
    assert words[1].item() == 1 << 2


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the ISA stays set
@given(
    rows=st.integers(0, 9),
    channels=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_reference(isa, rows, channels, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g)
    x[torch.rand(rows, channels, generator=g) < 0.1] = 0.0
    x[torch.rand(rows, channels, generator=g) < 0.05] = -0.0
    assert torch.equal(pack_signs(x), pack_signs_reference(x))


def test_unused_bits_of_the_last_word_stay_zero(isa):
    x = -torch.ones(4, 65)
    words = pack_signs(x)
    assert (words[:, 1] == 1).all() and (words[:, 0] == -1).all()


def test_strided_and_batched_inputs(isa):
    x = torch.randn(3, 5, 130)
    assert torch.equal(pack_signs(x.transpose(0, 1)), pack_signs_reference(x.transpose(0, 1)))
    assert torch.equal(pack_signs(x[:, :, ::2]), pack_signs_reference(x[:, :, ::2]))


def test_unpack_inverts_pack():
    x = torch.randn(7, 200)
    assert torch.equal(unpack_signs(pack_signs(x), 200), torch.where(x < 0, -1.0, 1.0))
    assert words_for(64) == 1 and words_for(65) == 2 and words_for(1) == 1


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="float32"):
        pack_signs(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="scalar"):
        pack_signs(torch.tensor(1.0))
    with pytest.raises(ValueError, match="shape"):
        _C.pack_rows(torch.randn(2, 70), torch.empty(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown ISA"):
        _C.set_isa("sse9")


def test_isa_can_be_forced_by_environment():
    code = "from onebit import _C; print(_C.isa())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={"ONEBIT_ISA": "scalar", "PATH": ""}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "scalar", out.stderr
    out = subprocess.run([sys.executable, "-c", code], env={"ONEBIT_ISA": "bogus"}, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown ISA" in out.stderr
