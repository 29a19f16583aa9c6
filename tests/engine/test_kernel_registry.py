"""onebit.engine.kernels.registry: every native op registered once as ``torch.ops.onebit.*`` with a fake,
and the eager bypass of the dispatcher taken only for plain tensors outside any tracing."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from onebit.engine import ops

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="the native kernels are not built")

OPS = [
    "pack_activations",
    "binary_conv2d_int",
    "binary_conv2d",
    "binary_conv2d_threshold",
    "max_pool_bits",
    "ternary_linear",
    "ternary_linear_int",
    "pack_integer_planes",
    "combine_planes",
]


@pytest.mark.parametrize("name", OPS)
def test_every_native_op_is_a_torch_custom_op(name):
    from onebit.engine import kernels  # noqa: F401  (registers the ops)

    op = getattr(torch.ops.onebit, name)
    assert op.default._schema.name == f"onebit::{name}"


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_direct_takes_plain_tensors_and_none():
    from onebit.engine.kernels.registry import direct

    assert direct() and direct(torch.zeros(2), None, torch.zeros(1, dtype=torch.int64))
    assert direct(3, "not a tensor")  # the argument checks say what is wrong


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_direct_refuses_subclasses_and_tracing():
    from onebit.engine.kernels.registry import direct

    assert not direct(torch.zeros(2), torch.nn.Parameter(torch.zeros(2)))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.zeros(2))
        assert not direct(fake)
        assert not direct()  # a dispatch mode is active
    x = torch.zeros(2)
    with _PassThrough():
        assert not direct(x)
    traced = []
    torch.jit.trace(lambda x: traced.append(direct(x)) or x + 1, torch.zeros(2), check_trace=False)
    assert traced == [False]


def test_custom_op_registers_the_implementation_and_its_fake():
    from onebit.engine.kernels.registry import custom_op

    custom_op(
        "test_registry_double",
        "(Tensor x) -> Tensor",
        lambda x: x * 2,
        lambda x: torch.empty_like(x),
    )
    assert torch.equal(torch.ops.onebit.test_registry_double(torch.ones(3)), torch.full((3,), 2.0))
    with FakeTensorMode() as mode:
        assert torch.ops.onebit.test_registry_double(mode.from_tensor(torch.ones(4))).shape == (4,)
