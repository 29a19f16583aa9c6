"""Layouts: a packed model passes values on in the layout they come in, and only an op whose rounding
depends on the memory format gets its inputs in the model's own layout (``OpSpec.layout_free``).

So the specification is, op by op: an op declared layout-free gives the same values for an NCHW and a
channels_last input (on this machine's vector ISA, and again with torch forced to AVX2 in make test),
and a layout-bound op is one that does not; end to end, a packed model equals the model for inputs in
either layout, whatever layouts its steps pass on.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import onebit
from onebit import engine
from onebit.engine import graph as G

SHAPES = [(1, 64, 56, 56), (2, 17, 9, 11), (3, 5, 7, 7), (1, 512, 7, 7)]


def _per_channel(c: int, seed: int) -> torch.Tensor:
    return torch.randn(c, generator=torch.Generator().manual_seed(seed))


def _batch_norm(x):
    c = x.shape[1]
    var = _per_channel(c, 2).abs() + 0.1
    return G.OPS["batch_norm"].fn(
        {
            "running_mean": _per_channel(c, 1),
            "running_var": var,
            "weight": _per_channel(c, 3),
            "bias": _per_channel(c, 4),
        },
        {"eps": 1e-5},
        x,
    )


def _pool(op: str, **attrs):
    return lambda x: G.OPS[op].fn({}, attrs, x)


#: float ops declared layout-free, each as a function of one [N, C, H, W] input
LAYOUT_FREE = {
    "batch_norm": _batch_norm,
    "max_pool2d k3 s2 p1": _pool(
        "max_pool2d", kernel_size=[3, 3], stride=[2, 2], padding=[1, 1], dilation=[1, 1], ceil_mode=False
    ),
    "avg_pool2d k2 s2": _pool(
        "avg_pool2d",
        kernel_size=[2, 2],
        stride=[2, 2],
        padding=[0, 0],
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ),
    "avg_pool2d k3 s2 p1 ceil, padding not counted": _pool(
        "avg_pool2d",
        kernel_size=[3, 3],
        stride=[2, 2],
        padding=[1, 1],
        ceil_mode=True,
        count_include_pad=False,
        divisor_override=None,
    ),
    "adaptive_max_pool2d": _pool("adaptive_max_pool2d", output_size=[2, 3]),
    "add": lambda x: G.OPS["add"].fn({}, {"other": 0.0, "alpha": 0.7}, x, x * 1.3),
    "mul": lambda x: G.OPS["mul"].fn({}, {"other": 1.0}, x, x + 0.1),
    "div": lambda x: G.OPS["div"].fn({}, {"other": 3.0}, x),
    "prelu": lambda x: G.OPS["prelu"].fn({"weight": _per_channel(x.shape[1], 5)}, {}, x),
    "hardtanh": lambda x: G.OPS["hardtanh"].fn({}, {"min_val": -0.5, "max_val": 1.5}, x),
    "leaky_relu": lambda x: G.OPS["leaky_relu"].fn({}, {"negative_slope": 0.1}, x),
    "relu6": lambda x: G.OPS["relu6"].fn({}, {}, x),
    "dorefa": lambda x: G.OPS["dorefa"].fn({}, {"bits": 3}, x),
    "dorefa_sym": lambda x: G.OPS["dorefa_sym"].fn({}, {"bits": 3, "clip": 1.5}, x),
    "sign": lambda x: G.OPS["sign"].fn({}, {}, x),
    "twist_mix": lambda x: G.OPS["twist_mix"].fn({}, {}, x, x * 0.5, x - 1.0),
}


@pytest.mark.parametrize("name", sorted(LAYOUT_FREE))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_a_layout_free_op_gives_the_same_values_in_both_layouts(name, shape):
    op = name.split()[0]
    assert G.OPS[op].layout_free, f"{op} is not declared layout-free"
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 3
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    nchw, cl = LAYOUT_FREE[name](x.contiguous()), LAYOUT_FREE[name](x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(nchw, cl)
    assert torch.equal(torch.signbit(nchw), torch.signbit(cl))  # zeros keep their sign too


def test_the_layout_bound_ops_are_those_whose_values_depend_on_the_layout():
    """A float conv and an adaptive average pool round differently in the two layouts on some input:
    they are declared layout-bound, as a packed model must run them as the model does."""
    bound = sorted(op for op, spec in G.OPS.items() if not spec.layout_free)
    assert {"conv2d", "qconv2d", "adaptive_avg_pool2d"} <= set(bound)
    g = torch.Generator().manual_seed(0)
    differs = {"conv2d": False, "adaptive_avg_pool2d": False}
    for shape in SHAPES:
        x = torch.randn(*shape, generator=g)
        w = torch.randn(8, shape[1], 3, 3, generator=g)
        conv = {"weight": w}
        conv_attrs = G.attrs(
            {
                "op": "conv2d",
                "name": "c",
                "attrs": {
                    "in_channels": shape[1],
                    "out_channels": 8,
                    "kernel_size": [3, 3],
                    "stride": [1, 1],
                    "padding": [1, 1],
                    "explicit_padding": [1, 1, 1, 1],
                    "dilation": [1, 1],
                    "groups": 1,
                    "pad_value": 0.0,
                    "padding_mode": "zeros",
                },
            }
        )
        for op, run in (
            ("conv2d", lambda t, conv=conv, a=conv_attrs: G.OPS["conv2d"].fn(conv, a, t)),
            ("adaptive_avg_pool2d", lambda t: F.adaptive_avg_pool2d(t, 1)),
        ):
            differs[op] |= not torch.equal(run(x.contiguous()), run(x.contiguous(memory_format=torch.channels_last)))
    assert differs == {"conv2d": True, "adaptive_avg_pool2d": True}


@pytest.mark.parametrize("name", ["birealnet18", "resnete18", "birealnet_small_react", "binary_densenet28"])
def test_a_packed_model_equals_the_model_for_either_layout_and_returns_the_models_layout(name):
    torch.manual_seed(0)
    size = 28 if name.startswith("birealnet_small") else 64
    model = onebit.models.create(name, num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = engine.pack(model, x)
    with torch.no_grad():
        for inp in (x.contiguous(), x.contiguous(memory_format=torch.channels_last)):
            want, got = model(inp), packed(inp)
            assert torch.equal(got, want)
            assert got.stride() == want.stride()


class _PooledShortcut(torch.nn.Module):
    """A binary conv (the kernels write channels_last), pooled to 1 x 1, into a float 1 x 1 conv: the
    pooled value is contiguous in both formats, and torch's conv chooses its path by the strides."""

    def __init__(self):
        super().__init__()
        self.binary = onebit.nn.QConv2d(32, 64, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="ste_sign")
        self.pool = torch.nn.AvgPool2d(4)
        self.conv = torch.nn.Conv2d(64, 48, 1)

    def forward(self, x):
        return self.conv(self.pool(self.binary(x)))


