#!/usr/bin/env bash
# bench/check_multirow.sh: everything the multi-row fused kernels need on a GPU machine, in one
# call: build, the CUDA tests of the changed ops and of batch invariance, compute-sanitizer
# (memcheck + racecheck on bench/sanitize_layers.py), the benchmarks (verify forward vs decode
# at the Qwen3-8B shape, decode, linear, attention) and the engine check (greedy speculative ==
# autoregressive, fp32 and bf16). Results in $OUT (6 files): summary.md, run.log (all output),
# bench_verify_forward.json, bench_decode.json, bench_linear.json, bench_attention.json.
#
#   bash bench/check_multirow.sh          (~8 minutes on an H200, build included)
#
# Each stage runs under a time limit; a stage that would start within 10 s of DEADLINE (seconds
# after the start, default 560) is skipped and the summary says so. Stages run in order of
# importance; a failing stage does not stop the others (except the build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/run.log"
: > "$LOG"
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
STAGES=()

ONLY=${ONLY:-}  # space-separated stage names to run (build always runs); empty: all
stage() {  # stage NAME LIMIT_S COMMAND: run with a time limit unless past the deadline
  local name=$1 limit=$2 cmd=$3 now t rc
  if [ -n "$ONLY" ] && [ "$name" != build ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  now=$(( $(date +%s) - T0 ))
  if (( now + 10 > DEADLINE )); then
    STAGES+=("| $name | skipped (deadline) | - |")
    echo "== $name: skipped (deadline)" | tee -a "$LOG"
    return 1
  fi
  (( limit > DEADLINE - now )) && limit=$(( DEADLINE - now ))
  echo "== $(date +%T) [+${now}s] $name (limit ${limit}s)" | tee -a "$LOG"
  t=$(date +%s)
  timeout "$limit" bash -o pipefail -c "$cmd" >> "$LOG" 2>&1
  rc=$?
  STAGES+=("| $name | $([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc") | $(( $(date +%s) - t )) s |")
  return $rc
}

# NOTE(device): the image's default g++ links libstdc++ statically, which clashes with torch's;
# build with the system compiler (as scripts/device_run.sh does).
SYSCXX=""
[ -x /usr/bin/g++ ] && SYSCXX="-C cmake.define.CMAKE_CXX_COMPILER=/usr/bin/g++ -C cmake.define.CMAKE_CUDA_HOST_COMPILER=/usr/bin/g++"
# SKIP_BUILD=1: a second invocation in the same call (the package is installed already)
PIP_BUILD="python3 -m pip install --no-build-isolation --no-deps $SYSCXX . 2>&1 | tail -30"
[ "${SKIP_BUILD:-0}" = 1 ] && PIP_BUILD="echo build skipped: SKIP_BUILD=1"
stage build 300 "nvidia-smi --query-gpu=name,driver_version --format=csv; \
  $PIP_BUILD; \
  cd /tmp && python3 -c 'import dspark, json; print(json.dumps(dspark.build_info()))'" \
  || { tail -60 "$LOG"; exit 1; }

TESTS=${TESTS:-"test_batch_invariance.py test_linear.py test_attention.py test_state_ops.py \
  test_schedule.py test_verify_contract.py test_verify.py test_sample.py test_engine_graphs.py \
  test_hybrid.py test_crossover.py"}  # the CUDA tests of the changed ops (+ TESTS_EXTRA)
stage tests 240 "cd tests && python3 -m pytest -q -p no:cacheprovider -rf -k cuda $TESTS ${TESTS_EXTRA:-} \
  2>&1 | tail -40"
stage alltests 400 "cd tests && python3 -m pytest -q -p no:cacheprovider -rf -k cuda 2>&1 | tail -30"
stage verify_forward 200 "cd bench && python3 bench_verify_forward.py ${VF_ARGS:-} --out $OUT/bench_verify_forward.json"
stage ncu_linear 150 "cd bench && ncu --clock-control none --kernel-name regex:fused_linear --section SpeedOfLight \
  --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
  --section SchedulerStats python3 profile_linear.py ${NCU_LINEAR_ARGS:---M 1,8,32} > $OUT/ncu_linear.txt 2>&1; \
  grep -E 'fused_linear|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|No Eligible' $OUT/ncu_linear.txt | head -60"
stage decode 120 "cd bench && python3 bench_decode.py --variants graph --new 128 --profile --out $OUT/bench_decode.json"
# the same decode under each of DECODE_AB_ENVS ("|"-separated, e.g. "DSPARK_ATTN_ROWS_PER_BLOCK=1|
# DSPARK_LINEAR_STAGE_BYTES=-1"): A/B runs of switches, their JSON lines in run.log
stage decode_ab 200 "cd bench && IFS='|' read -ra ENVS <<< \"${DECODE_AB_ENVS:-}\"; for e in \"\${ENVS[@]}\"; do \
  echo \"decode_ab: \$e\"; env \$e python3 bench_decode.py --variants graph --new 128 --profile --out /tmp/decode_ab.json \
  | grep -v Warn; done"
stage memcheck 120 "cd bench && compute-sanitizer --tool memcheck --leak-check no python3 sanitize_layers.py 2>&1 | tail -8"
stage racecheck 120 "cd bench && compute-sanitizer --tool racecheck python3 sanitize_layers.py 2>&1 | tail -8"
stage engine 150 "cd bench && python3 check_engine_cuda.py --no-compile"
stage round 150 "cd bench && python3 bench_round.py --dataset ../.data/humaneval.jsonl --prompts 16 \
  --new 128 --out $OUT/round_bf16.json 2>&1 | tail -4 && python3 bench_round.py --dataset \
  ../.data/humaneval.jsonl --prompts 16 --new 128 --eager-stages --out $OUT/round_bf16_eager.json 2>&1 | tail -4"
stage stateops 90 "cd bench && python3 bench_state_ops.py --out $OUT/bench_state_ops.json 2>&1 | tail -16"
stage sanitize_state 150 "cd tests && compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider \
  test_state_ops.py test_schedule.py -k cuda 2>&1 | tail -6"
stage linear 90 "cd bench && python3 bench_linear.py --M ${LINEAR_M:-1,8,32,64} --out $OUT/bench_linear.json"
stage attention 90 "cd bench && python3 bench_attention.py ${ATTN_ARGS:---slots 1024,32768 --rows 1,8,16} --out $OUT/bench_attention.json"
# the demo pair's speculative round (the DSpark and n-gram round bars of issue 11)
# (ROUND_DEMO_ARGS: bench_round's arguments, e.g. --kernels for each run's kernels per replay)
stage round_demo 200 "cd bench && python3 bench_round.py ${ROUND_DEMO_ARGS:---prompts 16 --new 128 --drafters dspark,dspark-compiled,ngram} --out $OUT/round_demo_bf16.json 2>&1 | tail -12"
# A/B: the weighted-V pass of one row of 4 query heads (the kernel before 2026-12-06 s15)
stage attention_pq4 90 "cd bench && DSPARK_ATTN_PASS_Q=4 python3 bench_attention.py ${ATTN_ARGS:---slots 1024,32768 --rows 1,8,16} --out $OUT/bench_attention_pq4.json | tail -12"
stage verify_forward_pq4 150 "cd bench && DSPARK_ATTN_PASS_Q=4 python3 bench_verify_forward.py --batches 1 --rows 8 --variants fused --out $OUT/bench_verify_forward_pq4.json | tail -4"
# the attention kernel where the 8B verify forward runs it (block at slot 112 of 1024): 1 and 8 rows
stage ncu_attention 120 "cd bench && ncu --clock-control none --kernel-name regex:decode_attention \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
  --section SchedulerStats python3 bench_attention.py --slots 1024 --position 112 --rows 1,8 --ncu \
  > $OUT/ncu_attention.txt 2>&1; grep -E 'decode_attention|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|No Eligible|Block Limit Reg|Grid Size' $OUT/ncu_attention.txt | head -60"

# decode_attention phase by phase (bench/probe_attention.cu: the product's kernel with its phase
# marks on; PROBE_ARGS: "|"-separated argument sets), L2 hot and cold, and the wall time a call
stage probe_attention 150 "nvcc -std=c++20 -arch=sm_90 -O3 --fmad=false --expt-relaxed-constexpr -I include \
  bench/probe_attention.cu -o /tmp/probe_attention && IFS='|' read -ra SETS <<< \"${PROBE_ARGS:---pos 112|--pos 112 --rows 8|--H 4 --Hkv 2 --D 48 --S 2048 --pos 150|--S 32768 --pos 32000}\"; \
  for a in \"\${SETS[@]}\"; do echo \"=== \$a\"; /tmp/probe_attention \$a --reps 20; done > $OUT/probe_attention.txt 2>&1; \
  grep -E '^===|wall per call' $OUT/probe_attention.txt"

# the fused verify kernel phase by phase (bench/probe_verify.cu: request 0's blocks and finisher
# with the phase marks on; PROBE_VERIFY_ARGS: "|"-separated argument sets), L2 hot and cold.
# PROBE_VERIFY_BASE=DIR (a folder holding another include/, e.g. main's, made before the call
# with `git archive main include | tar -x -C DIR`): the probe is also built against it and the
# two alternate, set by set (an A/B in one call).
stage probe_verify 200 "F='-std=c++20 -arch=sm_90 -O3 --fmad=false --expt-relaxed-constexpr'; \
  nvcc \$F -I include bench/probe_verify.cu -o /tmp/probe_verify_new && VARIANTS=new && \
  if [ -n '${PROBE_VERIFY_BASE:-}' ]; then nvcc \$F -I '${PROBE_VERIFY_BASE:-}/include' bench/probe_verify.cu \
  -o /tmp/probe_verify_base && VARIANTS='base new'; fi; \
  IFS='|' read -ra SETS <<< \"${PROBE_VERIFY_ARGS:---R 1 --gamma 7|--R 1 --gamma 7 --accept 0|--R 8 --gamma 7|--R 64 --gamma 7|--R 1 --gamma 7 --temp 1 --scale 20|--R 1 --gamma 7 --temp 1 --scale 20 --q 1 --accept 0}\"; \
  for a in \"\${SETS[@]}\"; do for v in \$VARIANTS; do echo \"=== \$v \$a\"; /tmp/probe_verify_\$v \$a --reps 20; done; done \
  > $OUT/probe_verify.txt 2>&1; grep -E '^===|wall per call|status word' $OUT/probe_verify.txt"

# Where a latency-bound kernel's warps stall, by SASS instruction (bench/ncu_hotspots.py; the
# H200's ncu gave the CUDA-source view no sample columns, 2026-12-07), and the
# kernel's duration, occupancy and stall reasons from the same report: by default the 1-row
# decode_attention at slot 112 of 1024 (decode's attention: 8 working blocks there).
# NCU_SOURCE_KERNEL / NCU_SOURCE_CMD pick another kernel and program (run from bench/);
# NCU_SOURCE_LABEL names the outputs ($OUT/ncu_source_LABEL.txt) so two kernels fit in one call.
NSL=${NCU_SOURCE_LABEL:-attention}
stage ncu_source 150 "cd bench && ncu --clock-control none --kernel-name regex:${NCU_SOURCE_KERNEL:-decode_attention_kernel} \
  --launch-count 1 --set full --import-source yes -f -o /tmp/ncu_source_$NSL \
  python3 ${NCU_SOURCE_CMD:-bench_attention.py --slots 1024 --position 112 --rows 1 --ncu} > /tmp/ncu_source_$NSL.log 2>&1; \
  tail -3 /tmp/ncu_source_$NSL.log; ncu -i /tmp/ncu_source_$NSL.ncu-rep --page details > /tmp/ncu_details_$NSL.txt 2>&1; \
  grep -E 'Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|No Eligible|Grid Size|DRAM Through|Memory Through|L2 Hit|Stall|stall' \
  /tmp/ncu_details_$NSL.txt | head -40 | tee $OUT/ncu_source_$NSL.txt; \
  ncu -i /tmp/ncu_source_$NSL.ncu-rep --page source --csv --print-source sass > /tmp/ncu_sass_$NSL.csv 2>&1; \
  python3 ncu_hotspots.py /tmp/ncu_sass_$NSL.csv --top 40 | tee -a $OUT/ncu_source_$NSL.txt"
# markov_draft against the loop it would replace: the pair's shape, then the 8B vocabulary
# (MARKOV_PAIR_ARGS / MARKOV_8B_ARGS: the rows and variants; "none" skips one)
MARKOV_PAIR_ARGS=${MARKOV_PAIR_ARGS:---R 1,16 --variants op,loop}
MARKOV_8B_ARGS=${MARKOV_8B_ARGS:---R 1,64 --variants op,loop}
stage markov_bench 150 "cd bench && { [ '$MARKOV_PAIR_ARGS' = none ] || python3 bench_markov_draft.py \
  --V 8256 --hidden 256 --base-logits bfloat16 $MARKOV_PAIR_ARGS --out $OUT/markov_pair.json | tail -8; } && \
  { [ '$MARKOV_8B_ARGS' = none ] || python3 bench_markov_draft.py --base-logits bfloat16 $MARKOV_8B_ARGS \
  --out $OUT/markov_8b.json | tail -6; }"
# markov_draft's kernels under memcheck / racecheck (bf16 weights, every rows-per-block width)
stage sanitize_markov 150 "cd tests && compute-sanitizer --tool memcheck --leak-check no python3 -m pytest -q \
  -p no:cacheprovider test_markov_draft.py -k 'test_matches_reference and cuda and plain and bf16' 2>&1 | tail -4; \
  compute-sanitizer --tool racecheck python3 -m pytest -q -p no:cacheprovider test_markov_draft.py \
  -k 'test_matches_reference and cuda and plain and bf16' 2>&1 | tail -4"
# markov_draft's two kernels a step at the benchmark pair's shape (V 8256, rank 256, d 256, R 1):
# where a step's time goes (s14: 589 µs for 7 steps, the loop 281; s16: 170, the loop 284)
stage ncu_markov 120 "cd bench && ncu --clock-control none --kernel-name regex:Markov --launch-count 4 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
  python3 bench_markov_draft.py --R 1 --V 8256 --hidden 256 --variants op --base-logits bfloat16 \
  --reps 2 > $OUT/ncu_markov.txt 2>&1; grep -E 'Markov|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|No Eligible|Grid Size|DRAM Through' $OUT/ncu_markov.txt | head -50"

# the fused verify kernel at R = 1, gamma 7, bf16 (greedy first, then sampled): 17.3 µs a call in
# a graph against a 10 µs target (s11); where the time goes
stage ncu_verify 120 "cd bench && ncu --clock-control none --graph-profiling node --kernel-name regex:FusedVerify \
  --launch-count 4 --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
  --section SchedulerStats python3 bench_ops.py --R 1 --gamma 7 --dtypes bf16 --impls fused --reps 3 \
  > $OUT/ncu_verify.txt 2>&1; grep -E 'FusedVerify|Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|No Eligible|Grid Size|DRAM Through' $OUT/ncu_verify.txt | head -40"

# ---- summary ----------------------------------------------------------------------------------
{
  echo "# check_multirow ($(date -u +%F' '%T) UTC, $(( $(date +%s) - T0 )) s)"
  echo
  echo "| stage | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${STAGES[@]}"
  echo
  echo "tests: $(grep -E '^[0-9]+ (passed|failed|skipped|error)|^(FAILED|ERROR) ' "$LOG" | tail -12 | tr '\n' ';')"
  echo "memcheck / racecheck: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|hazard' "$LOG" | tr '\n' ';')"
  echo "engine: $(grep -E 'check_engine_cuda:|identical=False|sync inside' "$LOG" | tr '\n' ';')"
  python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
v = load("bench_verify_forward.json")
if v:
    print(f"\n## verify forward vs decode ({v['device']}, copy {v['copy_GBps']} GB/s, weight-read floor "
          f"{v['floor_ms']} ms, position {v['position']})\n")
    names = [n for n in ("fused", "cublas", "hybrid") if any(r["variant"] == n for r in v["rows"])]
    print("| B | W | rows | " + " | ".join(f"{n} ms | x fused decode" for n in names) + " | fastest |")
    print("|---|---|---|" + "---|---|" * len(names) + "---|")
    by = {(r["B"], r["W"], r["variant"]): r for r in v["rows"]}
    for B, W in sorted({(r["B"], r["W"]) for r in v["rows"]}):
        got = {n: by[(B, W, n)] for n in names if (B, W, n) in by}
        cells = [f"{got[n]['ms']} | {got[n]['ratio_to_fused_decode']}" if n in got else "- | -"
                 for n in names]
        print(f"| {B} | {W} | {B * W} | " + " | ".join(cells) + f" | {min(got, key=lambda n: got[n]['ms'])} |")
    for r in v["rows"]:
        if "profile" in r:
            p = r["profile"]
            print(f"\nprofile {r['variant']} B={r['B']} W={r['W']}: {p['kernels']} kernels, "
                  f"{p['kernel_us']} us summed, span {p['span_us']} us; top: "
                  + "; ".join(f"{n} {us}" for n, us in p["top"][:8]))
d = load("bench_decode.json")
if d:
    for r in d:
        print(f"\ndecode (bench_decode, {r['variant']}): runner {r['runner_decode_ms']} ms "
              f"({r['runner_ratio_to_floor']}x floor {r['floor_ms']} ms), engine {r['decode_ms_per_token']} ms/token")
l = load("bench_linear.json")
if l:
    print("\n## fused_linear vs cuBLAS (µs; % of the weight-read floor)\n")
    print("| proj | M | floor | ours | % | cuBLAS | % | unfused |")
    print("|---|---|---|---|---|---|---|---|")
    for r in l["rows"]:
        print(f"| {r['name']} | {r['M']} | {r['floor_us']} | {r['ours_us']} | {r['ours_pct_of_floor']} | "
              f"{r['cublas_us']} | {r['cublas_pct_of_floor']} | {r['unfused_us']} |")
for name in ("round_bf16.json", "round_bf16_eager.json", "round_demo_bf16.json"):
    r = load(name)
    if r:
        print(f"\n## {name}: decode step {r['decode_step_ms']} ms ({r['device']}, stage graphs "
              f"{r.get('stage_graphs')})")
        for k, d in r["drafters"].items():
            print(f"{k}: tau {d['tau']} round {d['round_ms']} ms = {d['round_over_decode']}x decode, "
                  f"speedup {d['speedup']}x, identical {d['greedy_identical']}, {d['stages_ms']}")
a = load("bench_attention.json")
if a:
    print("\n## decode_attention (µs, batch 1, Qwen3-8B heads)\n")
    print("| slots | rows | ours | unfused | floor | max diff |")
    print("|---|---|---|---|---|---|")
    for r in a["rows"]:
        print(f"| {r['slots']} | {r['rows']} | {r['ours_us']} | {r['unfused_us']} | {r['floor_us']} | "
              f"{r['max_abs_diff']:.3g} |")
EOF
} > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
