"""The specification of ``onebit.engine.ops.relayout``: a float32 ``[N, C, H, W]`` tensor copied into
channels_last or NCHW memory, equal to torch's ``x.contiguous(memory_format=...)`` in every value bit
and every stride, on every instruction set the machine supports (forced with ``_C.set_isa``)."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import onebit
from onebit import _C, engine
from onebit.engine import kernels as K
from onebit.engine import ops
from onebit.engine.kernels import memory_formats

ISAS = _C.supported_isas()
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
CHANNELS = (1, 3, 7, 16, 64, 65, 512)
SIDES = ((1, 1), (1, 5), (3, 3), (7, 7), (5, 13), (14, 14), (112, 112))

pytestmark = pytest.mark.usefixtures("restore_isa_and_threads")  # tests switch ISAs and threads


@pytest.fixture
def native_for_every_size(monkeypatch):
    """Small tensors take the native copy too (by default torch's copy takes them)."""
    monkeypatch.setattr(memory_formats, "NATIVE_MIN_ELEMENTS", 1)


def other_format(fmt: torch.memory_format) -> torch.memory_format:
    return torch.contiguous_format if fmt == torch.channels_last else torch.channels_last


def random_bits(shape) -> torch.Tensor:
    """float32 values of any bit pattern (NaNs with payloads, infinities, -0.0, subnormals)."""
    n = 1
    for s in shape:
        n *= s
    return torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64).to(torch.int32).view(torch.float32).view(shape)


def assert_same_copy(out: torch.Tensor, x: torch.Tensor, fmt: torch.memory_format) -> None:
    """``out`` is what ``x.contiguous(memory_format=fmt)`` gives: bits, shape and strides."""
    expected = x.contiguous(memory_format=fmt)
    assert out.shape == expected.shape
    assert out.stride() == expected.stride()
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.usefixtures("native_for_every_size")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("target", FORMATS)
def test_relayout_equals_torchs_copy_for_every_shape(isa, target):
    _C.set_isa(isa)
    fmt = FORMATS[target]
    for c in CHANNELS:
        for h, w in SIDES:
            for n in (0, 1, 3):
                if n * c * h * w > 3 * 512 * 14 * 14:
                    continue
                x = random_bits((n, c, h, w)).contiguous(memory_format=other_format(fmt))
                assert_same_copy(ops.relayout(x, fmt), x, fmt)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("target", FORMATS)
@pytest.mark.parametrize("threads", (1, 2))
def test_relayout_of_the_stem_activation_on_one_and_two_threads(isa, target, threads):
    torch.set_num_threads(threads)
    _C.set_isa(isa)
    fmt = FORMATS[target]
    x = random_bits((1, 64, 112, 112)).contiguous(memory_format=other_format(fmt))
    assert_same_copy(K.relayout(x, fmt), x, fmt)


@pytest.mark.parametrize("target", FORMATS)
def test_a_tensor_already_in_the_format_is_returned_itself(target):
    fmt = FORMATS[target]
    for shape in ((2, 16, 5, 5), (1, 1, 4, 4), (3, 8, 1, 1), (0, 4, 2, 2)):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        assert ops.relayout(x, fmt) is x


def strided_inputs() -> dict[str, torch.Tensor]:
    """Views of one tensor with strides of every kind: slices, steps, permutations, broadcasts, offsets."""
    base = random_bits((4, 70, 9, 11))
    return {
        "channel slice": base[:, 3:68],
        "batch step": base[::2],
        "spatial crop": base[:, :, 1:8, 2:9],
        "spatial step": base[:, :, ::2, ::3],
        "channels_last slice": base.contiguous(memory_format=torch.channels_last)[:, 5:40],
        "channels_last crop": base.contiguous(memory_format=torch.channels_last)[:, :, 2:7],
        "permuted": base.permute(0, 1, 3, 2),
        "expanded": base[:1, :, :1, :].expand(3, 70, 4, 11),
        "storage offset": base.reshape(-1)[5 : 5 + 2 * 70 * 9 * 10].view(2, 70, 9, 10),
    }


@pytest.mark.usefixtures("native_for_every_size")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("target", FORMATS)
@pytest.mark.parametrize("case", list(strided_inputs()))
def test_strided_inputs_are_copied_like_torch(isa, target, case):
    _C.set_isa(isa)
    fmt = FORMATS[target]
    x = strided_inputs()[case]
    assert_same_copy(ops.relayout(x, fmt), x, fmt)