def test_a_value_contiguous_in_both_formats_reaches_a_float_conv_with_the_models_strides():
    torch.manual_seed(0)
    model = _PooledShortcut().eval()
    x = torch.randn(3, 32, 4, 4, generator=torch.Generator().manual_seed(2))
    packed = engine.pack(model, x)
    seen = []
    conv = next(s for s in packed._steps if s.op == "conv2d")
    run = conv.run
    conv.run = lambda t: seen.append(t.stride()) or run(t)
    with torch.no_grad():
        for inp in (x.contiguous(), x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(packed(inp), model(inp))
    assert seen == [(64, 1, 1, 1), (64, 1, 64, 64)]  # as torch's pool gives them in each layout


class _BinaryIntoFloat(torch.nn.Module):
    """A binary conv read only by a float conv (layout-bound), a second binary conv whose output the model
    returns, and a float conv beside a binary one joined by a cat (maps of both layouts meet)."""

    def __init__(self):
        super().__init__()
        sign = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}
        self.binary = onebit.nn.QConv2d(16, 24, 3, padding=1, **sign)
        self.pointwise = torch.nn.Conv2d(24, 16, 1)
        self.side = onebit.nn.QConv2d(16, 16, 3, padding=1, **sign)
        self.last = onebit.nn.QConv2d(32, 8, 3, padding=1, **sign)

    def forward(self, x):
        y = self.pointwise(self.binary(x))
        return self.last(torch.cat([y, self.side(y)], 1))


