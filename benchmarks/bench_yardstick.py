"""onebit's binary conv as a fraction of a reference kernel's speed, measured in the same time window.

A *yardstick* is a plain single-file binary 3x3 conv (one source file, exact against a naive
conv, one kernel per ISA in a few register tiles), given by its path with ``--yardstick``. It is
compiled here twice: for the host (``-march=native``: its AVX-512 VPOPCNTDQ kernels, when the CPU
has them) and for AMD Zen 3 (``-march=znver3``: AVX2 with 16 ymm registers, as an AVX2-only CPU
runs it). It prints, per layer, thread count and variant, the median and minimum of its pack +
conv (float NCHW input to int32 output).

onebit's side (``--onebit packed``, the default) is the call a user makes: a packed model of the one
binary conv layer called on a float NCHW input, returning its float32 output in NCHW as torch would
(packed inside the conv's call, the output transposed as it is written); with ``--onebit layer``,
the conv step alone (``kernels.ConvLayer`` on the same input, channels_last output). Its ISA is set
to the same one, and it is timed per call in its own warm loop as the yardstick times itself;
Python's share of the call is included. Each row names the register tile onebit's timing chose, or
the kernel that writes an NCHW output itself (``nchw 48x4``: AVX-512, output rows of whole 8-pixel
groups, so the 64-channel layer's 56x56 map); ``--tiles`` also times onebit forced to each of its tiles
(which that kernel does not use), and to the yardstick's best variant's.

Each round runs the yardstick, then onebit, for every layer and ISA; rounds repeat the whole
sequence, so both sides see the same machine. Printed per (layer, threads, ISA): the yardstick's
best variant, both medians and ``fraction = yardstick / onebit`` (1.0 = as fast, above 1 =
faster). A shared virtual machine changes speed for seconds at a time (two vCPUs that share a
physical core run two threads at about 1.2x one, not 2x; both sides see it), so the summary
compares each side at its best round, ``best fraction = min yardstick / min onebit`` over the
rounds, and also gives the median and worst per-round fraction.

Usage::

    python benchmarks/bench_yardstick.py --yardstick ../shared/yardstick/bconv.cpp [--rounds 3]
        [--isa avx512 avx2] [--threads 1 2] [--seconds 0.3] [--onebit packed|layer] [--tiles]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

# The yardstick's layers, by its shape index: (batch, channels, size); 3x3, stride 1, padding 1.
LAYERS = {0: (1, 256, 14), 1: (8, 256, 14), 2: (1, 64, 56)}
# Which of its variants belong to which ISA, and how each is compiled.
VARIANT_PREFIX = {"avx512": "avx512_vpopcnt", "avx2": "avx2_nibble"}
MARCH = {"avx512": "native", "avx2": "znver3"}
PACK_LINE = re.compile(
    r"threads=(\d+) pack\(float NCHW->bits\) median ([\d.]+) ms \(min [\d.]+\) \| pack\+nibble-split median ([\d.]+) ms"
)
LINE = re.compile(
    r"threads=(\d+) (\S+ \S+)\s+conv median ([\d.]+) ms \(min ([\d.]+)\)\s+"
    r"pack\+conv median ([\d.]+) ms \(min ([\d.]+)\)"
)


def compile_yardstick(source: Path, march: str, out_dir: Path) -> Path:
    binary = out_dir / f"yardstick_{march}"
    cmd = ["g++", "-O3", f"-march={march}", "-fopenmp", "-std=c++17", str(source), "-o", str(binary)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"compiling the yardstick failed ({' '.join(cmd)}):\n{result.stderr}")
    return binary


def run_yardstick(binary: Path, isa: str, layer: int, seconds: float) -> dict[int, tuple[str, float]]:
    """{threads: (best variant, its pack+conv ms)} for one layer and ISA.

    A variant's pack+conv is the better of its timed pack+conv (two parallel regions back to back)
    and its pack and conv timed apart and added: at 2 threads the regions of the timed pair
    sometimes wait on each other (medians 2x their minimum), which is not the kernels' speed."""
    env = dict(os.environ, OMP_PROC_BIND="true", OMP_PLACES="cores")
    out = subprocess.run(
        [str(binary), str(seconds), VARIANT_PREFIX[isa], str(layer)], capture_output=True, text=True, env=env
    ).stdout
    pack = {int(m[1]): float(m[3] if isa == "avx2" else m[2]) for m in PACK_LINE.finditer(out)}
    if not pack or not LINE.search(out):
        head = "\n".join(out.splitlines()[:5]) or "(no output)"
        raise SystemExit(f"{binary.name} printed no {isa} timings for layer {layer} in the expected form:\n{head}")
    best: dict[int, tuple[str, float]] = {}
    for m in LINE.finditer(out):
        threads, name = int(m[1]), m[2]
        median = min(float(m[5]), float(m[3]) + pack[threads])
        if threads not in best or median < best[threads][1]:
            best[threads] = (name, median)
    return best


