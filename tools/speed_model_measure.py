"""onebit's AVX2 conv tiles timed on this machine, in cycles per inner-loop iteration, beside llvm-mca's estimate.

    cycles / iteration = (t(C_in = 1024) - t(C_in = 512)) / (iterations(1024) - iterations(512)) x clock

The difference of two layers that differ only in input channels leaves the inner loop alone: the
epilogue, the pixel walk and the call's overhead are the same in both and cancel. A layer is
1 x C_in x 14 x 14 -> 256 channels, 3x3, no padding (144 output pixels, a multiple of every tile's
pixel count), int32 output, one thread, the tile forced with ``_C.set_tile``; a tile of P pixels x
C channels runs (144 / P) (256 / C) 9 (C_in / 64) iterations. The clock is measured in the same
process as a chain of dependent 1-cycle ``add`` instructions (compiled with ``cc`` into a temporary
library), so a turbo or a throttled core is read, not assumed. Samples interleave the tiles, the
two layers and the clock probe; each takes its fastest sample (the one least disturbed by other
processes on a shared machine, where a median mixes in their time slices).
"""

from __future__ import annotations

import ctypes
import pathlib
import subprocess
import tempfile
import time

ADDS_PER_ROUND = 200
PROBE_SOURCE = f"""
#include <stdint.h>
uint64_t add_chain(uint64_t rounds) {{
  uint64_t x = 0;
  for (uint64_t i = 0; i < rounds; ++i)
    __asm__ volatile(".rept {ADDS_PER_ROUND}\\n\\taddq $1, %0\\n\\t.endr" : "+r"(x));
  return x;
}}
"""
PIXELS, OUT_CHANNELS, SIZE = 144, 256, 14
IN_CHANNELS = (512, 1024)
TILES = {"2x16": (2, 16), "3x8": (3, 8), "4x8": (4, 8)}


def _clock_probe() -> ctypes.CDLL:
    """A function add_chain(rounds) that takes rounds x ADDS_PER_ROUND cycles."""
    folder = pathlib.Path(tempfile.mkdtemp())
    (folder / "probe.c").write_text(PROBE_SOURCE)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", folder / "probe.so", folder / "probe.c"], check=True)
    lib = ctypes.CDLL(str(folder / "probe.so"))
    lib.add_chain.argtypes = [ctypes.c_uint64]
    lib.add_chain.restype = ctypes.c_uint64
    return lib


def _seconds(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def iterations(tile: str, in_channels: int) -> int:
    """Inner-loop iterations of one call of the measured layer with ``tile``."""
    pixels, channels = TILES[tile]
    return (PIXELS // pixels) * (OUT_CHANNELS // channels) * 9 * (in_channels // 64)


def measure_avx2(reps: int = 30, calls: int = 5) -> tuple[dict[str, float], float]:
    """({tile: measured cycles per iteration}, clock in GHz), one thread, fastest interleaved samples."""
    import torch

    from onebit import _C
    from onebit.engine import kernels as K

    torch.manual_seed(0)
    torch.set_num_threads(1)
    _C.set_isa("avx2")
    probe = _clock_probe()
    probe_rounds = 20_000
    layers = {}
    for cin in IN_CHANNELS:
        x = torch.randn(1, cin, SIZE, SIZE)
        wp = K.pack_weights(torch.randn(OUT_CHANNELS, cin, 3, 3))
        xp = K.pack_activations(x, 0, 0.0)
        conv = dict(in_channels=cin, out_channels=OUT_CHANNELS, kernel_size=3, cache=K.WeightCache())
        layers[cin] = (xp, wp, conv)
    samples: dict[tuple[str, int], list[float]] = {(t, c): [] for t in TILES for c in IN_CHANNELS}
    clock: list[float] = []
    try:
        for _ in range(reps):
            clock.append(probe_rounds * ADDS_PER_ROUND / _seconds(lambda: probe.add_chain(probe_rounds), 3) / 1e9)
            for tile in TILES:
                _C.set_tile("avx2", tile)
                for cin, (xp, wp, conv) in layers.items():
                    run = lambda xp=xp, wp=wp, conv=conv: K.binary_conv2d_int(xp, wp, **conv)  # noqa: E731
                    run()
                    samples[(tile, cin)].append(_seconds(run, calls))
    finally:
        _C.set_tile("avx2", "auto")
    ghz = max(clock)
    lo, hi = IN_CHANNELS
    cycles = {}
    for tile in TILES:
        dt = min(samples[(tile, hi)]) - min(samples[(tile, lo)])
        cycles[tile] = dt * ghz * 1e9 / (iterations(tile, hi) - iterations(tile, lo))
    return cycles, ghz


def compare_avx2(rows) -> str:
    """A markdown table: each AVX2 tile measured here against every x86 model's estimate."""
    measured, ghz = measure_avx2()
    cpus = sorted({r.cpu for r in rows if r.kernel.startswith("onebit AVX2")})
    lines = [
        f"AVX2 tiles measured on this machine (clock {ghz:.2f} GHz by an add chain), cycles per iteration;",
        "each model's column: its estimate / measured.",
        "",
        "| tile | measured | " + " | ".join(cpus) + " |",
        "|---|---:|" + "---:|" * len(cpus),
    ]
    for tile, cycles in measured.items():
        cells = []
        for cpu in cpus:
            est = next(r for r in rows if r.kernel == f"onebit AVX2 {tile}" and r.cpu == cpu).mca.cycles_per_iteration
            cells.append(f"{est:.1f} ({est / cycles:.2f})")
        lines.append(f"| {tile} | {cycles:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
