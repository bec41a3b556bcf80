#!/usr/bin/env bash
# One batched session on the GPU machine: build, CUDA checks, sanitizers, benchmarks.
# Usage: bash scripts/device_run.sh [build] [check] [tests] [sanitize] [bench] ; results in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }
for stage in "$@"; do
  case "$stage" in
    build)
      log build
      nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
      python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      (cd /tmp && python3 -c "import dspark, json; print(json.dumps(dspark.build_info()))") ;;
    check)
      log check_cuda; (cd bench && python3 check_cuda.py --cases 300) 2>&1 | tail -25 ;;
    tests)
      log pytest; (cd tests && timeout 400 python3 -m pytest -q -x -p no:cacheprovider 2>&1 | tail -25) ;;
    sanitize)
      log memcheck
      (cd bench && compute-sanitizer --tool memcheck --leak-check no python3 check_cuda.py --cases 12 --small) 2>&1 | tail -6
      log racecheck
      (cd bench && compute-sanitizer --tool racecheck python3 check_cuda.py --cases 6 --small) 2>&1 | tail -6 ;;
    bench)
      log bench; (cd bench && python3 bench_ops.py --out "$OUT/bench_ops.json") 2>&1 | tail -30 ;;
  esac
done
log done