def onebit_call(kind: str, batch: int, channels: int, size: int):
    """``(call, tile)``: onebit's side as a user calls it (``packed``: a packed one-layer model on an NCHW
    input, NCHW output, as torch returns it) or the conv step alone (``layer``: ``kernels.ConvLayer`` on
    the same input, channels_last output); ``tile()`` names the register tile its conv runs with."""
    from onebit import engine
    from onebit import nn as onn
    from onebit.engine import kernels as K

    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    sign = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}
    model = torch.nn.Sequential(onn.QConv2d(channels, channels, 3, padding=1, **sign)).eval()
    packed = engine.pack(model, x)
    layer = packed._steps[0].layer
    if kind == "packed":
        call = partial(packed, x)
    else:
        call = partial(layer, x)

    shape = f"{channels}->{channels} @{size}x{size} k3x3 s1x1 p1x1 d1x1 g1 pad0"
    plan = K.conv_plan(K.MODE_FLOAT, x, layer.wp, *layer.conv).native

    def tile(isa: str) -> str:
        before = K._C.isa()
        K._C.set_isa(isa)
        try:
            nchw = plan.nchw_kernel if kind == "packed" else ""  # the kernel writing the NCHW output itself
        finally:
            K._C.set_isa(before)
        return nchw or next((t for i, s, t in K._C.tile_choices() if i == isa and s == shape), "?")

    return call, tile


def time_onebit(call, isa: str, threads: int, seconds: float, tile: str = "auto") -> tuple[float, float]:
    """(median, min) ms per ``call()`` in its own warm loop, on ``isa`` and ``threads``, the conv's register
    tile forced to ``tile`` (or chosen by timing: ``auto``)."""
    from onebit import _C

    before = _C.isa()
    _C.set_isa(isa)
    _C.set_tile(isa, tile)
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for _ in range(20):
                call()
            times, end = [], time.perf_counter() + seconds
            while len(times) < 200 or time.perf_counter() < end:
                start = time.perf_counter_ns()
                call()
                times.append(time.perf_counter_ns() - start)
    finally:
        _C.set_tile(isa, "auto")
        _C.set_isa(before)
    return statistics.median(times) / 1e6, min(times) / 1e6


