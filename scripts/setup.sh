#!/usr/bin/env bash
# Create .venv (Python 3.11), install torch 2.14.1 + build/test tools, build and install dspark.
# CUDA kernels are compiled when nvcc is found (a GPU is not needed to build them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DSPARK_VENV:-.venv}
PY=${PYTHON:-python3.11}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.14.1
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "cmake>=3.26" ninja numpy \
  safetensors tokenizers tqdm matplotlib pytest scipy transformers ruff "clang-format==23.1.5"
"$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps .
VENV_PY="$(cd "$VENV" && pwd)/bin/python"
(cd /tmp && "$VENV_PY" -c "import dspark, json; print('dspark', json.dumps(dspark.build_info()))")
