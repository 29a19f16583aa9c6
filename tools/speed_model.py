"""Static speed model of binary-conv inner loops: llvm-mca's cycles per iteration and binary MACs per cycle.

Each modelled kernel is a C++ file compiled to assembly (``-O3 -S``; AArch64 with clang-19
``--target=aarch64-linux-gnu -mcpu=CPU``, x86 with the compiler that builds onebit), its hot loop
found in the assembly as a single-block loop (a label, straight-line code, a branch back to that
label) inside the named function, and that loop body fed to ``llvm-mca-19`` for each CPU model.
llvm-mca simulates the loop in steady state on the core's scheduling model: every load hits L1,
the front end never stalls, every branch is predicted. So the numbers are an upper bound on
throughput, set by execution ports and dependency chains only.

    cycles / iteration = llvm-mca's Total Cycles / Iterations
    binary MACs / iteration = output pixels x output channels x bits of depth per iteration
    binary MACs / cycle = MACs / iteration / (cycles / iteration)

The MACs per iteration are declared by the kernel's tile shape and checked against the loop's
popcount instructions (one ``cnt v.16b`` covers 128 bit products; one AVX2 ``vpshufb`` ymm on
nibbles covers 128: two lookups, low and high nibbles, per 256 bits), so a loop picked by
mistake is an error, not a wrong number.

Larq compute engine's ``kernel_8x4x2_aarch64`` is modelled from its own header, read from a copy
outside this repository (``--lce PATH`` to ``kernel_8x4x2_aarch64.h``; get it with ``git clone``
of larq/compute-engine, file ``larq_compute_engine/core/indirect_bgemm/kernel_8x4x2_aarch64.h``):
its inline-asm block ``XOR_POPCOUNT_ACCUM_LOAD_BLOCK_64`` gets concrete registers and the depth
loop's ``subs``/``b.gt`` around it, as its ``AccumulationLoop_Depth2OrMore`` runs it.

Usage: ``python tools/speed_model.py [--lce PATH] [--neon PATH] [--tile FUNC=PxCxB ...]
[--arm-cxx CXX] [--json out.json] [--measure]`` (``--measure``: time onebit's AVX2 tiles on this
machine beside their x86 estimate, see tools/speed_model_measure.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLANG = "clang++-19"
MCA = "llvm-mca-19"
ARM_CPUS = ("neoverse-n1", "neoverse-v1", "neoverse-v2")
X86_CPUS = ("znver3", "znver4", "znver5", "skylake-avx512", "sapphirerapids")
STANDALONE_NEON = ROOT / "tools" / "speed_model_neon_tile.cpp"
KERNELS = ROOT / "csrc" / "kernels"
SHIPPED_NEON = KERNELS / "conv_neon.cpp"
SHIPPED_NEON_PAIRS = KERNELS / "conv_pairs_neon.cpp"
ITERATIONS = 500
# Bit products one popcount instruction of a loop covers, by (arch, mnemonic).
MACS_PER_POPCOUNT = {("aarch64", "cnt"): 128, ("x86_64", "vpshufb"): 128, ("x86_64", "vpopcntq"): 512}
POPCOUNT = {"aarch64": "cnt", "x86_64": "vpshufb"}
# C++ flags of onebit's build (CMakeLists.txt), and the per-ISA ones.
BUILD_FLAGS = ["-std=c++17", "-O3", "-fno-math-errno", "-ffp-contract=off", f"-I{ROOT / 'csrc'}"]
AVX2_FLAGS = ["-mavx2", "-mfma", "-mpopcnt", "-mbmi2"]


@dataclasses.dataclass(frozen=True)
class Tile:
    """One kernel's hot loop: where it is, and the work one iteration does."""

    name: str
    arch: str  # "aarch64" or "x86_64"
    function: str  # regex on the demangled function holding the loop
    pixels: int
    channels: int
    bits: int  # depth bits per iteration
    excluded: str | None = None  # regex: a loop with a matching instruction is not this tile's
    required: str | None = None  # regex: the tile's loop has a matching instruction
    bits_per_popcount: int | None = None  # useful bit products per popcount, if not all of them

    @property
    def macs(self) -> int:
        return self.pixels * self.channels * self.bits


