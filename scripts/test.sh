#!/usr/bin/env bash
# Run the test suite against the dspark installed in .venv (scripts/setup.sh builds it).
# pytest's exit code 5 ("no tests collected") is a failure, like any other non-zero code.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${DSPARK_VENV:-.venv}
if [ -x "$VENV/bin/python" ]; then PY="$(cd "$VENV" && pwd)/bin/python"; else PY=python3; fi
if [ "$#" -eq 0 ]; then  # the whole suite (what CI runs): style first (scripts/lint.sh)
  bash scripts/lint.sh || exit 1
fi
cd tests  # so that `import dspark` finds the installed package, not the source tree
"$PY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
