"""preserve() puts a whole model back bit for bit; register_all() registers every handle or none."""

import copy

import pytest
import torch
from torch import nn

from onebit.canonize import CompositeHandle, Handle, merge_batchnorm, preserve, register_all
from onebit.canonize.handles import Patch
from onebit.nn import QConv2d


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        QConv2d(4, 4, 3, input_quantizer="ste_sign", weight_quantizer="ste_sign", bias=False),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def assert_bit_identical(model: nn.Module, reference: nn.Module) -> None:
    """Same state_dict keys, dtypes and bytes (NaN payloads and -0.0 included), same modes and eps."""
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
        assert torch.equal(state[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]
    assert [getattr(m, "eps", None) for m in model.modules()] == [getattr(m, "eps", None) for m in reference.modules()]


def scramble(model: nn.Module) -> None:
    """What a tool may do to a model: train mode, a forward that updates statistics, writes, a swapped parameter."""
    model.train()
    model(torch.randn(8, 3, 6, 6))  # BatchNorm running statistics and num_batches_tracked change
    with torch.no_grad():
        model[0].weight.mul_(-2.0)
        model[3].weight.data = torch.sign(model[3].weight.data)
    model[6].weight = nn.Parameter(torch.zeros_like(model[6].weight))
    model[1].eps = 0.5
    model[6].bias.grad = torch.ones_like(model[6].bias)
    model[0].register_buffer("scratch", torch.ones(2))
    model[4].note = "changed"


def test_preserve_restores_a_changed_model_bit_for_bit():
    model = small_model()
    reference = copy.deepcopy(model)
    weight = model[0].weight
    with preserve(model):
        scramble(model)
        assert not torch.equal(model[0].weight, reference[0].weight)
    assert_bit_identical(model, reference)
    assert model[0].weight is weight  # the same tensor, values copied back
    assert model[6].bias.grad is None and not hasattr(model[4], "note") and "scratch" not in model[0]._buffers
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), reference(x))


def test_preserve_restores_after_an_exception():
    model = small_model()
    reference = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="tool failed"):
        with preserve(model):
            scramble(model)
            raise RuntimeError("tool failed")
    assert_bit_identical(model, reference)


def test_preserve_keeps_nan_payloads_and_negative_zero():
    model = small_model()
    with torch.no_grad():
        model[6].bias.copy_(torch.tensor([float("nan"), -0.0, 1.0]))
    reference = copy.deepcopy(model)
    with preserve(model) as saved:
        assert torch.equal(saved.parameters["6.weight"][1], reference[6].weight)
        with torch.no_grad():
            model[6].bias.fill_(0.0)
    assert_bit_identical(model, reference)


class _Failing(Handle):
    """A change that cannot be applied (it raises before changing anything)."""

    def _apply(self) -> None:
        raise RuntimeError("cannot apply")


class _Scale(Handle):
    def __init__(self, layer: nn.Module, factor: float) -> None:
        super().__init__()
        self.layer, self.factor = layer, factor
        self._patch = Patch()

    def _apply(self) -> None:
        self._patch.set_tensor(self.layer, "weight", self.layer.weight * self.factor)
        self._patch.set_attr(self.layer, "scaled", True)

    def _undo(self) -> None:
        self._patch.undo()


def test_register_all_registers_every_handle_in_order():
    model = small_model()
    reference = copy.deepcopy(model)
    handles = [_Scale(model[0], 2.0), _Scale(model[0], 3.0), _Scale(model[6], -1.0)]
    composite = register_all(handles)
    assert isinstance(composite, CompositeHandle) and composite.registered and all(h.registered for h in handles)
    torch.testing.assert_close(model[0].weight, reference[0].weight * 6.0)
    composite.remove()
    assert_bit_identical(model, reference)


def test_register_all_rolls_back_when_a_handle_fails_mid_way():
    model = small_model()
    reference = copy.deepcopy(model)
    handles = [_Scale(model[0], 2.0), _Scale(model[6], 3.0), _Failing(), _Scale(model[6], 5.0)]
    with pytest.raises(RuntimeError, match="cannot apply"):
        register_all(handles)
    assert not any(h.registered for h in handles)
    assert not hasattr(model[0], "scaled") and not hasattr(model[6], "scaled")
    assert_bit_identical(model, reference)


def test_register_all_rolls_back_when_the_iterable_fails():
    model = small_model()
    reference = copy.deepcopy(model)

    def handles():
        yield _Scale(model[0], 2.0)
        yield merge_batchnorm(model, skip_unmergeable=True)
        raise ValueError("no more handles")

    with pytest.raises(ValueError, match="no more handles"):
        register_all(handles())
    assert_bit_identical(model, reference)
    assert not any(m._forward_hooks for m in model.modules())
