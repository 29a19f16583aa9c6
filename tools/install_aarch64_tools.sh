#!/bin/sh
# Installs what onebit's ARM checks and cross-built wheel need, from Debian: the aarch64 cross
# compiler and C library, and qemu's user-mode emulator (static build: runs a static aarch64
# program on any Linux host). Only what is missing; needs root (as the dev machines and CI run).
set -eu
need=""
command -v aarch64-linux-gnu-g++ >/dev/null || need="$need g++-aarch64-linux-gnu libc6-dev-arm64-cross"
command -v qemu-aarch64-static >/dev/null || need="$need qemu-user-static"
[ -z "$need" ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_aarch64_tools: missing$need, and no apt-get to install them" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "# installing$need"
$SUDO apt-get update -q >/dev/null
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $need >/dev/null
