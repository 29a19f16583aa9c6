"""tools/speed_model.py: llvm-mca's report parsed, hot loops found in assembly, and the model run
end to end on a tiny NEON loop where clang-19 and llvm-mca-19 are installed."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shutil
import sys

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


sm = _load("speed_model")

# llvm-mca-19 -mtriple=aarch64 -mcpu=neoverse-n1 -iterations=100 on
#   ldr q1, [x0], #16 / eor / cnt / add v3 += / subs / b.ne
# (summary and resource sections; the rest cut). 212 cycles / 100 iterations: the add into v3
# carries a 2-cycle dependency from one iteration to the next; eor, cnt and add are 3 ASIMD uops
# spread over the two V pipes (1.5 each).
MCA_SNIPPET = """\
Iterations:        100
Instructions:      600
Total Cycles:      212
Total uOps:        700

Dispatch Width:    8
uOps Per Cycle:    3.30
IPC:               2.83
Block RThroughput: 1.5


Instruction Info:
Resources:
[0]   - N1UnitB
[1.0] - N1UnitD
[1.1] - N1UnitD
[2.0] - N1UnitL
[2.1] - N1UnitL
[3]   - N1UnitM
[4.0] - N1UnitS
[4.1] - N1UnitS
[5]   - N1UnitV0
[6]   - N1UnitV1


Resource pressure per iteration:
[0]    [1.0]  [1.1]  [2.0]  [2.1]  [3]    [4.0]  [4.1]  [5]    [6]
1.00    -      -     0.50   0.50   0.50   0.75   0.75   1.50   1.50