def test_an_nchw_model_runs_its_layout_free_steps_channels_last_and_writes_nchw_where_it_is_read_so():
    """With an NCHW input: the binary conv read only by a float conv, and the one the model returns,
    write NCHW directly (``Step.writes_nchw``); the cat, where the float conv's NCHW map meets a binary
    conv's channels_last one, gets both in channels_last. Outputs and strides equal the model's."""
    torch.manual_seed(0)
    model = _BinaryIntoFloat().eval()
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(3))
    packed = engine.pack(model, x)
    writers = {s.output: s.writes_nchw for s in packed._steps if s.op == "binary_conv2d"}
    assert writers == {"binary": True, "side": False, "last": True}
    cat = next(s for s in packed._steps if s.op == "cat")
    seen, run = [], cat.run
    cat.run = lambda *maps: (
        seen.append([m.is_contiguous(memory_format=torch.channels_last) for m in maps]) or run(*maps)
    )
    with torch.no_grad():
        for inp in (x.contiguous(), x.contiguous(memory_format=torch.channels_last)):
            want, got = model(inp), packed(inp)
            assert torch.equal(got, want)
            assert got.stride() == want.stride()
    assert seen == [[True, True], [True, True]]


class _Stem(torch.nn.Module):
    """A ResNet stem (7x7, stride 2, 3 channels; torch's kernel on AVX-512 sums in the same order in both
    layouts) and a 1x1 conv (never the same order), each read by a binary conv."""

    def __init__(self):
        super().__init__()
        sign = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}
        self.stem = torch.nn.Conv2d(3, 16, 7, stride=2, padding=3)
        self.binary = onebit.nn.QConv2d(16, 16, 3, padding=1, **sign)
        self.pointwise = torch.nn.Conv2d(16, 32, 1)

    def forward(self, x):
        return self.pointwise(self.binary(self.stem(x)))


def torch_rounds_alike(conv: torch.nn.Conv2d, shape) -> bool:
    """Whether torch's conv gives the same bits in both layouts on a fresh input of wide dynamic range."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    with torch.no_grad():
        a, b = conv(x), conv(x.contiguous(memory_format=torch.channels_last))
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def test_a_float_conv_runs_channels_last_in_an_nchw_model_exactly_where_torch_rounds_alike_there():
    """``Step.layout_probe``: with an NCHW input, a float conv runs on channels_last maps when torch's conv
    gives the same bits there for the input's shape (as torch itself shows on a fresh input), else NCHW;
    the outputs equal the model's either way."""
    torch.manual_seed(0)
    model = _Stem().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    packed = engine.pack(model, x)
    seen: dict[str, list[bool]] = {"stem": [], "pointwise": []}
    for step in packed._steps:
        if step.op == "conv2d":
            run, name = step.run, step.output
            step.run = lambda t, run=run, name=name: seen[name].append(t.is_contiguous()) or run(t)
    with torch.no_grad():
        want, got = model(x), packed(x)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)) and got.stride() == want.stride()
    assert seen["stem"] == [not torch_rounds_alike(model.stem, (2, 3, 32, 32))]
    assert seen["pointwise"] == [not torch_rounds_alike(model.pointwise, (2, 16, 16, 16))]
    assert seen["pointwise"] == [True]  # a 1x1 conv sums in another order in each layout
