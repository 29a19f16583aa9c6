#!/bin/sh
# Cross-compiles onebit's C++ core for 64-bit ARM (zig's clang, from PyPI's `ziglang`) and checks that
# every onebit symbol the bindings use is defined by the portable kernels: the x86-only code
# (cpuid, AVX2 / AVX-512 / VNNI kernels) is guarded off and the scalar and reference paths stand alone.
# Usage: tools/check_aarch64_build.sh [python-with-nanobind]   (default .venv/bin/python)
set -eu
PY=${1:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$WORK/zig" && "$WORK/zig/bin/pip" install -q ziglang
ZIG="$WORK/zig/bin/python -m ziglang"
NB=$($PY -c "import nanobind, os; print(os.path.dirname(nanobind.__file__))")
PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in csrc/kernels/*_reference.cpp csrc/kernels/*_scalar.cpp csrc/kernels/dispatch.cpp csrc/kernels/conv_tiles.cpp \
         csrc/kernels/conv.cpp csrc/kernels/pack_act.cpp csrc/kernels/parallel.cpp csrc/kernels/pool_bits.cpp \
         csrc/kernels/ternary_linear.cpp csrc/kernels/bitplanes.cpp; do
  $ZIG c++ -target aarch64-linux-gnu -std=c++17 -O2 -Icsrc -c "$f" -o "$WORK/$(basename "$f").o"
done
$ZIG c++ -target aarch64-linux-gnu -std=c++17 -O0 -Icsrc -I"$NB/include" -I"$NB/ext/robin_map/include" -I"$PYINC" \
  -c csrc/bindings.cpp -o "$WORK/bindings.o"
nm -C --undefined-only "$WORK/bindings.o" | grep "onebit::" | sed 's/^ *U //' | sort -u > "$WORK/need"
for o in "$WORK"/*.cpp.o; do nm -C --defined-only "$o" | grep "onebit::" | cut -d' ' -f3-; done | sort -u > "$WORK/have"
[ -s "$WORK/need" ] || { echo "no onebit symbols found in the bindings"; exit 1; }
missing=$(comm -23 "$WORK/need" "$WORK/have")
if [ -n "$missing" ]; then echo "undefined on aarch64:"; echo "$missing"; exit 1; fi
echo "aarch64: the C++ core compiles, and every onebit symbol the bindings use is defined"
