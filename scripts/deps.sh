#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Installs the Debian packages that building and testing xattn needs, skipping those already
# installed. Usage: scripts/deps.sh [--with-clang] [--with-docs] [--with-tsan] [--with-valgrind]
#   --with-clang     clang, for the clang preset
#   --with-docs      doxygen (target docs), rsvg-convert (renders the examples' SVG maps in their
#                    picture tests) and matplotlib (scripts/plot_bench.py and its test)
#   --with-tsan      clang, its sanitizer runtimes and libomp (tsan preset)
#   --with-valgrind  valgrind (scripts/memcheck.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(cmake ninja-build g++ libeigen3-dev libgtest-dev libbenchmark-dev libstb-dev
          nlohmann-json3-dev libopenblas-dev openmpi-bin libopenmpi-dev)
for arg in "$@"; do
  case "$arg" in
    --with-clang) packages+=(clang) ;;
    --with-docs) packages+=(doxygen librsvg2-bin python3-matplotlib) ;;
    --with-tsan) packages+=(clang libclang-rt-dev libomp-dev) ;;
    --with-valgrind) packages+=(valgrind) ;;
    -h | --help)
      sed -n '3,9p' "${BASH_SOURCE[0]}" | sed 's/^# //'
      exit 0
      ;;
    *)
      echo "deps.sh: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "deps.sh: not a Debian-based system; install these yourself: ${packages[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed$'; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "deps.sh: all needed packages are installed"
  exit 0
fi

as_root=(env DEBIAN_FRONTEND=noninteractive)
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    as_root=(sudo "${as_root[@]}")
  else
    echo "deps.sh: missing ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
fi

echo "deps.sh: installing ${missing[*]}"
"${as_root[@]}" apt-get update
"${as_root[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
