"""Quantized layers: the specification y = conv(pad(q_in(x), pad_value), levels(W)) * scale + bias,
and drop-in behaviour.

The convolution of quantized operands is exact (integer sums of +-1), and the scale and bias
are applied after it, once each: the same bits in every layout, on every CPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import sign_reference
from onebit.nn import QActivation, QConv1d, QConv2d, QConv3d, QLinear

BINARY = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}
CONV = {1: (QConv1d, nn.Conv1d, F.conv1d), 2: (QConv2d, nn.Conv2d, F.conv2d), 3: (QConv3d, nn.Conv3d, F.conv3d)}


def plus_bias(y, bias):
    """``y + bias`` per channel (dim 1): one float rounding of the exact sum."""
    return y if bias is None else y + bias.view(1, -1, *([1] * (y.dim() - 2)))


def reference_binary_conv(x, layer, pad_value):
    """Independent reference: explicit constant padding of sign(x), float conv with sign(W), then the bias."""
    ndim = x.dim() - 2
    pad = []
    for p in reversed(layer.padding):
        pad += [p, p]
    xs = F.pad(sign_reference(x), pad, value=pad_value)
    conv = CONV[ndim][2]
    return plus_bias(
        conv(xs, sign_reference(layer.weight), None, layer.stride, 0, layer.dilation, layer.groups), layer.bias
    )


@st.composite
def conv2d_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 100 // groups))
    cout = groups * draw(st.integers(1, 70 // groups))
    k = draw(st.integers(1, 5))
    kw = draw(st.sampled_from([k, max(1, k - 1)]))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 3))
    h = draw(st.integers(max(1, dilation * (k - 1) + 1 - 2 * padding), 11))
    w = draw(st.integers(max(1, dilation * (kw - 1) + 1 - 2 * padding), 11))
    return dict(
        cin=cin,
        cout=cout,
        kernel=(k, kw),
        stride=stride,
        dilation=dilation,
        padding=padding,
        groups=groups,
        bias=draw(st.booleans()),
        pad_value=draw(st.sampled_from([0.0, 1.0, -1.0])),
        batch=draw(st.integers(1, 3)),
        h=h,
        w=w,
    )


@settings(max_examples=120)
@given(conv2d_configs())
def test_qconv2d_equals_float_conv_of_explicitly_padded_signs(c):
    layer = QConv2d(
        c["cin"],
        c["cout"],
        c["kernel"],
        c["stride"],
        c["padding"],
        c["dilation"],
        c["groups"],
        c["bias"],
        pad_value=c["pad_value"],
        **BINARY,
    )
    x = torch.randn(c["batch"], c["cin"], c["h"], c["w"])
    x[x.abs() < 0.1] = 0.0  # exact zeros must behave as +1
    out, expected = layer(x), reference_binary_conv(x, layer, c["pad_value"])
    assert torch.equal(out, expected)  # sums of +-1 are exact integers; the bias is added once, after


@pytest.mark.parametrize("ndim", [1, 3])
@pytest.mark.parametrize("pad_value", [0.0, 1.0, -1.0])
def test_qconv1d_and_qconv3d_follow_the_same_specification(ndim, pad_value):
    cls = CONV[ndim][0]
    layer = cls(6, 5, 3, stride=2, padding=1, dilation=1, groups=1, pad_value=pad_value, **BINARY)
    x = torch.randn(2, 6, *([7] * ndim))
    assert torch.equal(layer(x), reference_binary_conv(x, layer, pad_value))


def test_pad_value_zero_is_exactly_zero_not_minus_one():
    layer = QConv2d(1, 1, 3, padding=1, bias=False, **BINARY)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.ones(1, 1, 3, 3)
    # a corner sees 4 in-image +1 taps and 5 padded taps worth 0: 4 exactly
    out = layer(x)
    assert out[0, 0, 0, 0].item() == 4.0 and out[0, 0, 1, 1].item() == 9.0
    assert QConv2d(1, 1, 3, padding=1, bias=False, pad_value=-1.0, **BINARY).pad_value == -1.0


@pytest.mark.parametrize("padding", ["same", "valid", (2, 0), 1])
@pytest.mark.parametrize("pad_value", [0.0, -1.0])
def test_padding_forms(padding, pad_value):
    layer = QConv2d(3, 4, (4, 3), padding=padding, pad_value=pad_value, **BINARY)
    x = torch.randn(2, 3, 9, 8)
    xs = sign_reference(x)
    if padding == "same":
        xs = F.pad(xs, (1, 1, 1, 2), value=pad_value)  # total 3 rows: 1 before, 2 after, as torch does
    elif padding != "valid":
        p = (padding, padding) if isinstance(padding, int) else padding
        xs = F.pad(xs, (p[1], p[1], p[0], p[0]), value=pad_value)
    expected = plus_bias(F.conv2d(xs, sign_reference(layer.weight)), layer.bias)
    out = layer(x)
    assert torch.equal(out, expected)
    if padding == "same":
        assert out.shape[-2:] == x.shape[-2:]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_other_padding_modes_pad_the_quantized_input(mode):
    layer = QConv2d(3, 4, 3, padding=1, padding_mode=mode, **BINARY)
    x = torch.randn(2, 3, 6, 6)
    expected = plus_bias(
        F.conv2d(F.pad(sign_reference(x), (1, 1, 1, 1), mode=mode), sign_reference(layer.weight)), layer.bias
    )
    assert torch.equal(layer(x), expected)


def test_pad_value_outside_zero_plus_minus_one_is_refused():
    with pytest.raises(ValueError, match="pad_value"):
        QConv2d(3, 4, 3, padding=1, pad_value=0.5)
    with pytest.raises(ValueError, match="padding_mode"):
        QConv2d(3, 4, 3, padding=1, padding_mode="reflect", pad_value=-1.0)


def test_noact_variant_keeps_the_input_float():
    layer = QConv2d(3, 4, 3, padding=1, weight_quantizer="ste_sign")
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(layer(x), F.conv2d(x, sign_reference(layer.weight), layer.bias, padding=1), atol=1e-5)


def test_without_quantizers_a_qconv_is_the_torch_conv():
    q = QConv2d(3, 4, 3, padding=1)
    t = nn.Conv2d(3, 4, 3, padding=1)
    t.load_state_dict(q.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(q(x), t(x))


def test_qlinear_equals_float_linear_of_signs():
    layer = QLinear(70, 13, **BINARY)
    x = torch.randn(4, 5, 70)
    expected = F.linear(sign_reference(x), sign_reference(layer.weight)) + layer.bias
    assert torch.equal(layer(x), expected)


def test_magnitude_aware_weights_are_scaled_signs():
    layer = QConv2d(4, 3, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="magnitude_aware_sign")
    x = torch.randn(1, 4, 5, 5)
    alpha = layer.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
    # the same map as a conv with alpha * sign(W) ...
    loose = F.conv2d(sign_reference(x), alpha * sign_reference(layer.weight), layer.bias, padding=1)
    assert torch.allclose(layer(x), loose, atol=1e-5)
    # ... computed exactly as the integer conv, then alpha, then the bias (two roundings)
    exact = F.conv2d(sign_reference(x), sign_reference(layer.weight), padding=1) * alpha.view(1, -1, 1, 1)
    assert torch.equal(layer(x), plus_bias(exact, layer.bias))


def test_magnitude_aware_gradient_is_alpha_times_the_ste():
    layer = QConv2d(4, 3, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="magnitude_aware_sign")
    x = torch.randn(2, 4, 5, 5)
    twin = nn.Conv2d(4, 3, 3, padding=1)
    w = layer.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    twin.weight.data = alpha * sign_reference(w)
    twin.bias.data = layer.bias.detach().clone()
    g = torch.randn(2, 3, 5, 5)
    layer(x).backward(g)
    twin(sign_reference(x)).backward(g)
    expected = twin.weight.grad * (w.abs() <= 1).float() * alpha
    assert torch.allclose(layer.weight.grad, expected, atol=1e-5)
    assert torch.allclose(layer.bias.grad, twin.bias.grad, atol=1e-5)


def test_qactivation_applies_its_quantizer():
    act = QActivation("ste_sign")
    x = torch.tensor([-1.0, 0.0, 2.0])
    assert act(x).tolist() == [-1.0, 1.0, 1.0]
    assert act.precision == 1
    with pytest.raises(ValueError):
        QActivation(None)


# ----------------------------------------------------------------------------- no mutation in forward


def all_state(module):
    return {k: v.clone() for k, v in module.state_dict(keep_vars=False).items()}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("weight_quantizer", ["ste_sign", "magnitude_aware_sign", "dorefa"])
def test_forward_never_changes_a_parameter_or_buffer(mode, weight_quantizer):
    model = nn.Sequential(
        QConv2d(3, 8, 3, padding=1, input_quantizer="ste_sign", weight_quantizer=weight_quantizer),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        QLinear(8 * 25, 4, input_quantizer="ste_sign", weight_quantizer=weight_quantizer),
    )
    getattr(model, mode)()
    layers = [model[0], model[3]]
    before = [all_state(layer) for layer in layers]
    ids = [layer.weight.data_ptr() for layer in layers]
    x = torch.randn(2, 3, 5, 5)
    for _ in range(3):
        model(x).sum().backward()  # gradients accumulate, parameters stay
    for layer, state, ptr in zip(layers, before, ids):
        for key, value in state.items():
            assert torch.equal(layer.state_dict()[key], value), key
        assert layer.weight.data_ptr() == ptr


def test_forward_is_deterministic_across_modes():
    layer = QConv2d(5, 6, 3, padding=1, **BINARY)
    x = torch.randn(2, 5, 6, 6)
    train_out = layer.train()(x)
    assert torch.equal(layer.eval()(x), train_out)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("weight_quantizer", ["ste_sign", "magnitude_aware_sign"])
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "strided", "transposed_hw"])
def test_every_input_layout_gives_the_same_output_and_gradient(layout, weight_quantizer):
    # with a bias: the exact integer conv first, then alpha and the bias, in any layout
    layer = QConv2d(6, 7, 3, padding=1, pad_value=-1.0, input_quantizer="ste_sign", weight_quantizer=weight_quantizer)
    base = torch.randn(2, 6, 9, 9)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    elif layout == "strided":
        big = torch.randn(2, 12, 9, 18)
        big[:, ::2, :, ::2] = base
        x = big[:, ::2, :, ::2]
    else:
        x = base.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous() or layout == "channels_last"
    assert torch.equal(x, base)

    xa = base.clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True) if layout == "channels_last" else x.detach().requires_grad_(True)
    ya, yb = layer(xa), layer(xb)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)  # float sums in another order


# ----------------------------------------------------------------------------- errors


def test_wrong_channel_count_names_the_layer_and_expected_shape():
    layer = QConv2d(3, 8, 3, **BINARY)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(2, 4, 8, 8))
    message = str(info.value)
    assert "QConv2d" in message and "[N, 3, H, W]" in message and "[2, 4, 8, 8]" in message


def test_wrong_rank_and_dtype_are_named():
    layer = QConv2d(3, 8, 3, **BINARY)
    with pytest.raises(ValueError, match="rank"):
        layer(torch.randn(2, 3, 8, 8, 1))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[\*, 5\]"):
        QLinear(5, 2, **BINARY)(torch.randn(3, 4))


def test_errors_name_the_layer_inside_a_zoo_model():
    from onebit import models

    model = models.create("lenet_binary", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="'3'"):
        model[3](torch.randn(1, 5, 8, 8))


def test_unbatched_input_works_like_torch():
    layer = QConv2d(3, 4, 3, padding=1, **BINARY)
    x = torch.randn(3, 6, 6)
    assert torch.equal(layer(x), layer(x.unsqueeze(0))[0])


# ----------------------------------------------------------------------------- drop-in for torch.nn


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_state_dict_is_interchangeable_with_the_torch_layer(ndim):
    qcls, tcls, _ = CONV[ndim]
    q = qcls(4, 6, 3, 2, 1, 1, 2, True, **BINARY)
    t = tcls(4, 6, 3, 2, 1, 1, 2, True)
    assert list(q.state_dict()) == list(t.state_dict())
    q.load_state_dict(t.state_dict())
    assert torch.equal(q.weight, t.weight)
    t.load_state_dict(q.state_dict())
    assert isinstance(q, tcls)


def test_linear_state_dict_and_defaults_match_torch():
    q, t = QLinear(5, 3), nn.Linear(5, 3)
    assert list(q.state_dict()) == list(t.state_dict())
    assert q.bias is not None and q.input_quantizer is None and q.weight_quantizer is None


def test_positional_arguments_and_defaults_match_torch():
    q = QConv2d(3, 8, 3)
    t = nn.Conv2d(3, 8, 3)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(q, attr) == getattr(t, attr)
    assert (q.bias is None) == (t.bias is None)
    assert q.pad_value == 0.0
    with pytest.raises(TypeError):
        QConv2d(3, 8, 3, 1, 0, 1, 1, True, "zeros", None, None, "ste_sign")  # quantizers are keyword-only


def test_extra_repr_extends_torch_repr():
    q = QConv2d(3, 8, 3, padding=1, pad_value=-1.0, **BINARY)
    assert nn.Conv2d(3, 8, 3, padding=1).extra_repr() in repr(q)
    assert "pad_value=-1.0" in repr(q) and "Sign(clip=1.0)" in repr(q)


def test_deepcopy_keeps_behaviour_and_unshares_parameters():
    q = QConv2d(3, 8, 3, padding=1, **BINARY)
    c = copy.deepcopy(q)
    x = torch.randn(1, 3, 6, 6)
    assert torch.equal(c(x), q(x))
    assert c.weight.data_ptr() != q.weight.data_ptr()


def test_torch_compile_gives_the_same_output_and_gradients():
    layer = QConv2d(4, 5, 3, padding=1, pad_value=-1.0, **BINARY)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    ref = layer(x)
    out = compiled(x)
    assert torch.equal(out, ref)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gr,) = torch.autograd.grad(ref.sum(), x)
    assert torch.equal(gx, gr)


def test_plain_fx_symbolic_trace_sees_through_onebit_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), QConv2d(4, 5, 3, padding=1, **BINARY))
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(traced(x), model(x))