def yardstick_tile(variant: str) -> str:
    """onebit's name of a yardstick variant's register tile: ``avx512_vpopcnt P7xJ4(32oc)`` -> ``7x32``."""
    m = re.search(r"P(\d+)xJ\d+\((\d+)oc\)", variant)
    return f"{m[1]}x{m[2]}" if m else "?"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--yardstick", type=Path, required=True, help="the yardstick's C++ source (bconv.cpp)")
    parser.add_argument("--isa", nargs="+", default=["avx512", "avx2"], choices=sorted(VARIANT_PREFIX))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--layers", nargs="+", type=int, default=sorted(LAYERS), choices=sorted(LAYERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per candidate and round")
    parser.add_argument(
        "--onebit",
        choices=["packed", "layer"],
        default="packed",
        help="onebit's side: a packed one-layer model called on an NCHW input (as users call it), or the conv "
        "step alone (kernels.ConvLayer, channels_last output)",
    )
    parser.add_argument("--tiles", action="store_true", help="also time onebit forced to each register tile, per layer")
    args = parser.parse_args(argv)
    if not args.yardstick.is_file():
        raise SystemExit(f"--yardstick: no such file: {args.yardstick}")

    from onebit import _C
    from onebit.heap import keep_freed_memory

    keep_freed_memory()  # outputs reuse the heap, as in `onebit bench`
    available = _C.supported_isas()
    isas = [isa for isa in args.isa if isa in available]
    for isa in sorted(set(args.isa) - set(isas)):
        print(f"# {isa}: not available on this CPU ({', '.join(available)}), skipped")
    print(
        f"# onebit vs the yardstick {args.yardstick}: torch {torch.__version__}, {os.cpu_count()} cpus, "
        f"{args.rounds} rounds, fraction = yardstick pack+conv / onebit pack+conv (median ms per call; "
        "the yardstick's is the better of its pack+conv and its pack + its conv)"
    )
    times: dict[tuple, list[tuple[float, float]]] = {}
    best_variant: dict[tuple, str] = {}
    calls = {layer: onebit_call(args.onebit, *LAYERS[layer]) for layer in args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        binaries = {isa: compile_yardstick(args.yardstick, MARCH[isa], Path(tmp)) for isa in isas}
        for rnd in range(args.rounds):
            print(f"# round {rnd + 1}")
            print(
                f"{'layer':>16} {'N':>2} {'thr':>3} {'isa':>6} {'yardstick (best variant)':>36} "
                f"{'onebit (tile)':>30} fraction"
            )
            for layer in args.layers:
                n, c, s = LAYERS[layer]
                call, tile = calls[layer]
                for isa in isas:
                    yard = run_yardstick(binaries[isa], isa, layer, args.seconds)
                    for t in args.threads:
                        if t not in yard:
                            continue
                        name, y_med = yard[t]
                        o_med, o_min = time_onebit(call, isa, t, args.seconds)
                        times.setdefault((layer, t, isa), []).append((y_med, o_med))
                        best_variant[(layer, t, isa)] = name
                        print(
                            f"{f'{c}->{c} @{s}x{s}':>16} {n:>2} {t:>3} {isa:>6} "
                            f"{name:>29} {y_med:.4f} {o_med:.4f} (min {o_min:.4f}, {tile(isa):>5}) "
                            f"{y_med / o_med:8.2f}",
                            flush=True,
                        )
    print("# summary over rounds: each side's best median (ms), best fraction; median and worst per-round fraction")
    print(
        f"{'layer':>16} {'N':>2} {'thr':>3} {'isa':>6} {'yardstick':>9} "
        f"{'onebit':>9} {'best':>5} {'median':>6} {'worst':>5}"
    )
    for (layer, t, isa), pairs in times.items():
        n, c, s = LAYERS[layer]
        yard, ours = min(y for y, _ in pairs), min(o for _, o in pairs)
        per_round = [y / o for y, o in pairs]
        print(
            f"{f'{c}->{c} @{s}x{s}':>16} {n:>2} {t:>3} {isa:>6} {yard:9.4f} {ours:9.4f} {yard / ours:5.2f} "
            f"{statistics.median(per_round):6.2f} {min(per_round):5.2f}"
        )
    if args.tiles:
        print_tiles(calls, isas, best_variant, times, args.seconds)


def print_tiles(calls: dict, isas: list[str], best_variant: dict, times: dict, seconds: float) -> None:
    """Per layer, ISA and thread count: onebit forced to each of its tiles (median ms), the tile its timing
    chose, and the yardstick's best variant's tile with onebit's fraction of the yardstick forced to it."""
    from onebit import _C

    print("# onebit forced to each register tile (median ms); * = the tile onebit's timing chose")
    for (layer, t, isa), pairs in times.items():
        n, c, s = LAYERS[layer]
        call, tile = calls[layer]
        chosen, ours = tile(isa), {}
        for name in _C.tiles(isa):
            ours[name] = time_onebit(call, isa, t, seconds, tile=name)[0]
        fastest = min(ours, key=ours.get)
        cells = " ".join(f"{name}{'*' if name == chosen else ''} {ms:.4f}" for name, ms in ours.items())
        target = yardstick_tile(best_variant[(layer, t, isa)])
        yard = min(y for y, _ in pairs)
        forced = f"{yard / ours[target]:.2f}" if target in ours else "(no such tile)"
        print(
            f"{f'{c}->{c} @{s}x{s}':>16} {n:>2} {t:>3} {isa:>6} {cells} | fastest {fastest}, chose {chosen}; "
            f"yardstick's {target}: fraction forced to it {forced}"
        )


if __name__ == "__main__":
    sys.exit(main())
