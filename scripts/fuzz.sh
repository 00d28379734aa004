#!/usr/bin/env bash
# Builds the Accept-Encoding fuzzer (tests/fuzz/fuzz_accept_encoding.c, libFuzzer
# with ASan + UBSan, so clang) into a build directory and runs it for a bounded
# time on a scratch copy of the seed corpus, so the repository is never written.
#
#   scripts/fuzz.sh [BUILD_DIR]      BUILD_DIR defaults to build-fuzz
#   FUZZ_SECONDS=30                  how long to fuzz
#   FUZZ_CC=clang                    the compiler (must support -fsanitize=fuzzer)
#   FUZZ_ARGS="-max_len=65536"       extra libFuzzer flags
#
# Exits non-zero when the build fails or the fuzzer finds a crash, a sanitizer
# report, a leak, a broken invariant or an input slower than 5 s; the input
# that did it is kept under BUILD_DIR/artifacts/ and the log beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

build=${1:-build-fuzz}
case $build in
  /*) ;;
  *) build="$root/$build" ;;
esac
seconds=${FUZZ_SECONDS:-30}
cc=${FUZZ_CC:-clang}
corpus="$root/tests/fuzz/corpus/accept_encoding"
bin="$build/fuzz_accept_encoding"
log="$build/fuzz_accept_encoding.log"
artifacts="$build/artifacts"

if ! command -v "$cc" >/dev/null 2>&1; then
  echo "fuzz.sh: $cc not found; libFuzzer needs clang (scripts/install-deps.sh installs it)" >&2
  exit 2
fi
if ! ls "$corpus"/* >/dev/null 2>&1; then
  echo "fuzz.sh: no seed corpus in $corpus" >&2
  exit 2
fi

mkdir -p "$build" "$artifacts"
echo "fuzz.sh: building $bin with $cc"
if ! "$cc" -std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -Wshadow -Werror -I"$root" \
    "$root/gateway/encoding.c" "$root/tests/fuzz/fuzz_accept_encoding.c" -o "$bin"; then
  echo "fuzz.sh: FAILED to build the fuzzer (is libclang-rt-*-dev installed?)" >&2
  exit 2
fi

scratch=$(mktemp -d "$build/corpus.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cp "$corpus"/* "$scratch/"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
echo "fuzz.sh: fuzzing for ${seconds}s from $(find "$scratch" -type f | wc -l) seeds (log: $log)"
set +e
# shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
"$bin" -max_total_time="$seconds" -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$artifacts/" ${FUZZ_ARGS:-} "$scratch" >"$log" 2>&1
rc=$?
set -e

if [ "$rc" -ne 0 ]; then
  echo "fuzz.sh: FAILED: the fuzzer exited with status $rc; the end of $log:" >&2
  tail -n 40 "$log" >&2
  echo "fuzz.sh: the input is under $artifacts/; replay it with: $bin <file>" >&2
  exit 1
fi
# The last status line and the final statistics.
grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true
grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
echo "fuzz.sh: ok, no crash in ${seconds}s"
