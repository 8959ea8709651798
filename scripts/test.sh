#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Configures, builds and runs the whole test suite with the release preset (build/release).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh
cmake --preset release
cmake --build --preset release
ctest --preset release
