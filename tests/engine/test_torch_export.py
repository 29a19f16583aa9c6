"""torch.export of a PackedModel: the onebit kernels as registered custom ops, saved and loaded."""

import pytest
import torch
from torch import nn

import onebit
from exported_programs import gives_in_fresh_process
from onebit import engine
from onebit.nn import QActivation, QConv2d, QLinear


def noact_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        QActivation("ste_sign"),
        QConv2d(16, 16, 3, padding=1, weight_quantizer="magnitude_aware_sign"),  # with a bias
        nn.BatchNorm2d(16),
        QActivation("ste_sign"),
        QConv2d(16, 8, 3, padding=1, pad_value=-1.0, weight_quantizer="ste_sign"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    ).eval()


@pytest.mark.parametrize("name", ["lenet_binary", "birealnet_small", "noact"])
def test_exported_packed_model_saves_loads_and_gives_identical_outputs(name, tmp_path):
    if name == "noact":
        model, x = noact_model(), torch.randn(2, 3, 8, 8)
    else:
        model = onebit.models.create(name, in_channels=1).eval()
        x = torch.randn(2, 1, *((8, 8) if name == "lenet_binary" else (28, 28)))
    packed = engine.pack(model, x, strict=True)
    program = torch.export.export(packed, (x,))
    code = program.graph_module.code
    assert "torch.ops.onebit.binary_conv2d" in code  # the native kernels, as custom ops
    path = tmp_path / "packed.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    assert torch.equal(loaded.module()(x), packed(x))
    assert torch.equal(loaded.module()(x), model(x))

    # a fresh process: importing onebit registers the ops the program names
    result = gives_in_fresh_process(path, x, packed(x))
    assert result.returncode == 0, result.stderr


def float_input_binary_weight_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        QConv2d(3, 8, 3, padding=1, padding_mode="reflect", input_quantizer="ste_sign", weight_quantizer="ste_sign"),
        QConv2d(8, 8, 3, padding=1, weight_quantizer="magnitude_aware_sign"),  # float input: runs in float
        nn.Flatten(2),
        QLinear(64, 5, input_quantizer="ste_sign", weight_quantizer="ste_sign"),  # on [N, C, L]: runs in float
    ).eval()


@pytest.mark.parametrize("name", ["lenet_larq", "fallbacks"])
def test_models_with_layers_run_in_float_on_bit_weights_export_and_run_identically(name):
    if name == "lenet_larq":
        model, x = onebit.models.create(name, in_channels=1).eval(), torch.randn(2, 1, 28, 28)
    else:
        model, x = float_input_binary_weight_model(), torch.randn(2, 3, 8, 8)
    with pytest.warns(engine.FallbackWarning):
        packed = engine.pack(model, x)
    assert any(
        "weight_bits" in n["tensors"] for n in packed.graph["nodes"]
    )  # float layers on +-1 weights stored as bits
    program = torch.export.export(packed, (x,))
    for batch in (x, torch.randn_like(x)):
        assert torch.equal(program.module()(batch), packed(batch))
        assert torch.equal(program.module()(batch), model(batch))


@pytest.mark.parametrize("name", ["lenet_binary", "birealnet_small", "noact"])
def test_a_dynamic_batch_export_runs_every_batch_size_from_zero(name):
    """``Dim("batch", min=0)``: one program for an empty batch, one example and any number
    up to the maximum (no batch-dependent choice of the engine becomes a guard)."""
    if name == "noact":
        model, shape = noact_model(), (3, 8, 8)
    else:
        model = onebit.models.create(name, in_channels=1).eval()
        shape = (1, 8, 8) if name == "lenet_binary" else (1, 28, 28)
    x = torch.randn(4, *shape)
    packed = engine.pack(model, x, strict=True)
    batch = torch.export.Dim("batch", min=0, max=1 << 20)
    program = torch.export.export(packed, (x,), dynamic_shapes=({0: batch},))
    (limits,) = program.range_constraints.values()
    assert (limits.lower, limits.upper) == (0, 1 << 20)
    for n in (0, 1, 2, 15, 16, 17, 100):
        xn = torch.randn(n, *shape)
        assert torch.equal(program.module()(xn), packed(xn)), n
