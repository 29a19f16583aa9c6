#!/bin/sh
# Cross-builds onebit's wheel for 64-bit ARM Linux (pip wheel + scikit-build-core, CMake toolchain
# tools/aarch64-toolchain.cmake, Debian's aarch64 cross compiler), then loads its extension in an
# arm64 CPython under qemu (Debian's python3.X-minimal:arm64, unpacked into build/arm64-python, not
# installed) on a core without dotprod and one with it, and runs tools/aarch64_wheel_check.py.
# torch's aarch64 wheel is a CUDA build: `import onebit` itself is not run under emulation.
# Usage: tools/wheel_aarch64.sh PYTHON OUTDIR   (PYTHON: the venv's, with scikit-build-core and nanobind)
set -eu
PY=$1
OUT=$2
cd "$(dirname "$0")/.."
tools/install_aarch64_tools.sh
VER=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
TAG=$(echo "$VER" | tr -d .)
mkdir -p "$OUT"
rm -f "$OUT"/onebit-*-linux_aarch64.whl
# the extension's suffix and the wheel's platform tag are the target's, not the host's
SETUPTOOLS_EXT_SUFFIX=".cpython-$TAG-aarch64-linux-gnu.so" _PYTHON_HOST_PLATFORM=linux-aarch64 \
  $PY -m pip wheel . --no-deps --no-build-isolation -q -w "$OUT" \
  --config-settings=cmake.args="-DCMAKE_TOOLCHAIN_FILE=$PWD/tools/aarch64-toolchain.cmake"
WHEEL=$(ls "$OUT"/onebit-*-cp"$TAG"-cp"$TAG"-linux_aarch64.whl)
echo "built $WHEEL"

# an arm64 CPython of the same version, from Debian's arm64 packages, unpacked
ROOT=build/arm64-python
if [ ! -x "$ROOT/usr/bin/python$VER" ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64 && apt-get update -q >/dev/null; }
  DEBS=$(mktemp -d)
  chmod 755 "$DEBS"  # apt downloads as its own user
  if ! (cd "$DEBS" && apt-get download -q "python$VER-minimal:arm64" "libpython$VER-minimal:arm64" libc6:arm64 \
          zlib1g:arm64 libexpat1:arm64 libgomp1:arm64 libstdc++6:arm64 libgcc-s1:arm64 >/dev/null); then
    echo "no arm64 python$VER in Debian's packages here: the wheel is built, its extension not loaded"
    rm -rf "$DEBS"
    exit 1
  fi
  mkdir -p "$ROOT"
  for deb in "$DEBS"/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
  rm -rf "$DEBS"
fi
EXT=$(mktemp -d)
trap 'rm -rf "$EXT"' EXIT
$PY -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$WHEEL" "$EXT"
SO=$(ls "$EXT"/onebit/_C.cpython-"$TAG"-aarch64-linux-gnu.so)
for cpu in cortex-a53:neon neoverse-n1:neon,neon_dotprod; do
  echo "# qemu-aarch64-static -cpu ${cpu%%:*}: $ROOT/usr/bin/python$VER"
  # shellcheck disable=SC2046
  qemu-aarch64-static -cpu "${cpu%%:*}" -L "$ROOT" "$ROOT/usr/bin/python$VER" -S tools/aarch64_wheel_check.py "$SO" \
    $(echo "${cpu#*:}" | tr , ' ')
done
