#!/usr/bin/env bash
# bench/check_sm80.sh: run the pre-Hopper (sm_80) code paths on a Hopper GPU. dspark is built
# with DSPARK_CUDA_ARCHS=80-virtual (compute_80 PTX only), so the driver JIT-compiles every kernel
# from sm_80 code: fused_linear then runs one K slice per block without thread-block clusters,
# and nothing launches programmatically (the paths an A100 / A10 / L4 runs). Checks that
# build_info() reports kernel_ptx_arch 80 with sm90_paths off, then runs the CUDA tests.
# Results in $OUT: sm80_build.log, sm80_info.json, sm80_tests.log, sm80_summary.txt.
#
#   bash bench/check_sm80.sh        (on the GPU machine, repo root or anywhere; ~5-9 minutes)
#
# REBUILD=1 (default; not with SM80_SITE) rebuilds the normal build (the visible GPU's arch) at
# the end, so later stages measure the sm_90 kernels again.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# NOTE(device): like scripts/device_run.sh, build with the system compiler (the image's g++
# links libstdc++ statically, which clashes with torch's).
SYSCXX=()
[ -x /usr/bin/g++ ] && SYSCXX=(-C cmake.define.CMAKE_CXX_COMPILER=/usr/bin/g++
  -C cmake.define.CMAKE_CUDA_HOST_COMPILER=/usr/bin/g++)
# SM80_SITE=DIR: install the compute_80 build into DIR (pip --target) and run the tests with it
# first on the path, leaving the normal install alone (no rebuild): other jobs keep using it
SITE=(); if [ -n "${SM80_SITE:-}" ]; then SITE=(--target "$SM80_SITE" --upgrade); REBUILD=0
  export PYTHONPATH="$SM80_SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
build() {  # build ARCHS LOG
  DSPARK_CUDA_ARCHS="$1" python3 -m pip install --no-build-isolation --no-deps -v \
    "${SYSCXX[@]}" "${SITE[@]}" . > "$2" 2>&1 || { tail -40 "$2"; return 1; }
}
summary() { echo "$*" | tee -a "$OUT/sm80_summary.txt"; }
: > "$OUT/sm80_summary.txt"

t0=$(date +%s)
build 80-virtual "$OUT/sm80_build.log" || { summary "build (compute_80 PTX only): FAILED"; exit 1; }
summary "build (compute_80 PTX only): ok in $(($(date +%s) - t0)) s"
(cd /tmp && python3 - > "$OUT/sm80_info.json") <<'PY'
import json
import dspark
info = dspark.build_info()
print(json.dumps(info, indent=1))
d = info["devices"][0]
assert info["cuda_archs"] == "80-virtual", info["cuda_archs"]
assert d["kernel_ptx_arch"] == 80 and not d["sm90_paths"], d
PY
rc=$?
summary "build_info: kernel_ptx_arch 80, sm90_paths off: $([ $rc -eq 0 ] && echo ok || echo FAILED)"

t1=$(date +%s)
# every CUDA test (the JIT compiles each kernel on first use: the first tests are slower)
(cd tests && timeout "${TEST_LIMIT:-300}" python3 -m pytest -q -p no:cacheprovider -k cuda 2>&1) \
  > "$OUT/sm80_tests.log"
rc=$?
summary "CUDA tests on the sm_80 paths (rc $rc, $(($(date +%s) - t1)) s): $(tail -1 "$OUT/sm80_tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/sm80_tests.log" | head -20 | tee -a "$OUT/sm80_summary.txt"

if [ "${REBUILD:-1}" = 1 ]; then
  build "" "$OUT/rebuild.log" && summary "rebuilt for the visible GPU: $(cd /tmp &&
    python3 -c 'import dspark; print(dspark.build_info()["cuda_archs"])')"
fi
exit $rc