@dataclasses.dataclass(frozen=True)
class Loop:
    """A single-block loop: its function (demangled), its label and its instructions."""

    function: str
    label: str
    instructions: tuple[str, ...]

    def count(self, mnemonic: str) -> int:
        return sum(1 for line in self.instructions if line.split()[0] == mnemonic)


@dataclasses.dataclass(frozen=True)
class McaResult:
    """llvm-mca's summary and per-iteration resource pressure (cycles on each unit)."""

    iterations: int
    instructions: int
    total_cycles: int
    uops: int
    block_rthroughput: float
    pressure: dict[str, float]

    @property
    def cycles_per_iteration(self) -> float:
        return self.total_cycles / self.iterations


# ---------------------------------------------------------------- assembly


# b.ne, and GCC's spelling bne
AARCH64_CONDITIONAL = re.compile(r"b\.?(eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al|nv)")


def _comment_marker(arch: str) -> str:
    return "//" if arch == "aarch64" else "#"


def _branch_target(arch: str, line: str) -> str | None:
    """The label a branch goes to, "" for a branch elsewhere (ret, indirect), None if no branch."""
    mnemonic, _, operands = line.partition(" ")
    mnemonic = mnemonic.strip()
    if arch == "aarch64":
        conditional = AARCH64_CONDITIONAL.fullmatch(mnemonic) or mnemonic in ("cbz", "cbnz", "tbz", "tbnz")
        if not (conditional or mnemonic in ("b", "br", "bl", "blr", "ret")):
            return None
    elif not (mnemonic.startswith("j") or mnemonic in ("ret", "call", "callq", "retq")):
        return None
    target = operands.replace("\t", " ").split(",")[-1].strip()
    return target if target.startswith(".") else ""


def _demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def find_loops(asm: str, arch: str) -> list[Loop]:
    """Every single-block loop of ``asm``: ``L:`` then instructions (other labels may fall
    through in between) and a branch back to ``L``, with no branch elsewhere before it."""
    marker = _comment_marker(arch)
    items: list[tuple[str, str, str]] = []  # (kind, text, function): kind "label" or "insn"
    function = ""
    for raw in asm.splitlines():
        line = raw.split(marker, 1)[0].strip()
        if not line:
            continue
        if line.endswith(":"):
            name = line[:-1]
            if not name.startswith("."):
                function = name
            items.append(("label", name, function))
        elif not line.startswith("."):
            items.append(("insn", " ".join(line.replace("\t", " ").split()), function))
    loops = []
    for i, (kind, label, function) in enumerate(items):
        if kind != "label" or not label.startswith("."):
            continue
        body = []
        for kind2, text, _ in items[i + 1 :]:
            if kind2 == "label":
                continue
            body.append(text)
            target = _branch_target(arch, text)
            if target is None:
                continue
            if target == label:
                loops.append(Loop(function, label, tuple(body)))
            break
    names = _demangle(sorted({loop.function for loop in loops}))
    return [dataclasses.replace(loop, function=names[loop.function]) for loop in loops]


