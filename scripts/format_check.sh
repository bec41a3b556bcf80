#!/usr/bin/env bash
# Check that the C++/CUDA files changed since BASE are formatted as .clang-format says.
#   bash scripts/format_check.sh [BASE]      BASE: a commit (default HEAD~1)
# Checks whole files: those added, copied, modified or renamed between BASE and the working tree
# (committed or not) whose names end in .h .cuh .cpp .cu .cc .hpp. Prints the diff clang-format
# would make and exits 1 when any file needs it; fix with
#   .venv/bin/clang-format -i FILE...
# clang-format comes from PyPI, pinned (versions format differently); it is installed into the
# venv (scripts/setup.sh's, or DSPARK_VENV) when missing there.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-HEAD~1}
VERSION=23.1.5
VENV=${DSPARK_VENV:-.venv}
CF="$VENV/bin/clang-format"

if ! git rev-parse --verify --quiet "$BASE^{commit}" >/dev/null; then
  echo "format_check: '$BASE' is not a commit (a shallow clone may lack it: fetch more history)" >&2
  exit 2
fi
if [ ! -x "$CF" ] || [ "$("$CF" --version | grep -o '[0-9][0-9.]*' | head -1)" != "$VERSION" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  echo "format_check: installing clang-format==$VERSION into $VENV" >&2
  "$VENV/bin/python" -m pip install -q "clang-format==$VERSION"
fi

mapfile -t files < <(git diff --name-only --diff-filter=ACMR "$BASE" |
  grep -E '\.(h|cuh|cpp|cu|cc|hpp)$' || true)
if [ "${#files[@]}" -eq 0 ]; then
  echo "format_check: no C++/CUDA files changed since $BASE"
  exit 0
fi

bad=()
for f in "${files[@]}"; do
  if ! "$CF" --style=file "$f" | diff -u --label "$f" --label "$f (clang-format)" "$f" -; then
    bad+=("$f")
  fi
done
if [ "${#bad[@]}" -gt 0 ]; then
  echo "format_check: ${#bad[@]} of ${#files[@]} file(s) changed since $BASE need clang-format:" >&2
  printf '  %s\n' "${bad[@]}" >&2
  echo "fix: $CF -i ${bad[*]}" >&2
  exit 1
fi
echo "format_check: ${#files[@]} C++/CUDA file(s) changed since $BASE are formatted"
