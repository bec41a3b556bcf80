#!/usr/bin/env bash
# Style checks (run by scripts/test.sh before the tests; configuration in pyproject.toml and
# .clang-format): ruff over every Python file, clang-format over the C++/CUDA files changed since
# LINT_BASE (default: the previous commit; nothing to compare in a clone without history).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${DSPARK_VENV:-.venv}
BIN="$VENV/bin"; [ -x "$BIN/ruff" ] || BIN="$(dirname "$(command -v ruff || echo /nonexistent/ruff)")"
rc=0
dirs=(); for d in dspark tests bench scripts examples; do [ -d "$d" ] && dirs+=("$d"); done
"$BIN/ruff" check --quiet "${dirs[@]}" || rc=1
if [ -x scripts/format_check.sh ] || [ -f scripts/format_check.sh ]; then
  base=${LINT_BASE:-HEAD~1}
  if git rev-parse -q --verify "$base^{commit}" >/dev/null 2>&1; then
    PATH="$BIN:$PATH" bash scripts/format_check.sh "$base" || rc=1
  fi
fi
[ "$rc" -eq 0 ] && echo "lint: ok"
exit "$rc"