def select_loop(loops: list[Loop], tile: Tile) -> Loop:
    """The loop of ``tile.function`` with the most popcounts, an instruction matching
    ``tile.required`` and none matching ``tile.excluded``; checks that its popcounts cover ``tile.macs``."""
    key = POPCOUNT[tile.arch]

    def has(loop: Loop, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in loop.instructions)

    mine = [
        loop
        for loop in loops
        if re.search(tile.function, loop.function)
        and loop.count(key)
        and not (tile.excluded and has(loop, tile.excluded))
        and not (tile.required and not has(loop, tile.required))
    ]
    if not mine:
        found = sorted({loop.function for loop in loops})
        without = f" without {tile.excluded!r}" if tile.excluded else ""
        with_ = f" with {tile.required!r}" if tile.required else ""
        raise ValueError(
            f"{tile.name}: no loop with {key}{with_}{without} in a function matching {tile.function!r}; "
            f"loops in: {found}"
        )
    loop = max(mine, key=lambda lp: lp.count(key))
    covered = loop.count(key) * (tile.bits_per_popcount or MACS_PER_POPCOUNT[(tile.arch, key)])
    if covered != tile.macs:
        raise ValueError(
            f"{tile.name}: the loop at {loop.label} in {loop.function} has {loop.count(key)} {key} "
            f"({covered} bit products), the tile declares {tile.pixels}x{tile.channels}x{tile.bits} = {tile.macs}"
        )
    return loop


def _is_clang(cxx: str) -> bool:
    return "clang" in pathlib.Path(cxx).name


