#!/usr/bin/env bash
# Create .venv (Python 3.11), install torch 2.14.1 + build/test tools, build and install dspark.
# CUDA kernels are compiled when nvcc is found (a GPU is not needed to build them); here for
# sm_80 and sm_90, so the pre-Hopper paths compile too (DSPARK_CUDA_ARCHS overrides it; README,
# Install). Prints one line per step with the elapsed time, and the compile steps of the build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DSPARK_VENV:-.venv}
PY=${PYTHON:-python3.11}
export DSPARK_CUDA_ARCHS=${DSPARK_CUDA_ARCHS:-80;90}
start=$SECONDS
step() { echo "[setup $((SECONDS - start))s] $*"; }

step "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --progress-bar off)
"${PIP[@]}" --upgrade pip
step "torch 2.14.1 (from the package index pip is configured with)"
"${PIP[@]}" torch==2.14.1
TOOLS=("scikit-build-core>=0.10" "cmake>=3.26" ninja numpy safetensors tokenizers tqdm matplotlib
       pytest scipy transformers ruff "clang-format==23.1.5" hypothesis)
step "build and test tools: ${TOOLS[*]}"
"${PIP[@]}" "${TOOLS[@]}"
step "building dspark (CUDA archs $DSPARK_CUDA_ARCHS if nvcc is found; minutes on 2 cores)"
LOG=$(mktemp "${TMPDIR:-/tmp}/dspark-build.XXXXXX.log")
# pip -v streams CMake's and ninja's output; show the configure summary and each compile step
if ! "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps . 2>&1 | tee "$LOG" |
  { grep --line-buffered -E 'dspark: CUDA kernels|^ *\[[0-9]+/[0-9]+\] ' |
    sed -u -E 's/^ *(\[[0-9]+\/[0-9]+\]) .*\/(csrc|CMakeFiles)\//  \1 \2\//; s/^ *-- /  /' || true; }; then
  tail -30 "$LOG" >&2
  echo "setup: building dspark failed; the whole log is $LOG" >&2
  exit 1
fi
rm -f "$LOG"
step "done"
VENV_PY="$(cd "$VENV" && pwd)/bin/python"
(cd /tmp && "$VENV_PY" -c "import dspark, json; print('dspark', json.dumps(dspark.build_info()))")
