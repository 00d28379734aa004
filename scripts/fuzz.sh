#!/usr/bin/env bash
# Builds every libFuzzer target, tests/fuzz/fuzz_<name>.c (CMake's GATEWAY_FUZZ:
# clang, ASan + UBSan, the libraries they link instrumented too), into a build
# directory, then runs each in turn for a bounded time on a scratch copy of its
# seed corpus, tests/fuzz/corpus/<name>/, so the repository is never written.
#
#   scripts/fuzz.sh [BUILD_DIR]      BUILD_DIR defaults to build-fuzz
#   FUZZ_SECONDS=20                  how long to fuzz EACH target (default 20 s:
#                                    with three targets about a minute in all,
#                                    plus the build; one target had 30 s before)
#   FUZZ_TARGETS="xff http1_response"  only these (names without fuzz_)
#   FUZZ_CC=clang                    the compiler (must support -fsanitize=fuzzer)
#   FUZZ_JOBS=N                      parallel build jobs (default: nproc)
#   FUZZ_ARGS="-max_len=65536"       extra libFuzzer flags, for every target
#
# Exits non-zero when the build fails or any fuzzer finds a crash, a sanitizer
# report, a leak, a broken invariant or an input slower than 5 s; every target
# runs even after one fails. The input that did it is kept under
# BUILD_DIR/artifacts/<name>/ and each target's log is BUILD_DIR/fuzz_<name>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

build=${1:-build-fuzz}
case $build in
  /*) ;;
  *) build="$root/$build" ;;
esac
seconds=${FUZZ_SECONDS:-20}
cc=${FUZZ_CC:-clang}
jobs=${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 2)}

if ! command -v "$cc" >/dev/null 2>&1; then
  echo "fuzz.sh: $cc not found; libFuzzer needs clang (scripts/install-deps.sh installs it)" >&2
  exit 2
fi

# The targets: every tests/fuzz/fuzz_*.c, or those FUZZ_TARGETS names.
names=()
if [ -n "${FUZZ_TARGETS:-}" ]; then
  for name in $FUZZ_TARGETS; do
    if [ ! -f "$root/tests/fuzz/fuzz_$name.c" ]; then
      echo "fuzz.sh: no target tests/fuzz/fuzz_$name.c" >&2
      exit 2
    fi
    names+=("$name")
  done
else
  for src in "$root"/tests/fuzz/fuzz_*.c; do
    name=$(basename "$src" .c)
    names+=("${name#fuzz_}")
  done
fi
if [ ${#names[@]} -eq 0 ]; then
  echo "fuzz.sh: no targets in tests/fuzz/" >&2
  exit 2
fi
for name in "${names[@]}"; do
  if ! ls "$root/tests/fuzz/corpus/$name"/* >/dev/null 2>&1; then
    echo "fuzz.sh: no seed corpus in tests/fuzz/corpus/$name/" >&2
    exit 2
  fi
done

targets=()
for name in "${names[@]}"; do targets+=("fuzz_$name"); done
echo "fuzz.sh: building ${targets[*]} in $build with $cc"
mkdir -p "$build"
if ! cmake -S "$root" -B "$build" -DCMAKE_C_COMPILER="$cc" -DGATEWAY_FUZZ=ON -DGATEWAY_WERROR=ON \
    -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-g -O1" >"$build/configure.log" 2>&1; then
  cat "$build/configure.log" >&2
  echo "fuzz.sh: FAILED to configure $build (made with another compiler? remove it)" >&2
  exit 2
fi
if ! cmake --build "$build" -j"$jobs" --target "${targets[@]}"; then
  echo "fuzz.sh: FAILED to build the fuzzers (is libclang-rt-*-dev installed?)" >&2
  exit 2
fi

scratch=$(mktemp -d "$build/corpus.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

failed=()
for name in "${names[@]}"; do
  bin="$build/fuzz_$name"
  log="$build/fuzz_$name.log"
  artifacts="$build/artifacts/$name"
  mkdir -p "$scratch/$name" "$artifacts"
  cp "$root/tests/fuzz/corpus/$name"/* "$scratch/$name/"
  echo "fuzz.sh: fuzz_$name for ${seconds}s from $(find "$scratch/$name" -type f | wc -l) seeds (log: $log)"
  set +e
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  "$bin" -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" ${FUZZ_ARGS:-} "$scratch/$name" >"$log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "fuzz.sh: FAILED: fuzz_$name exited with status $rc; the end of $log:" >&2
    tail -n 40 "$log" >&2
    echo "fuzz.sh: the input is under $artifacts/; replay it with: $bin <file>" >&2
    failed+=("fuzz_$name")
    continue
  fi
  # The last status line and the final statistics.
  grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: ok, no crash in ${#names[@]} targets, ${seconds}s each"