Resource pressure by instruction:
"""


def test_parse_mca_reads_summary_and_pressure_of_a_hand_checked_report():
    r = sm.parse_mca(MCA_SNIPPET)
    assert (r.iterations, r.instructions, r.total_cycles, r.uops) == (100, 600, 212, 700)
    assert r.block_rthroughput == 1.5
    assert r.cycles_per_iteration == pytest.approx(2.12)
    assert r.pressure["N1UnitV0"] == 1.5 and r.pressure["N1UnitV1"] == 1.5
    assert r.pressure["N1UnitL.0"] == 0.5 and r.pressure["N1UnitL.1"] == 0.5
    assert r.pressure["N1UnitD.0"] == 0.0  # "-"
    assert len(r.pressure) == 10
    row = sm.Row("k", "neoverse-n1", 128, r)
    assert row.macs_per_cycle == pytest.approx(128 / 2.12)
    assert row.busiest == ("N1UnitV0", 1.5)


def test_parse_mca_names_a_missing_field():
    with pytest.raises(ValueError, match="Total Cycles"):
        sm.parse_mca(MCA_SNIPPET.replace("Total Cycles:      212\n", ""))


CLANG_ASM = """\
f:                                      // @f
// %bb.0:
\tmov\tx2, #0
.LBB0_1:                                // =>This Inner Loop Header: Depth=1
\tldr\tq1, [x0], #16
\teor\tv2.16b, v1.16b, v0.16b
.LBB0_2:                                // falls through: still one block
\tcnt\tv2.16b, v2.16b
\tadd\tv3.16b, v3.16b, v2.16b
\tsubs\tx1, x1, #1
\tb.ne\t.LBB0_1
// %bb.3:
.LBB0_4:
\tcbz\tx1, .LBB0_9                       // leaves before any branch back: no loop
\tb\t.LBB0_4
\tret
g:
.L7:
\tcnt\tv4.16b, v4.16b
\tcnt\tv5.16b, v5.16b
\tbne\t.L7
"""


def test_find_loops_takes_single_block_loops_in_both_compilers_spellings():
    loops = sm.find_loops(CLANG_ASM, "aarch64")
    assert [(lp.function, lp.label) for lp in loops] == [("f", ".LBB0_1"), ("g", ".L7")]
    first = loops[0]
    assert first.instructions == (
        "ldr q1, [x0], #16",
        "eor v2.16b, v1.16b, v0.16b",
        "cnt v2.16b, v2.16b",
        "add v3.16b, v3.16b, v2.16b",
        "subs x1, x1, #1",
        "b.ne .LBB0_1",
    )
    assert first.count("cnt") == 1 and loops[1].count("cnt") == 2


def test_find_loops_x86_comments_and_jumps():
    asm = "h:\n.L3:\n\tvpshufb %ymm1, %ymm2, %ymm3 # lookup\n\tvpaddb %ymm3, %ymm4, %ymm4\n\tjne .L3\n"
    (loop,) = sm.find_loops(asm, "x86_64")
    assert loop.instructions == ("vpshufb %ymm1, %ymm2, %ymm3", "vpaddb %ymm3, %ymm4, %ymm4", "jne .L3")


def test_select_loop_takes_the_most_popcounts_and_checks_the_declared_work():
    loops = sm.find_loops(CLANG_ASM, "aarch64")
    assert sm.select_loop(loops, sm.Tile("g", "aarch64", "^g$", 1, 4, 64)).label == ".L7"  # 2 cnt = 256
    with pytest.raises(ValueError, match="2 cnt"):
        sm.select_loop(loops, sm.Tile("g", "aarch64", "^g$", 2, 4, 64))
    with pytest.raises(ValueError, match="no loop"):
        sm.select_loop(loops, sm.Tile("h", "aarch64", "^h$", 1, 2, 64))


def test_parse_tile():
    t = sm.parse_tile("compute<4, 4>=4x8x64", "aarch64")
    assert (t.function, t.macs) == ("compute<4, 4>", 2048)
    with pytest.raises(ValueError, match="PIXELSxCHANNELSxBITS"):
        sm.parse_tile("compute<4, 4>", "aarch64")


def test_lce_loop_names_registers_and_wraps_the_depth_loop(tmp_path):
    # A header of LCE's form (its macro name, inline-asm strings), with made-up content.
    lines = ['  "eor v0.16b, %[a_0].16b, %[w_0].16b\\n\\t" \\', '  "ldr %q[w_1], [%[w_ptr], #16]\\n\\t" \\']
    lines += ['  "cnt v0.16b, v0.16b\\n\\t" \\'] * 15 + ['  "cnt v1.16b, v1.16b\\n\\t"']
    header = tmp_path / "kernel.h"
    header.write_text("#define XOR_POPCOUNT_ACCUM_LOAD_BLOCK_64 \\\n" + "\n".join(lines) + "\n\nrest\n")
    loop = sm.lce_loop(header)
    assert loop.instructions[:3] == ("subs w1, w1, #1", "eor v0.16b, v16.16b, v20.16b", "ldr q21, [x0, #16]")
    assert loop.instructions[-1] == "b.gt .Lmodel_loop" and loop.count("cnt") == 16
    header.write_text(header.read_text().replace("%[a_0]", "%[zz]"))
    with pytest.raises(ValueError, match="unnamed"):
        sm.lce_loop(header)


def test_measured_iterations_count_the_tiles_loop():
    measure = _load("speed_model_measure")
    # 144 pixels / 4 x 256 channels / 8 x 9 taps x 512 / 64 words
    assert measure.iterations("4x8", 512) == 36 * 32 * 9 * 8
    assert measure.iterations("3x8", 1024) == 48 * 32 * 9 * 16


TINY = """\
#include <arm_neon.h>
extern "C" uint8x16_t tiny(const uint8x16_t* x, uint8x16_t w, long n) {
  uint8x16_t acc = vdupq_n_u8(0);
#pragma clang loop unroll(disable) vectorize(disable)
  for (long i = 0; i < n; ++i) acc = vaddq_u8(acc, vcntq_u8(veorq_u8(x[i], w)));
  return acc;
}
"""


@pytest.mark.skipif(
    shutil.which(sm.CLANG) is None or shutil.which(sm.MCA) is None,
    reason=f"{sm.CLANG} / {sm.MCA} not installed (apt-get install -y clang-19 llvm-19)",
)
def test_model_of_a_tiny_neon_loop(tmp_path, capsys):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    tile = sm.Tile("tiny", "aarch64", "^tiny$", 1, 2, 64)  # one cnt: 2 channels x 64 bits
    (row,) = sm.model_source(source, (tile,), ("neoverse-n1",), sm.CLANG)
    # eor, cnt, add: 3 ASIMD uops on N1's two V pipes; the add into acc is a 2-cycle chain
    assert row.mca.pressure["N1UnitV0"] + row.mca.pressure["N1UnitV1"] == pytest.approx(3.0)
    assert 2.0 <= row.mca.cycles_per_iteration < 3.0
    assert row.macs_per_cycle == pytest.approx(128 / row.mca.cycles_per_iteration)
    sm.main(["--neon", str(source), "--tile", "^tiny$=1x2x64", "--no-x86"])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 3  # header, rule, one row per CPU model
    assert table[2].startswith("| ^tiny$ 1x2x64 | neoverse-n1 | 128 |")


def _cxx_tiles(source: pathlib.Path, function: str) -> tuple[str, list[tuple[str, int, int]]]:
    """The body of ``function`` in ``source`` and its make_tile<A, B>("name") entries, in order."""
    text = source.read_text()
    start = text.index(f"& {function}() {{")
    body = text[start : text.index("\n}\n", start)]
    tiles = re.findall(r'make_tile<(\d+),\s*(\d+)>\("([^"]+)"\)', body)
    return body, [(name, int(a), int(b)) for a, b, name in tiles]


def test_shipped_tiles_are_the_tile_lists_of_conv_kernels_neon():
    body, plain = _cxx_tiles(sm.SHIPPED_NEON, "conv_kernels_neon")
    _, pairs = _cxx_tiles(sm.SHIPPED_NEON_PAIRS, "conv_kernels_neon_pairs")
    assert "conv_kernels_neon_pairs()" in body  # the pair tiles are part of conv_kernels_neon()
    assert plain and pairs
    # make_tile<P, J>: P pixels x J registers of 2 channels, one 64-bit word a step
    expected_plain = tuple(sm.Tile(f"onebit NEON {n}", "aarch64", rf"<{p}, {j}>\(", p, 2 * j, 64) for n, p, j in plain)
    # make_tile<P, L>: P pixels x L channels, two words (128 bits) a step; not the odd-word loop
    expected_pairs = tuple(
        sm.Tile(f"onebit NEON {n}", "aarch64", rf"<{p}, {c}>\(", p, c, 128, excluded=r"^ldr d") for n, p, c in pairs
    )
    assert [n for n, p, j in plain] == [f"{p}x{2 * j}" for n, p, j in plain]
    assert [n for n, p, c in pairs] == [f"{p}x{c}x2" for n, p, c in pairs]
    assert sm.SHIPPED_NEON_TILES == {sm.SHIPPED_NEON: expected_plain, sm.SHIPPED_NEON_PAIRS: expected_pairs}
    assert sm.SHIPPED_TILES == expected_plain + expected_pairs


PAIR_ASM = """\
compute:
.LBB3_1:
\tldr\tq2, [x8, x1]
\teor\tv3.16b, v2.16b, v1.16b
\tcnt\tv3.16b, v3.16b
\tadd\tv13.16b, v3.16b, v13.16b
\tb.ne\t.LBB3_1
.LBB3_2:
\tldr\td2, [x8, x1, lsl #3]
\teor\tv3.16b, v1.16b, v2.16b
\tcnt\tv3.16b, v3.16b
\tadd\tv14.16b, v3.16b, v14.16b
\tb.ne\t.LBB3_2
"""


def test_select_loop_skips_loops_with_an_excluded_instruction():
    loops = sm.find_loops(PAIR_ASM, "aarch64")
    assert len(loops) == 2 and loops[0].count("cnt") == loops[1].count("cnt") == 1
    assert sm.select_loop(loops, sm.Tile("p", "aarch64", "^compute$", 1, 1, 128, excluded=r"^ldr d")).label == ".LBB3_1"
    assert sm.select_loop(loops, sm.Tile("s", "aarch64", "^compute$", 1, 1, 128, excluded=r"^ldr q")).label == ".LBB3_2"
    with pytest.raises(ValueError, match="without '\\^ldr'"):
        sm.select_loop(loops, sm.Tile("n", "aarch64", "^compute$", 1, 1, 128, excluded=r"^ldr"))
    # the odd-word loop: its one cnt covers 64 useful bit products
    odd = sm.Tile("o", "aarch64", "^compute$", 1, 1, 64, required=r"^ldr d", bits_per_popcount=64)
    assert sm.select_loop(loops, odd).label == ".LBB3_2"
    with pytest.raises(ValueError, match="1 cnt"):
        sm.select_loop(loops, sm.Tile("o", "aarch64", "^compute$", 1, 1, 64, required=r"^ldr d"))


def test_neon_sources_default_to_every_shipped_tile_and_match_a_source_by_file_name(tmp_path):
    pairs = sm.SHIPPED_NEON_TILES[sm.SHIPPED_NEON_PAIRS] + sm.ODD_WORD_TILES
    assert sm.neon_sources(None, []) == {**sm.SHIPPED_NEON_TILES, sm.SHIPPED_NEON_PAIRS: pairs}
    old = tmp_path / "conv_pairs_neon.cpp"
    assert sm.neon_sources(old, []) == {old: pairs}
    (tile,) = sm.neon_sources(old, ["^f$=1x2x64"])[old]
    assert (tile.function, tile.macs) == ("^f$", 128)
    with pytest.raises(ValueError, match="give --tile"):
        sm.neon_sources(tmp_path / "other.cpp", [])
    with pytest.raises(ValueError, match="--tile needs --neon"):
        sm.neon_sources(None, ["^f$=1x2x64"])


@pytest.mark.skipif(
    shutil.which(sm.CLANG) is None or shutil.which(sm.MCA) is None,
    reason=f"{sm.CLANG} / {sm.MCA} not installed (apt-get install -y clang-19 llvm-19)",
)
def test_model_of_the_shipped_pair_tiles_on_neoverse_n1():
    tiles = sm.SHIPPED_NEON_TILES[sm.SHIPPED_NEON_PAIRS] + sm.ODD_WORD_TILES
    rows = sm.model_source(sm.SHIPPED_NEON_PAIRS, tiles, ("neoverse-n1",), sm.CLANG)
    assert [r.kernel for r in rows] == [t.name for t in tiles]
    for r in rows:
        # an iteration: 16 eor + 16 cnt + 16 add on N1's two ASIMD pipes (the input's ldr q or
        # ldr d and the weights' ldp q use the load pipes only), so at least 24 cycles
        assert r.mca.pressure["N1UnitV0"] + r.mca.pressure["N1UnitV1"] == pytest.approx(48.0)
        assert 24.0 <= r.mca.cycles_per_iteration < 30.0
    assert [r.macs for r in rows] == [2048, 2048, 1024, 1024]  # odd word: half the products are on zeros