def test_the_reference_backend_gives_the_same_copy():
    x = random_bits((2, 65, 7, 9))
    with ops.use_backend("reference"):
        out = ops.relayout(x, torch.channels_last)
    assert_same_copy(out, x, torch.channels_last)


class CountingNative:
    """Stands in for ``onebit._C`` in the relayout module, counting the native copies."""

    def __init__(self):
        self.calls = 0

    def relayout_raw(self, *args):
        self.calls += 1
        return _C.relayout_raw(*args)


def test_plain_tensors_take_the_native_copy_from_the_smallest_native_size(monkeypatch):
    native = CountingNative()
    monkeypatch.setattr(memory_formats, "_C", native)
    small = random_bits((1, 16, 8, 8))
    assert small.numel() < memory_formats.NATIVE_MIN_ELEMENTS
    assert_same_copy(ops.relayout(small, torch.channels_last), small, torch.channels_last)
    assert native.calls == 0
    x = random_bits((2, 16, 15, 16))
    assert_same_copy(ops.relayout(x, torch.channels_last), x, torch.channels_last)
    y = x.contiguous(memory_format=torch.channels_last)[:, 2:11]
    assert_same_copy(ops.relayout(y, torch.contiguous_format), y, torch.contiguous_format)
    assert native.calls == 2


def test_autograd_and_tracing_keep_torchs_copy(monkeypatch):
    native = CountingNative()
    monkeypatch.setattr(memory_formats, "_C", native)
    x = torch.randn(1, 64, 8, 8, requires_grad=True)
    assert ops.relayout(x, torch.channels_last).grad_fn is not None
    traced = make_fx(lambda t: ops.relayout(t, torch.channels_last))(torch.randn(1, 64, 8, 8))
    y = torch.randn(1, 64, 8, 8)
    assert_same_copy(traced(y), y, torch.channels_last)
    assert native.calls == 0


def test_a_packed_model_converts_with_the_native_copy_and_gives_torchs_outputs(monkeypatch):
    """An NCHW input to a packed model whose binary convolutions write channels_last: the float ops
    between them get NCHW values by the native copy, and every output is what torch's copy gives."""
    torch.manual_seed(0)
    model = onebit.models.create("birealnet_small", num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        packed = engine.pack(model, x)
        native = CountingNative()
        monkeypatch.setattr(memory_formats, "_C", native)
        out = packed(x)
        assert native.calls > 0
        monkeypatch.setattr(ops, "relayout", lambda t, fmt: t.contiguous(memory_format=fmt))
        expected = packed(x)
    assert torch.equal(out, expected) and out.stride() == expected.stride()


@pytest.mark.parametrize(
    ("x", "fmt", "message"),
    [
        (torch.zeros(1, 2, 3, 3, dtype=torch.float64), torch.channels_last, "x must have dtype torch.float32"),
        (torch.zeros(1, 2, 3, 3, dtype=torch.int32), torch.channels_last, "x must have dtype torch.float32"),
        (torch.zeros(2, 3, 3), torch.channels_last, "x must have 4 dimensions"),
        (torch.zeros(1, 2, 3, 3, 3), torch.contiguous_format, "x must have 4 dimensions"),
        (torch.zeros(1, 2, 3, 3, device="meta"), torch.channels_last, "x must be on the CPU"),
        ([[1.0]], torch.channels_last, "x must be a torch.Tensor"),
        (torch.zeros(1, 2, 3, 3), torch.preserve_format, "memory_format must be torch.channels_last"),
        (torch.zeros(1, 2, 3, 3), "channels_last", "memory_format must be torch.channels_last"),
    ],
)
def test_bad_inputs_raise_a_clear_error_naming_the_argument(x, fmt, message):
    for backend in ("auto", "reference"):
        with ops.use_backend(backend), pytest.raises(ValueError, match=message):
            ops.relayout(x, fmt)


def test_the_native_binding_rejects_null_and_negative_numbers():
    out = torch.empty(4)
    with pytest.raises(ValueError, match="null tensor"):
        _C.relayout_raw(0, 1, 2, 2, 4, 2, out.data_ptr(), 1)
    with pytest.raises(ValueError, match="negative shape"):
        _C.relayout_raw(out.data_ptr(), 1, -2, 2, 4, 2, out.data_ptr(), 1)
