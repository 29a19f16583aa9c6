import pytest
import torch
from hypothesis import settings

settings.register_profile("onebit", deadline=None, print_blob=True)
settings.load_profile("onebit")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def restore_isa_and_threads():
    """Puts back the active native ISA and torch's thread count after a test that changes them."""
    from onebit import _C

    isa, threads = _C.isa(), torch.get_num_threads()
    yield
    _C.set_isa(isa)
    torch.set_num_threads(threads)


def sign_reference(x: torch.Tensor) -> torch.Tensor:
    """Independent statement of the sign convention: +1 for x >= 0 (and -0.0), -1 below."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
