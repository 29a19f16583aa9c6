#!/bin/sh
# Builds tests/native/check_kernels with onebit's C++ kernels for the compiler's target: every
# csrc/kernels/*.cpp without an ISA suffix (drivers, references), the scalar kernels, plus on
# x86-64 the AVX2 / AVX-512 / VNNI files
# and on aarch64 the NEON and dotprod files, each with the flags CMakeLists.txt gives it, and
# -ffp-contract=off on every file (float results bit-identical to the references).
# Usage: tests/native/build.sh OUTPUT [CXX [extra flags...]]   (default CXX: c++)
set -eu
OUT=$1
shift
CXX=${1:-c++}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/../.."
TARGET=$($CXX -dumpmachine)
OBJ=$(mktemp -d)
trap 'rm -rf "$OBJ"' EXIT
FLAGS="-std=c++17 -O2 -ffp-contract=off -fno-math-errno -Icsrc -pthread $*"
LIST="$OBJ/sources"
echo tests/native/check_kernels.cpp > "$LIST"
for f in csrc/kernels/*.cpp; do
  case "$f" in
    *_scalar.cpp | *_avx2.cpp | *_avx512.cpp | *_vnni.cpp | *_neon.cpp | *_dotprod.cpp) ;;
    *) echo "$f" >> "$LIST" ;;
  esac
done
case "$TARGET" in
  x86_64*)
    for f in csrc/kernels/*_scalar.cpp; do echo "$f -mpopcnt" >> "$LIST"; done
    for f in csrc/kernels/*_avx2.cpp; do echo "$f -mavx2 -mfma -mpopcnt -mbmi2" >> "$LIST"; done
    for f in csrc/kernels/*_avx512.cpp; do
      echo "$f -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vpopcntdq -mavx2 -mpopcnt -mbmi2" >> "$LIST"
    done
    for f in csrc/kernels/*_vnni.cpp; do
      echo "$f -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx2 -mpopcnt -mbmi2" >> "$LIST"
    done
    ;;
  aarch64* | arm64*)
    for f in csrc/kernels/*_scalar.cpp csrc/kernels/*_neon.cpp; do echo "$f" >> "$LIST"; done
    for f in csrc/kernels/*_dotprod.cpp; do echo "$f -march=armv8.2-a+dotprod" >> "$LIST"; done
    ;;
  *)
    for f in csrc/kernels/*_scalar.cpp; do echo "$f" >> "$LIST"; done
    ;;
esac
# two files at a time (the machine's cores); each line: source [its own flags]
export CXX FLAGS OBJ
xargs -P 2 -L 1 sh -c 'o="$OBJ/$(echo "$0" | tr / _).o"; $CXX $FLAGS "$@" -I tests/native -c "$0" -o "$o"' < "$LIST"
$CXX $FLAGS "$OBJ"/*.o -o "$OUT"
echo "built $OUT for $TARGET"
