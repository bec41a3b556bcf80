#!/usr/bin/env bash
# Build dspark into the active environment and run the test suite.
# pytest exit code 5 ("no tests collected") is a failure, like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-build-isolation --no-deps .
python -c "import dspark, json; print(json.dumps(dspark.build_info()))"
set +e
(cd tests && python -m pytest -q -p no:cacheprovider "$@")
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
