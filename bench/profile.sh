#!/usr/bin/env bash
# Profile a speculative step on the GPU: the exact command lines, in one script.
# Usage: bash bench/profile.sh TARGET_DIR DRAFTER_DIR PROMPTS.jsonl [OUT]
#   1. torch.profiler (always available): per-stage host / GPU time, top kernels, gaps between
#      kernels, host time per round -> OUT/stages/ and OUT/whole_step/ (trace.json.gz for
#      Perfetto, summary.json) via bench/profile_step.py.
#   2. Nsight Systems, where `nsys` is on the PATH (it is not on our GPU machine: see
#      bench/RESULTS.md): the same run with NVTX ranges per stage -> OUT/step.nsys-rep.
#   3. Nsight Compute on the kernels of the target forward's stage (NVTX-filtered), clocks left
#      as they run (--clock-control none), a handful of launches -> OUT/forward.ncu-rep + a
#      printed table.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:?target dir}; DRAFTER=${2:?drafter dir}; DATA=${3:?prompt set (jsonl)}
OUT=${4:-${OUT:-/tmp/out}/profile}; mkdir -p "$OUT"
PY=${PY:-python3}
RUN=(bench/profile_step.py --target "$TARGET" --drafter "$DRAFTER" --dataset "$DATA"
     --prompts "${PROMPTS:-4}" --max-new-tokens "${NEW_TOKENS:-64}")

echo "== torch.profiler, one graph per stage (names each kernel's stage)"
"$PY" "${RUN[@]}" --out "$OUT/stages"
echo "== torch.profiler, the whole step as one graph (the engine's default on GPU)"
"$PY" "${RUN[@]}" --whole-step --out "$OUT/whole_step"

if command -v nsys > /dev/null; then
  echo "== nsys"
  nsys profile --trace cuda,nvtx,osrt --cuda-graph-trace node --force-overwrite true \
    --output "$OUT/step" "$PY" "${RUN[@]}" --out "$OUT/nsys_run"
  nsys stats --report nvtx_sum,cuda_gpu_kern_sum --format csv --output "$OUT/step" \
    "$OUT/step.nsys-rep" > /dev/null
else
  echo "== nsys not on the PATH: skipped"
fi

if command -v ncu > /dev/null; then
  echo "== ncu, kernels of the target forward stage"
  ncu --clock-control none --nvtx --nvtx-include "target forward/" --launch-count "${NCU_LAUNCHES:-40}" \
    --section SpeedOfLight --section LaunchStats --section Occupancy \
    --force-overwrite --export "$OUT/forward" "$PY" "${RUN[@]}" --out "$OUT/ncu_run" > /dev/null
  ncu --import "$OUT/forward.ncu-rep" --page raw --csv \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size \
    > "$OUT/forward_kernels.csv"
  head -20 "$OUT/forward_kernels.csv"
else
  echo "== ncu not on the PATH: skipped"
fi