def compile_asm(source: pathlib.Path, arch: str, cpu: str | None, cxx: str) -> str:
    """``source`` compiled to assembly with onebit's flags for ``arch`` (and ``-mcpu`` on AArch64)."""
    if arch == "aarch64":
        flags = ["--target=aarch64-linux-gnu"] if _is_clang(cxx) else []  # else a cross gcc
        flags += [f"-mcpu={cpu}"] if cpu else []
    else:
        flags = AVX2_FLAGS
    cmd = [cxx, *BUILD_FLAGS, *flags, "-S", "-o", "-", str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return done.stdout


# ---------------------------------------------------------------- llvm-mca


def run_mca(instructions: list[str] | tuple[str, ...], arch: str, cpu: str, iterations: int = ITERATIONS) -> str:
    """llvm-mca's report for the loop body ``instructions`` (a label and a branch back wrap it)."""
    text = ".Lmodel_loop:\n" + "\n".join(instructions) + "\n"
    with tempfile.NamedTemporaryFile("w", suffix=".s") as f:
        f.write(text)
        f.flush()
        cmd = [MCA, f"-mtriple={arch}", f"-mcpu={cpu}", f"-iterations={iterations}", "-bottleneck-analysis", f.name]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return done.stdout


def _summary_number(text: str, field: str) -> str:
    match = re.search(rf"^{re.escape(field)}:\s+([0-9.]+)\s*$", text, re.M)
    if match is None:
        raise ValueError(f"llvm-mca output has no {field!r} line")
    return match.group(1)


def parse_mca(text: str) -> McaResult:
    """The summary numbers and the resource pressure per iteration ({unit: cycles}; the units of
    a group, llvm-mca's ``[2.0] - N1UnitL`` and ``[2.1] - N1UnitL``, as ``N1UnitL.0``, ``N1UnitL.1``)."""
    resources = dict(re.findall(r"^\[(\d+(?:\.\d+)?)\]\s+-\s+(\S+)\s*$", text, re.M))
    pressure: dict[str, float] = {}
    block = re.search(r"^Resource pressure per iteration:\n(.*)\n(.*)\n", text, re.M)
    if block is not None:
        ids = re.findall(r"\[([0-9.]+)\]", block.group(1))
        values = block.group(2).split()
        if len(ids) != len(values):
            raise ValueError(f"resource pressure: {len(ids)} units but {len(values)} values")
        for unit, value in zip(ids, values):
            name = resources.get(unit, unit) + (unit[unit.index(".") :] if "." in unit else "")
            pressure[name] = 0.0 if value == "-" else float(value)
    return McaResult(
        iterations=int(_summary_number(text, "Iterations")),
        instructions=int(_summary_number(text, "Instructions")),
        total_cycles=int(_summary_number(text, "Total Cycles")),
        uops=int(_summary_number(text, "Total uOps")),
        block_rthroughput=float(_summary_number(text, "Block RThroughput")),
        pressure=pressure,
    )


# ---------------------------------------------------------------- larq compute engine


LCE_TILE = Tile("LCE kernel_8x4x2_aarch64", "aarch64", "XOR_POPCOUNT_ACCUM_LOAD_BLOCK_64", 4, 8, 64)
# Registers for the block's named operands (any free ones: llvm-mca only sees dependencies).
LCE_REGISTERS = {
    **{f"%[a_{i}]": f"v{16 + i}" for i in range(4)},
    **{f"%[w_{i}]": f"v{20 + i}" for i in range(4)},
    **{f"%q[w_{i}]": f"q{20 + i}" for i in range(4)},
    **{f"%[accum_{i}]": f"v{24 + i}" for i in range(4)},
    **{f"%[a_ptr_{i}]": f"x{2 + i}" for i in range(4)},
    "%[w_ptr]": "x0",
}


def lce_loop(header: pathlib.Path) -> Loop:
    """LCE's depth loop (``subs w1``; the block; ``b.gt``) from its header, with concrete registers."""
    text = header.read_text()
    match = re.search(r"#define XOR_POPCOUNT_ACCUM_LOAD_BLOCK_64(.*?)\n\s*\n", text, re.S)
    if match is None:
        raise ValueError(f"{header}: no XOR_POPCOUNT_ACCUM_LOAD_BLOCK_64 macro")
    body = []
    for line in re.findall(r'"([^"]*)\\n\\t"', match.group(1)):
        for name in sorted(LCE_REGISTERS, key=len, reverse=True):
            line = line.replace(name, LCE_REGISTERS[name])
        if "%" in line:
            raise ValueError(f"{header}: operand left unnamed in {line!r}")
        body.append(" ".join(line.split()))
    loop = Loop(LCE_TILE.function, ".Lmodel_loop", ("subs w1, w1, #1", *body, "b.gt .Lmodel_loop"))
    covered = loop.count("cnt") * MACS_PER_POPCOUNT[("aarch64", "cnt")]
    if covered != LCE_TILE.macs:
        raise ValueError(f"{header}: {loop.count('cnt')} cnt in the block, expected {LCE_TILE.macs // 128}")
    return loop


# ---------------------------------------------------------------- the model


# The tiles of conv_kernels_neon(), by source, in its order: conv_neon.cpp's make_tile<P, J>
# (P pixels x 2 J channels, one 64-bit step an iteration), then conv_pairs_neon.cpp's
# conv_kernels_neon_pairs() make_tile<P, L> (P pixels x L channels, a pair of steps, 128 bits, an
# iteration; its odd-word loop, one step with a 64-bit `ldr d` input load, is excluded). The loop is
# found in the tile's own function or wherever the compiler inlined it (compute / run_j / tile<P, J>).
SHIPPED_NEON_TILES = {
    SHIPPED_NEON: (
        Tile("onebit NEON 8x4", "aarch64", r"<8, 2>\(", 8, 4, 64),
        Tile("onebit NEON 4x8", "aarch64", r"<4, 4>\(", 4, 8, 64),
        Tile("onebit NEON 4x4", "aarch64", r"<4, 2>\(", 4, 4, 64),
        Tile("onebit NEON 2x8", "aarch64", r"<2, 4>\(", 2, 8, 64),
    ),
    SHIPPED_NEON_PAIRS: (
        Tile("onebit NEON 4x4x2", "aarch64", r"<4, 4>\(", 4, 4, 128, excluded=r"^ldr d"),
        Tile("onebit NEON 2x8x2", "aarch64", r"<2, 8>\(", 2, 8, 128, excluded=r"^ldr d"),
    ),
}
SHIPPED_TILES = tuple(tile for tiles in SHIPPED_NEON_TILES.values() for tile in tiles)
# The word-pair tiles' other loop, a tap's odd last word: one 64-bit `ldr d` a pixel (upper half zero,
# as the weights' second word), so a `cnt` covers 64 useful bit products of its 128.
ODD_WORD_TILES = (
    Tile("onebit NEON 4x4x2, odd word", "aarch64", r"<4, 4>\(", 4, 4, 64, required=r"^ldr d", bits_per_popcount=64),
    Tile("onebit NEON 2x8x2, odd word", "aarch64", r"<2, 8>\(", 2, 8, 64, required=r"^ldr d", bits_per_popcount=64),
)
STANDALONE_TILES = (
    Tile("onebit NEON 4x8 stand-alone (ld1r)", "aarch64", r"^tile_4x8_dup\b", 4, 8, 64),
    Tile("onebit NEON 2x16 stand-alone (ld1r)", "aarch64", r"^tile_2x16_dup\b", 2, 16, 64),
)
AVX2_TILES = (
    Tile("onebit AVX2 2x16", "x86_64", r"<2, 4, false>\(", 2, 16, 64),
    Tile("onebit AVX2 3x8", "x86_64", r"<3, 2, true>\(", 3, 8, 64),
    Tile("onebit AVX2 4x8", "x86_64", r"<4, 2, true>\(", 4, 8, 64),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One kernel on one CPU model."""

    kernel: str
    cpu: str
    macs: int
    mca: McaResult
    report: str = dataclasses.field(repr=False, default="")  # llvm-mca's whole output

    @property
    def macs_per_cycle(self) -> float:
        return self.macs / self.mca.cycles_per_iteration

    @property
    def busiest(self) -> tuple[str, float]:
        return max(self.mca.pressure.items(), key=lambda kv: kv[1], default=("?", 0.0))


def model_loop(name: str, loop: Loop, macs: int, arch: str, cpus: tuple[str, ...]) -> list[Row]:
    reports = [run_mca(loop.instructions, arch, cpu) for cpu in cpus]
    return [Row(name, cpu, macs, parse_mca(text), text) for cpu, text in zip(cpus, reports)]


def model_source(source: pathlib.Path, tiles: tuple[Tile, ...], cpus: tuple[str, ...], cxx: str) -> list[Row]:
    """Every tile of ``source`` on every CPU. AArch64 code is compiled for each ``-mcpu`` by clang;
    by a gcc (12 knows no neoverse-v2) once, with the build's flags (no ``-mcpu``, as ``pip install``)."""
    rows = []
    asm_by_cpu: dict[str | None, list[Loop]] = {}
    for cpu in cpus:
        key = cpu if tiles[0].arch == "aarch64" and _is_clang(cxx) else None
        if key not in asm_by_cpu:
            asm_by_cpu[key] = find_loops(compile_asm(source, tiles[0].arch, key, cxx), tiles[0].arch)
        for tile in tiles:
            loop = select_loop(asm_by_cpu[key], tile)
            rows += model_loop(tile.name, loop, tile.macs, tile.arch, (cpu,))
    return rows


def parse_tile(text: str, arch: str) -> Tile:
    """``FUNCTION_REGEX=PxCxB`` (pixels x channels x depth bits per iteration) -> a Tile."""
    function, sep, shape = text.rpartition("=")
    sizes = shape.lower().split("x")
    if not sep or len(sizes) != 3 or not all(s.isdigit() for s in sizes):
        raise ValueError(f"--tile {text!r}: expected FUNCTION_REGEX=PIXELSxCHANNELSxBITS, e.g. 'compute<4, 2, '=4x8x64")
    p, c, b = map(int, sizes)
    return Tile(f"{function} {p}x{c}x{b}", arch, function, p, c, b)


def format_table(rows: list[Row]) -> str:
    """A markdown table: one line per kernel and CPU."""
    lines = [
        "| kernel | CPU model | MACs / iteration | cycles / iteration | block RThroughput "
        "| binary MACs / cycle | busiest unit (cycles / iteration) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        unit, busy = r.busiest
        lines.append(
            f"| {r.kernel} | {r.cpu} | {r.macs} | {r.mca.cycles_per_iteration:.2f} | {r.mca.block_rthroughput:.1f} "
            f"| {r.macs_per_cycle:.1f} | {unit} ({busy:.1f}) |"
        )
    return "\n".join(lines)


def neon_sources(neon: pathlib.Path | None, tiles: list[str]) -> dict[pathlib.Path, tuple[Tile, ...]]:
    """{source: its tiles}: the shipped sources (the word-pair source with its odd-word loops too), or
    ``neon`` with the ``--tile`` loops or else the tiles of the shipped source of that file name
    (e.g. an older commit's conv_neon.cpp)."""
    shipped_sources = {
        **SHIPPED_NEON_TILES,
        SHIPPED_NEON_PAIRS: SHIPPED_NEON_TILES[SHIPPED_NEON_PAIRS] + ODD_WORD_TILES,
    }
    if neon is None:
        if tiles:
            raise ValueError("--tile needs --neon, the source that holds the loops")
        return shipped_sources
    if tiles:
        return {neon: tuple(parse_tile(t, "aarch64") for t in tiles)}
    shipped = {path.name: found for path, found in shipped_sources.items()}
    if neon.name not in shipped:
        raise ValueError(f"--neon {neon}: no shipped tiles for a file of that name ({sorted(shipped)}); give --tile")
    return {neon: shipped[neon.name]}


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        sys.exit(f"{tool} not found: apt-get install -y clang-19 llvm-19")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--neon", type=pathlib.Path, default=None, help="a NEON conv source (default: the shipped ones, every tile)"
    )
    parser.add_argument(
        "--tile",
        action="append",
        default=[],
        help="FUNCTION_REGEX=PxCxB of a loop in --neon (default: the shipped tiles of a source of that file name)",
    )
    parser.add_argument("--standalone", action="store_true", help="also model tools/speed_model_neon_tile.cpp")
    parser.add_argument("--lce", type=pathlib.Path, default=None, help="LCE's kernel_8x4x2_aarch64.h (a local copy)")
    parser.add_argument("--arm-cxx", default=CLANG, help="AArch64 compiler (clang++-19, or aarch64-linux-gnu-g++)")
    parser.add_argument("--x86-cxx", default="g++", help="compiler for the AVX2 tile (onebit's build compiler)")
    parser.add_argument("--no-x86", action="store_true", help="skip the AVX2 tile")
    parser.add_argument("--measure", action="store_true", help="time the AVX2 tiles here beside their estimate")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the rows as JSON")
    parser.add_argument("--detail", default=None, help="print llvm-mca's report of the rows whose 'kernel cpu' matches")
    args = parser.parse_args(argv)
    _require(CLANG)
    _require(MCA)

    try:
        sources = neon_sources(args.neon, args.tile)
    except ValueError as e:
        parser.error(str(e))
    rows: list[Row] = []
    for source, tiles in sources.items():
        rows += model_source(source, tiles, ARM_CPUS, args.arm_cxx)
    if args.standalone:
        rows += model_source(STANDALONE_NEON, STANDALONE_TILES, ARM_CPUS, args.arm_cxx)
    if args.lce is not None:
        rows += model_loop(LCE_TILE.name, lce_loop(args.lce), LCE_TILE.macs, "aarch64", ARM_CPUS)
    if not args.no_x86:
        rows += model_source(ROOT / "csrc" / "kernels" / "conv_avx2.cpp", AVX2_TILES, X86_CPUS, args.x86_cxx)
    print(format_table(rows))
    for r in rows:
        if args.detail is not None and re.search(args.detail, f"{r.kernel} {r.cpu}"):
            print(f"\n## {r.kernel} on {r.cpu}\n\n{r.report}")
    if args.measure:
        from speed_model_measure import compare_avx2  # tools/, beside this file

        print()
        print(compare_avx2(rows))
    if args.json is not None:
        out = [{"kernel": r.kernel, "cpu": r.cpu, "macs": r.macs, **dataclasses.asdict(r.mca)} for r in rows]
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
