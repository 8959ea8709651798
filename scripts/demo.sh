#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds and runs the first example, cross-attention worked through by hand (Release build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh
cmake --preset release
cmake --build --preset release --target 01_cross_attention_by_hand
./build/release/examples/01_cross_attention_by_hand build/release/examples  # pictures go there
