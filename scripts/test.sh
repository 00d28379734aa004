#!/usr/bin/env bash
# The README's test command: installs what is missing, checks formatting, builds
# with warnings as errors, runs every test (unit + integration) under CTest, then
# builds again with ASan + UBSan and runs the unit and integration suites there,
# then builds every fuzz target (tests/fuzz/fuzz_*.c) and fuzzes each for
# FUZZ_SECONDS (default 20 s per target).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh
# Load tests open many sockets; take the hard limit as the soft one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

scripts/check-format.sh

jobs=$(nproc 2>/dev/null || echo 2)
cmake -S "$root" -B "$root/build" -DGATEWAY_WERROR=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$root/build" -j"$jobs"
(cd "$root/build" && ctest --output-on-failure --timeout 900)

cmake -S "$root" -B "$root/build-asan" -DGATEWAY_WERROR=ON -DGATEWAY_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
cmake --build "$root/build-asan" -j"$jobs"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export GATEWAY_SANITIZED=1
(cd "$root/build-asan" && ctest --output-on-failure --timeout 900 -L 'unit|integration')

# Fuzz every target for a bounded time (FUZZ_SECONDS each, default 20 s).
scripts/fuzz.sh "$root/build-fuzz"
