"""Large packed tensors in transparent huge pages: the same values, 2 MiB-aligned, in huge pages where
the kernel grants them, kept by copies, and nothing else about the packed model changes."""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from onebit import engine
from onebit.engine import ops
from onebit.nn import BitLinear

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="no native kernels")
THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's THP mode (the bracketed word), None off Linux or without THP."""
    if not THP.exists():
        return None
    return THP.read_text().split("[")[1].split("]")[0]


def huge_kib_at(address: int) -> int | None:
    """AnonHugePages (KiB) of the mapping holding ``address`` in /proc/self/smaps; None when unknown."""
    smaps = pathlib.Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    inside = False
    for line in smaps.read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def fallbacks() -> int:
    stat = pathlib.Path("/proc/vmstat")
    if not stat.exists():
        return 0
    return sum(int(v) for k, v in (line.split() for line in stat.read_text().splitlines()) if k == "thp_fault_fallback")


def test_large_tensor_moves_to_aligned_huge_pages_with_its_values():
    from onebit.engine.kernels import HUGE_PAGE, in_huge_pages

    t = torch.randint(0, 256, (4096, 1536), dtype=torch.uint8)  # 6 MiB: three whole huge pages
    before = fallbacks()
    h = in_huge_pages(t)
    if thp_mode() in (None, "never"):
        assert h is t  # no advice taken: left where it is
        return
    assert h is not t and torch.equal(h, t) and h.dtype == t.dtype and h.shape == t.shape
    assert h.data_ptr() % HUGE_PAGE == 0
    assert h.untyped_storage().nbytes() == t.numel()  # the tensor owns exactly its bytes (no padding saved)
    kib = huge_kib_at(h.data_ptr())
    if kib is not None and fallbacks() == before:  # the kernel had huge pages to give
        assert kib >= 3 * 2048


@pytest.mark.parametrize(
    "t",
    [torch.randn(1000), torch.randn(2048, 1024)[:, ::2], torch.randn(2048, 512).t()],
    ids=["small", "strided", "transposed"],
)
def test_small_or_non_contiguous_tensors_stay_where_they_are(t):
    from onebit.engine.kernels import in_huge_pages

    assert in_huge_pages(t) is t


def test_packed_model_keeps_large_weights_in_huge_pages_through_copies_and_files(tmp_path):
    from onebit.engine.kernels import HUGE_PAGE

    if thp_mode() in (None, "never"):
        pytest.skip("no transparent huge pages here")
    torch.manual_seed(0)
    model = torch.nn.Sequential(BitLinear(4096, 4096), BitLinear(4096, 64)).eval()
    x = torch.randn(3, 4096)
    packed = engine.pack(model, x)
    large = [b for b in packed.buffers() if b.numel() * b.element_size() >= HUGE_PAGE]
    small = [b for b in packed.buffers() if b.numel() * b.element_size() < HUGE_PAGE]
    assert len(large) == 1 and all(b.data_ptr() % HUGE_PAGE == 0 for b in large)  # the 4096 x 4096 weight
    assert small  # the 4096 -> 64 layer's weight and the scales are left alone
    with torch.no_grad():
        want = model(x)
    assert torch.equal(packed(x), want)
    twin = copy.deepcopy(packed)
    assert all(b.data_ptr() % HUGE_PAGE == 0 for b in twin.buffers() if b.numel() >= HUGE_PAGE)
    assert torch.equal(twin(x), want)
    path = tmp_path / "bitlinear.onebit.safetensors"
    packed.save(str(path))
    loaded = engine.load(str(path))
    assert all(b.data_ptr() % HUGE_PAGE == 0 for b in loaded.buffers() if b.numel() >= HUGE_PAGE)
    assert torch.equal(loaded(x), want)
    assert path.stat().st_size < 4096 * 1024 + 64 * 1024 + 100_000  # 2-bit weights, nothing padded


def test_the_environment_can_turn_the_placement_off():
    script = (
        "import torch\n"
        "from onebit.engine.kernels import in_huge_pages\n"
        "t = torch.zeros(3 << 20, dtype=torch.uint8)\n"
        "print(in_huge_pages(t) is t)\n"
    )
    env = {**os.environ, "ONEBIT_HUGE_PAGES": "0"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
