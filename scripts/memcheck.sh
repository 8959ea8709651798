#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Runs every example under valgrind's memcheck: an invalid read or write, a use of an
# uninitialised value, or a definite or indirect leak fails the run. Build the examples first.
# Usage: scripts/memcheck.sh [build directory]   (default build/release)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build="${1:-build/release}"
examples=()
for f in "$build"/examples/*; do
  if [ -f "$f" ] && [ -x "$f" ]; then
    # MPI programs run under mpiexec in CTest; the MPI library's own allocations and reads
    # would bury any finding of ours here.
    if ldd "$f" 2>/dev/null | grep -q 'libmpi'; then
      echo "memcheck.sh: skipping $f (an MPI program)"
      continue
    fi
    examples+=("$f")
  fi
done
if [ "${#examples[@]}" -eq 0 ]; then
  echo "memcheck.sh: no example programs in $build/examples; build them first" >&2
  exit 1
fi

# Examples that write pictures write them into their first argument's directory.
pictures="$(mktemp -d)"
trap 'rm -rf "$pictures"' EXIT

status=0
for exe in "${examples[@]}"; do
  echo "memcheck.sh: $exe"
  # One OpenMP thread: valgrind runs threads one at a time, so a team only waits on itself
  # (threaded code is checked by the tsan preset).
  # XATTN_EXAMPLE_REPS=0: the examples that time calls make as few as they can (a time under
  # valgrind means nothing, and valgrind runs FMA instructions in software, about 40x slower
  # than the rest of its emulation).
  if ! OMP_NUM_THREADS=1 XATTN_EXAMPLE_REPS=0 valgrind --tool=memcheck --quiet --error-exitcode=99 \
    --leak-check=full --show-leak-kinds=definite,indirect \
    --errors-for-leak-kinds=definite,indirect --track-origins=yes "$exe" "$pictures" >/dev/null; then
    echo "memcheck.sh: $exe failed (valgrind's report is above)" >&2
    status=1
  fi
done
exit "$status"
