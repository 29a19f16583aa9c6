"""Loads a built onebit extension (``onebit/_C*.so``) by path and runs its kernels on every ISA it
reports, against plain Python loops: run by an arm64 CPython under qemu (make wheel-aarch64),
where torch (and so ``import onebit``) is not available, with the standard library alone.

Usage: python aarch64_wheel_check.py PATH_TO_C_SO [EXPECTED_ISA ...]
Checks a binary conv (int32 output, 3x3, padding 1 with pad value 0, 2 groups) on every tile of
every ISA, the float plane transpose and ternary x int8 sums; exits 1 naming what differs.
"""

from __future__ import annotations

import array
import importlib.machinery
import importlib.util
import platform
import random
import sys


def load(path: str):
    loader = importlib.machinery.ExtensionFileLoader("onebit._C", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("onebit._C", path, loader=loader))
    loader.exec_module(module)
    return module


def address(buffer: array.array) -> int:
    return buffer.buffer_info()[0]


def words(bits: list[int]) -> array.array:
    """Bits (1 = -1) packed 64 to a word, as unsigned 64-bit words."""
    out = array.array("Q", [0] * ((len(bits) + 63) // 64))
    for i, b in enumerate(bits):
        out[i // 64] |= b << (i % 64)
    return out


def conv_case(rng: random.Random):
    """x [1, H, W, C] and w [Co, 3, 3, Cg] as sign bits (1 = -1), 2 groups, padding 1."""
    n, c, co, h, w, g = 1, 70, 10, 5, 6, 2
    x = [[[[rng.getrandbits(1) for _ in range(c)] for _ in range(w)] for _ in range(h)] for _ in range(n)]
    wt = [[[[rng.getrandbits(1) for _ in range(c // g)] for _ in range(3)] for _ in range(3)] for _ in range(co)]
    return n, c, co, h, w, g, x, wt


def conv_expected(n, c, co, h, w, g, x, wt) -> list[int]:
    """int32 [N, H, W, Co]: sum over the taps inside the image of +1 per agreeing bit, -1 per other."""
    cg, cog, out = c // g, co // g, []
    for ni in range(n):
        for oh in range(h):
            for ow in range(w):
                for o in range(co):
                    acc, grp = 0, o // cog
                    for kh in range(3):
                        for kw in range(3):
                            ih, iw = oh + kh - 1, ow + kw - 1
                            if 0 <= ih < h and 0 <= iw < w:
                                xs = x[ni][ih][iw][grp * cg : (grp + 1) * cg]
                                acc += sum(1 if a == b else -1 for a, b in zip(xs, wt[o][kh][kw]))
                    out.append(acc)
    return out


def conv_packed(n, c, co, h, w, g, x, wt):
    """The packed, padded input [N, H + 2, W + 2, G, Wg] (zero border: +1) and weights [Co, 3, 3, Wg]."""
    cg = c // g
    wg = (cg + 63) // 64
    xp = array.array("Q")
    for ni in range(n):
        for hp in range(h + 2):
            for wp in range(w + 2):
                for grp in range(g):
                    inside = 1 <= hp <= h and 1 <= wp <= w
                    bits = x[ni][hp - 1][wp - 1][grp * cg : (grp + 1) * cg] if inside else [0] * cg
                    xp.extend(words(bits))
    wp_ = array.array("Q")
    for o in range(co):
        for kh in range(3):
            for kw in range(3):
                wp_.extend(words(wt[o][kh][kw]))
    return xp, wp_, wg


def check(C, expected_isas: list[str]) -> tuple[int, list[str]]:
    """(number of checks, what differed)."""
    problems, checks = [], len(expected_isas)
    isas = C.supported_isas()
    for isa in expected_isas:
        if isa not in isas:
            problems.append(f"ISA {isa} not reported (supported: {isas})")
    rng = random.Random(0)
    n, c, co, h, w, g, x, wt = case = conv_case(rng)
    want = conv_expected(*case)
    xp, wp, wg = conv_packed(*case)
    plan = C.conv_plan(n, h + 2, w + 2, g * wg, wg, c, co, 3, 3, 1, 1, 1, 1, 1, 1, g, 0, 0, 0, 0, 1, 0)
    rows, cols = 13, 9
    plane = array.array("I", [rng.getrandbits(32) for _ in range(rows * cols)])
    plane_want = [plane[i * cols + j] for j in range(cols) for i in range(rows)]
    features, outs = 600, 9
    q = array.array("b", [rng.randint(-128, 127) for _ in range(features)])
    codes = [[rng.randint(0, 2) for _ in range(features)] for _ in range(outs)]
    wt3 = array.array("B", [0] * (outs * ((features + 3) // 4)))
    for o in range(outs):
        for k in range(features):
            wt3[o * ((features + 3) // 4) + k // 4] |= codes[o][k] << (2 * (k % 4))
    ternary_want = [sum(q[k] * (codes[o][k] - 1) for k in range(features)) for o in range(outs)]
    for isa in isas:
        C.set_isa(isa)
        for tile in C.tiles(isa) or ["(reference)"]:
            if tile != "(reference)":
                C.set_tile(isa, tile)
            checks += 1
            out = array.array("i", [0] * len(want))
            plan.run(address(xp), address(wp), address(out), 0, 0, 0, 0, 1)
            if list(out) != want:
                problems.append(f"binary conv differs on {isa} tile {tile}")
        checks += 2
        moved = array.array("I", [0] * len(plane))
        C.relayout_raw(address(plane), 1, rows, cols, rows * cols, cols, address(moved), 1)
        if list(moved) != plane_want:
            problems.append(f"relayout differs on {isa}")
        dots = array.array("i", [0] * outs)
        C.ternary_linear_int_raw(address(q), 1, features, address(wt3), outs, address(dots), 1)
        if list(dots) != ternary_want:
            problems.append(f"ternary_linear_int differs on {isa} ({C.ternary_linear_kernel()})")
    return checks, problems


def main() -> int:
    C = load(sys.argv[1])
    expected = sys.argv[2:]
    print(
        f"{platform.machine()} CPython {platform.python_version()}: onebit._C loaded, ISA {C.isa()}, "
        f"supported {C.supported_isas()}, tiles {C.tiles(C.isa())}, ternary kernel {C.ternary_linear_kernel()}"
    )
    checks, problems = check(C, expected)
    for p in problems:
        print("FAIL", p)
    print(f"{checks - len(problems)} passed, {len(problems)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
