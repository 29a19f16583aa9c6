import pytest
import torch
from hypothesis import settings

settings.register_profile("onebit", deadline=None, print_blob=True)
settings.load_profile("onebit")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def _native_isas() -> list[str]:
    """The instruction sets this CPU runs the native kernels on (none without the extension)."""
    try:
        from onebit import _C
    except ImportError:
        return []
    return _C.supported_isas()


@pytest.fixture(params=_native_isas())
def isa(request):
    """Each instruction set this CPU runs, made the active one for the test (the one before put back)."""
    from onebit import _C

    previous = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(previous)


@pytest.fixture(params=["torch", *_native_isas()])
def engine_backend(request):
    """Each way the engine runs: its pure-torch reference backend ("torch"), and the native kernels on
    each instruction set this CPU runs, made the active one for the test (the backend and ISA before put
    back)."""
    from onebit import _C
    from onebit.engine import ops

    if request.param == "torch":
        with ops.use_backend("reference"):
            yield request.param
        return
    previous = _C.isa()
    _C.set_isa(request.param)
    try:
        with ops.use_backend("native"):
            yield request.param
    finally:
        _C.set_isa(previous)


@pytest.fixture
def restore_isa_and_threads():
    """Puts back the active native ISA and torch's thread count after a test that changes them."""
    from onebit import _C

    isa, threads = _C.isa(), torch.get_num_threads()
    yield
    _C.set_isa(isa)
    torch.set_num_threads(threads)


def float_bits(t: torch.Tensor) -> torch.Tensor:
    """float32 values as their bits, to compare bit for bit (-0.0 is not 0.0; every NaN is the same NaN)."""
    return torch.where(t.isnan(), float("nan"), t).contiguous().view(torch.int32)


def sign_reference(x: torch.Tensor) -> torch.Tensor:
    """Independent statement of the sign convention: +1 for x >= 0 (and -0.0), -1 below."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def bitlinear(x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """BitLinear in torch ops: each token absmax-quantized to int8 (s = 127 / max|x|, a true division: torch's
    127.0 / m multiplies by a reciprocal), the exact integer product with the levels, then / s * scale (+ bias)."""
    m = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
    s = torch.full_like(m, 127.0) / m
    acc = (torch.round(x * s).clamp(-128, 127).double() @ levels.double().T).float()
    y = acc / s * scale
    return y if bias is None else y + bias
