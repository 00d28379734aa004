#!/usr/bin/env bash
# Fails when any C source or header differs from what clang-format (with the
# checked-in .clang-format) would write.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.c' '*.h' 2>/dev/null || find . -name '*.[ch]' -not -path './build*')
if [ ${#files[@]} -eq 0 ]; then exit 0; fi
clang-format --style=file --dry-run --Werror "${files[@]}"
echo "check-format: ${#files[@]} files clean"
