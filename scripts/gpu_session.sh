#!/usr/bin/env bash
# One whole GPU session for a 30-minute device budget, run as a background job that outlives
# the device tool's 10-minute calls (the machine must stay warm: one call after another).
#
#   bash scripts/gpu_session.sh start     build, then launch the job (setsid) and return
#   bash scripts/gpu_session.sh collect S wait up to S seconds (or until the job ends), then pack
#                                         what is done into $OUT/results.tgz + $OUT/progress.txt
# Every device call of the session must carry .data (the eval sets, a packed pair): a call that
# does not carry it removes it on the machine, under the running job (2026-12-06 s10: every
# stage after it that read an eval set failed).
#
# The job: the benchmark pair trains (scripts/bench_pair.sh target data drafters) while the
# correctness work shares the GPU (every CUDA test, the fuzz tests under memcheck; SM80=1: first
# the sm_80 code paths from a second install, compute_80 PTX through the JIT); or, when .data
# holds a pair packed by an earlier session (pair.tgz.part-*), the pair is unpacked and nothing
# trains. Then, the GPU to itself, the timed runs in order of importance: the pair packed for
# later sessions, the scheduler microbenchmark, the concurrency sweep (every mode, with and
# without ar_fallback), dspark bench on the pair (compiled drafters), greedy identity at 256
# tokens, profile, the chat sweep, the demo pair's round cost, the 8B-shape verify forward,
# decode_attention's work split, the eager A/B, the remaining sweeps, the 8B projection, ncu
# (the ablation's eval with PAIR_ABLATE=1; OPS_BENCH=1: the op benchmarks).
# NO_TRAIN=1 (a budget too short to train): the shipped demo pair, the correctness work, the
# scheduler and op benchmarks, a sweep, then the timed runs that do not need the pair.
# SKIP trims what a budget cannot hold (the stages run in this order). Each stage's
# output: $RES/<stage>.txt (+ JSON / PNG); the job's timeline: $RES/progress.txt.
# Env: TARGET_MINUTES (default 5), DRAFT_MINUTES (6: tau was bound by training steps on 2026-12-06,
# bench/RESULTS.md ninth session; bench_pair.sh), PAIR_ABLATE (0; 1: the recipe
# ablation's variants train beside the drafters and are evaluated), RES (default /tmp/res),
# SKIP="stage ..." (stages not to run, e.g. those a session already measured).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RES=${RES:-/tmp/res}
PAIR=/tmp/pair
export PYTHONUNBUFFERED=1
mkdir -p "$RES"
log() { echo "$(date +%T) [+$((SECONDS))s] $*" >> "$RES/progress.txt"; }

stage() {  # stage NAME LIMIT_S CMD...: run under a time limit, output in $RES/NAME.txt
  local name=$1 limit=$2 t0=$SECONDS rc; shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then log "skip $name (SKIP)"; return 0; fi
  log "start $name"
  timeout "$limit" "$@" > "$RES/$name.txt" 2>&1; rc=$?
  log "end $name rc=$rc $((SECONDS - t0))s"
  return $rc
}

correctness() {  # shares the GPU with the training
  # the pre-Hopper paths (SM80=1; they passed alone on 2026-12-06 s10, 1272 tests in 85 s):
  # beside the training the JIT-compiled suite reached 5-94 % in its 300 s
  [ "${SM80:-0}" = 1 ] && sm80
  # (beside the drafters' training the suite needs more than 420 s: cut at 66 % in s10)
  # (CUDATESTS_ARGS: test files or other pytest arguments, e.g. a second call's changed tests)
  stage cudatests 600 bash -c "cd tests && python3 -m pytest -q -p no:cacheprovider -k cuda \
    ${CUDATESTS_ARGS:-}"
  # the fuzz tests' CUDA variant under memcheck (out-of-bounds accesses that do not fault),
  # verify / sample through the fused kernel (the default) and the staged one
  stage fuzz_memcheck 600 env OUT="$RES" bash scripts/device_run.sh fuzz
  schedule_sanitize
}
schedule_sanitize() {
  # the scheduler's shared-memory sort (four passes per trip since 2026-12-06 s11) under racecheck
  # and memcheck, every key count from 64 to 16384
  stage schedule_sanitize 180 bash -c 'cd tests && for tool in racecheck memcheck; do \
    echo "== $tool"; compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q \
    -p no:cacheprovider test_schedule.py -k "cuda and matches_reference and uniform" 2>&1 | \
    grep -v "^\s*$"; done'
}
schedule_bench() {  # every mode at R = 1-256, the launcher's sort against either sort forced
  # (the block size A/B: SCHEDULE_THREADS=auto,32,256,1024, measured 2026-12-06 s13)
  stage schedule_bench 180 bash -c "cd bench && python3 bench_schedule.py --R 1,16,64,128,256 \
    --threads ${SCHEDULE_THREADS:-auto} --sorts auto,registers,group --out $RES/schedule.json"
  # where its time goes (sync, async, fixed at R = 1 and 256): stall reasons, not estimates
  stage ncu_schedule 90 bash -c "cd bench && ncu --clock-control none --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section LaunchStats --section SourceCounters \
    --kernel-name regex:schedule_kernel python3 bench_schedule.py --R 1,256 --ncu"
}
sm80() { stage sm80 600 bash -c "SM80_SITE=/tmp/sm80site OUT=$RES bash bench/check_sm80.sh"; }

timed_runs() {  # the GPU to itself, in order of what the open issues need most
  local data=$ROOT/.data
  # the pair (target + DSpark / DFlash / EAGLE-3 drafters, bf16) as <= 15 MiB parts, brought
  # back by `collect` once and carried as .data/pair.tgz.part-* by a later session, which then
  # skips the training (scripts/pack_pair.py)
  if [ ! -f "$ROOT/.data/pair.tgz.part-00" ] && [ "${NO_TRAIN:-0}" != 1 ]; then
    stage pack 120 python3 scripts/pack_pair.py $PAIR $RES/pack && touch "$RES/end_pack"
  fi
  schedule_bench
  # confidence-scheduled verification at gamma 7 on code, every mode with and without the
  # engine's ar_fallback (plain decoding at a batch where a probe measures it faster,
  # dspark/fallback.py; predicted >= 0.95x autoregressive at every batch, s10: every mode
  # 0.25-0.74x at 16-64); fixed gamma 3 / 5 and chat prompts below
  # (SESSION_SWEEP_SCHEDULES: fewer modes where a session re-measures only some, e.g. the +ar ones)
  stage sweep 600 env OUT="$RES/sweep" SWEEP_PAIR=$PAIR \
    SWEEP_SCHEDULES="${SESSION_SWEEP_SCHEDULES:-fixed sync async fixed+ar sync+ar async+ar}" \
    bash scripts/device_run.sh sweep
  stage pair_bench 420 env OUT="$RES/pair" PAIR_DIR=$PAIR EVAL_DIR="$data" \
    bash scripts/bench_pair.sh bench
  # where a round's time goes under load (one graph per stage: draft / forward / accept /
  # commit) at batch 1, 16, 32, and greedy identity there. s13, 64 fused rows: the verify forward
  # took 0.97 / 3.74 / 3.84 ms (cuBLAS above 64 rows) against a 0.94 / 1.13 / 1.38 ms decode step,
  # greedy identity 66 % at 16 / 32; now with the measured crossover (~320 rows for the pair).
  # Fixed gamma only: with stage graphs the scheduled buckets are captured at first use (mid-run)
  stage pair_split 240 bash -c "cd /tmp && dspark bench --stage-times --target $PAIR/target \
    --drafter $PAIR/dspark --dataset $data/humaneval.jsonl $data/mt-bench.jsonl --temperature 0 \
    --batch 1 16 32 --prompts 32 --max-new-tokens 128 --prompt-tokens 256 --no-progress \
    --fused-max-rows auto --out $RES/pair_split"
  # continuous batching (SpeculativeEngine.serve, dspark bench --serve-requests): 256 requests
  # through 16-128 slots, a finished request's slot refilled at once. s13's static batches ended
  # with their slowest request (1.85x the mean request's rounds at 32-128): fixed γ 7 ran 2.07x
  # per user but 1.02x in aggregate at 128
  stage sweep_serve 420 bash -c "cd /tmp && dspark bench --target $PAIR/target \
    --drafter $PAIR/dspark --dataset $data/humaneval.jsonl --temperature 0 --batch 16 32 64 128 \
    --gamma ${SERVE_GAMMAS:-3 7} --schedule ${SERVE_SCHEDULES:-fixed sync sync+ar} --prompts 32 --max-new-tokens 128 --prompt-tokens 256 \
    --serve-requests 256 --fused-max-rows auto --no-progress --out $RES/sweep_serve"
  # a fused ragged (scheduled) verify on its padded block vs gathers around attention in every
  # layer (DSPARK_RAGGED_FUSED): s13's sync round at batch 1 took 0.26 ms more than fixed γ's
  for r in pad gather; do
    stage ragged_$r 200 bash -c "cd /tmp && DSPARK_RAGGED_FUSED=$r dspark bench --stage-times \
      --target $PAIR/target --drafter $PAIR/dspark --dataset $data/humaneval.jsonl \
      --temperature 0 --batch 1 4 --schedule fixed sync --prompts 32 --max-new-tokens 128 \
      --prompt-tokens 256 --no-progress --out $RES/ragged_$r"
  done
  # T = 1: drafts sampled at a lower temperature (draft_temperature_scale; exact at any scale).
  # s13: DSpark's per-position acceptance at T = 1 was 0.3-0.45 (0.6-0.8 greedy), τ 1.5-1.7
  for sc in 0.5 0.7; do
    stage draft_temp_$sc 200 bash -c "cd /tmp && dspark bench --target $PAIR/target \
      --drafter $PAIR/dspark --dataset $data/humaneval.jsonl $data/mbpp.jsonl --temperature 1 \
      --batch 1 --prompts 16 --max-new-tokens 128 --prompt-tokens 256 --no-progress \
      --draft-temperature-scale $sc --out $RES/draft_temp_$sc"
  done
  # dspark::markov_draft at the pair's shape (V 8256, hidden 256, rank 256): the op lost to the
  # graphed loop at the 8B vocabulary (984 vs 622 us at R = 1), never timed at a small one; then
  # the engine with it on (DSPARK_CUDA_KERNELS=markov_draft), same prompts as pair_bench: the A/B
  # that decides whether the DSpark drafter uses it on CUDA (issue 13, item 2)
  stage markov_pair 120 bash -c "cd bench && python3 bench_markov_draft.py --R 1,16,64 --V 8256 \
    --hidden 256 --rank 256 --out $RES/markov_pair.json"
  stage pair_markov_ab 240 bash -c "cd /tmp && DSPARK_CUDA_KERNELS=markov_draft dspark bench \
    --target $PAIR/target --drafter $PAIR/dspark --dataset $data/humaneval.jsonl $data/mbpp.jsonl \
    --temperature 0 1 --batch 1 --prompts 16 --max-new-tokens 128 --prompt-tokens 256 \
    --no-progress --out $RES/pair_markov_ab"
  # the round-cost issue's identity bar: greedy speculative == autoregressive in bf16 on every
  # shipped eval set, 256 tokens, DSpark and n-gram, batch 1 and 4
  stage identity_256 420 bash -c "cd /tmp && dspark bench --target $PAIR/target --drafter $PAIR/dspark \
    --ngram 3 --dataset $data/humaneval.jsonl $data/mbpp.jsonl $data/mt-bench.jsonl $data/gsm8k.jsonl \
    --temperature 0 --batch 1 4 --prompts 16 --max-new-tokens 256 --prompt-tokens 256 --no-progress \
    --out $RES/identity_256"
  stage profile 240 bash bench/profile.sh $PAIR/target $PAIR/dspark "$data/humaneval.jsonl" "$RES/profile"
  stage sweep_chat 420 env OUT="$RES/sweep_chat" SWEEP_PAIR=$PAIR SWEEP_SET=mt-bench \
    SWEEP_SCHEDULES="fixed sync async fixed+ar sync+ar async+ar" bash scripts/device_run.sh sweep
  # fixed gamma 3 and 5 (the issue's "best fixed gamma" is over 3 / 5 / 7)
  stage sweep_gammas 300 env OUT="$RES/sweep_g" SWEEP_PAIR=$PAIR SWEEP_GAMMAS="3 5" \
    SWEEP_SCHEDULES=fixed bash scripts/device_run.sh sweep
  stage sweep_gammas_chat 300 env OUT="$RES/sweep_gc" SWEEP_PAIR=$PAIR SWEEP_SET=mt-bench \
    SWEEP_GAMMAS="3 5" SWEEP_SCHEDULES=fixed bash scripts/device_run.sh sweep
  # the round-cost issue: the demo pair's round vs decode step, verify forward at the 8B shape
  stage round_demo 240 bash -c "cd bench && python3 bench_round.py --dataset $data/humaneval.jsonl \
    --drafters dspark,dspark-compiled,ngram --out $RES/round_demo.json"
  stage verify_forward 240 bash -c "cd bench && python3 bench_verify_forward.py --batches 1,4,8 \
    --rows 8 --out $RES/verify_forward.json"
  # decode_attention's work split (rows per block: the launcher's choice against fixed values) at
  # the pair's layer (batch 1 and 4) and the 8B layer: the multi-row attention was the largest
  # cost of the pair's verify forward (~50 µs a layer at 8 blocks)
  stage attention_split 120 bash -c "cd bench && for b in 1 4; do python3 bench_attention.py \
    --heads 4,2,64 --batch \$b --slots 256,1024 --rows 1,8 --rows-per-block auto,1,2,4,8 --reps 100 \
    --out $RES/attention_pair_b\$b.json; done; python3 bench_attention.py --slots 1024,4096,32768 \
    --rows 1,8 --rows-per-block auto,1,2,8 --reps 100 --out $RES/attention_8b.json"
  # the drafters eager (pair_bench compiles them: `dspark bench`'s default on CUDA since
  # 2026-12-06 s10, round 1.86 -> 1.54 ms), same prompts: the A/B of the compile
  stage pair_eager 300 bash -c "cd /tmp && dspark bench --no-compile-drafter --target $PAIR/target \
    --drafter $PAIR/dspark \$([ -d $PAIR/dflash ] && echo $PAIR/dflash) \
    --dataset $data/humaneval.jsonl $data/mt-bench.jsonl \
    --temperature 0 1 --batch 1 --prompts 16 --max-new-tokens 128 --prompt-tokens 256 \
    --no-progress --out $RES/pair_eager"
  # verify / sample at the small vocabularies of the pairs (V = 8192): the fused kernel's accept
  # stage took 0.059 ms a round on the pair where the staged one took 0.036 (s8 vs s9 profiles)
  stage ops_small_vocab 90 bash -c "cd bench && python3 bench_ops.py --V 8192 --R 1,4,64 --gamma 4,7 \
    --dtypes fp32 --warm --reps 100 --out $RES/bench_ops_v8192.json"
  # the fused kernels for every verify of the pair (its SPS table: 63 rows fused 2.08 ms, 79 rows
  # on cuBLAS 3.93 ms): faster rounds at batch >= 16 and greedy identity there (was 72-95 %)
  stage sweep_fused_all 300 env OUT="$RES/sweep_fused" SWEEP_PAIR=$PAIR SWEEP_BATCHES="16 64 128" \
    SWEEP_SCHEDULES="fixed async" SWEEP_DEVICE="--fused-max-rows 1024" bash scripts/device_run.sh sweep
  # the scheduler ranking with the step's fixed cost (~0.5 ms of draft + accept + commit per
  # round on the pair, from the s9 time split): longer admitted prefixes under load
  stage sweep_overhead 300 env OUT="$RES/sweep_oh" SWEEP_PAIR=$PAIR SWEEP_BATCHES="4 32 64 128" \
    SWEEP_SCHEDULES="sync async" SWEEP_BENCH_ARGS="--step-overhead 0.5" bash scripts/device_run.sh sweep
  [ "${PAIR_ABLATE:-0}" = 1 ] && stage ablate_eval 240 env OUT="$RES/pair" PAIR_DIR=$PAIR ABLATE_PROMPTS=32 \
    ABLATE_ONLY="base method layers1 layers3 halfdata" bash scripts/bench_pair.sh ablate-eval
  stage project 240 env OUT="$RES" PAIR_BENCH_JSON=$PAIR/bench_results.json bash scripts/device_run.sh project
  # batch 8 with cuBLAS above 8 rows (its verify forward: 13.2 ms on cuBLAS vs 27.2 fused, s9)
  stage project_max8 180 env OUT="$RES" PROJECT_ARGS="--fused-max-rows 8" PROJECT_NAME=project_8b_max8 \
    bash scripts/device_run.sh project
  # why the kernels miss their bars (issue 13 asks for ncu's reading, not estimates): the
  # multi-row attention at the pair's shape (the largest cost of its verify forward), the fused
  # verify at R = 1, markov_draft's logits kernel
  local NCU=(ncu --clock-control none --section SpeedOfLight --section Occupancy
             --section WarpStateStats --section LaunchStats --section SchedulerStats)
  stage ncu_attention 150 bash -c "cd bench && ${NCU[*]} --kernel-name regex:decode_attention_kernel \
    python3 bench_attention.py --heads 4,2,64 --batch 4 --slots 256 --rows 1,8 --ncu"
  stage ncu_verify 150 bash -c "cd bench && ${NCU[*]} --kernel-name regex:Fused --launch-count 4 \
    python3 bench_ops.py --R 1,64 --gamma 7 --dtypes bf16 --impls fused --reps 2"
  stage ncu_markov 150 bash -c "cd bench && ${NCU[*]} --kernel-name regex:MarkovLogits \
    --launch-count 3 python3 bench_markov_draft.py --R 1 --variants op --base-logits bfloat16 --reps 2"
  # the kernels (each measured on 2026-12-06; rerun when they change): OPS_BENCH=1
  if [ "${OPS_BENCH:-0}" = 1 ]; then
    stage markov_bench 150 bash -c "cd bench && python3 bench_markov_draft.py --out $RES/markov_draft.json"
    stage kv_commit_bench 120 bash -c "cd bench && python3 bench_kv_commit.py --out $RES/kv_commit.json"
    stage ops_bench 240 bash -c "cd bench && python3 bench_ops.py --R 1,8,64 --gamma 1,7 --out $RES/bench_ops.json"
  fi
}

job() {
  log "job start"
  # the pair (and the ablation's variants beside its drafters) in the background of this job
  # ("base" is the dspark drafter itself: not trained twice)
  # PAIR_ABLATE=1: the recipe ablation's four variants train beside the drafters (measured on
  # 2026-12-06 twice; off by default: eight processes on one GPU left each drafter ~750 steps in
  # its 4 minutes, and a variant that trained alone at the end reached 2476 steps and tau 4.0 vs 2.7)
  if [ "${NO_TRAIN:-0}" = 1 ]; then  # a short budget: the shipped demo pair stands in
    PAIR=$ROOT/dspark/demo_models; log "NO_TRAIN: the demo pair"; touch "$RES/pair_trained"
    stage schedule_tests 150 bash -c 'cd tests && python3 -m pytest -q -p no:cacheprovider \
      test_schedule.py test_scheduler.py test_engine_schedule.py test_fallback.py -k cuda'
    schedule_sanitize
    schedule_bench
    stage ops_floor 200 bash -c "cd bench && python3 bench_ops.py --R 1,8,64 --gamma 7 --dtypes bf16 --chain 20 \
      --impls fused --out $RES/bench_ops.json"
    stage sweep 300 env OUT="$RES/sweep" SWEEP_PAIR=$PAIR SWEEP_BATCHES="1 16 64" \
      SWEEP_SCHEDULES="fixed fixed+ar sync+ar" bash scripts/device_run.sh sweep
    SKIP="${SKIP:-} schedule_sanitize schedule_bench sweep pair_bench pair_eager"  # done above
    correctness; timed_runs; log "job done"; touch "$RES/done"; return
  fi
  if [ -f "$ROOT/.data/pair.tgz.part-00" ]; then  # a pair packed by an earlier session
    mkdir -p "$(dirname $PAIR)" && cat "$ROOT"/.data/pair.tgz.part-* | tar -C "$(dirname $PAIR)" -xzf - &&
      log "pair unpacked from .data (not trained)" && touch "$RES/pair_trained"
    correctness; timed_runs; log "job done"; touch "$RES/done"; return
  fi
  local abl=(); [ "${PAIR_ABLATE:-0}" = 1 ] && abl=(ABLATE_CONCURRENT=1 ABLATE_ONLY="method layers1 layers3 halfdata")
  ( env OUT="$RES/pair" PAIR_DIR=$PAIR "${abl[@]}" TARGET_MINUTES=${TARGET_MINUTES:-5} \
      DRAFT_MINUTES=${DRAFT_MINUTES:-6} \
      bash scripts/bench_pair.sh target data drafters > "$RES/pair_train.txt" 2>&1
    log "pair trained rc=$?"; touch "$RES/pair_trained" ) &
  local pair_pid=$!
  correctness
  wait $pair_pid
  timed_runs
  log "job done"; touch "$RES/done"
}

case "${1:-}" in
  start)
    # the eval sets travel in .data (../shared does not reach the device): without them every
    # timed stage fails after minutes of device time (2026-12-06 s14: a fresh checkout had none)
    for f in humaneval mbpp mt-bench gsm8k; do
      [ -f "$ROOT/.data/$f.jsonl" ] || { echo "gpu_session: .data/$f.jsonl missing: copy \
../shared/data/eval/*.jsonl into .data here and carry .data" >&2; exit 2; }
    done
    [ -f "$ROOT/.data/pair.tgz.part-00" ] || echo "gpu_session: no packed pair in .data: the job \
trains one first (~12 min of device time)"
    OUT=$RES bash scripts/device_run.sh build > "$RES/build.txt" 2>&1 || { tail -30 "$RES/build.txt"; exit 1; }
    tail -2 "$RES/build.txt"
    setsid nohup bash "$0" job > "$RES/job.txt" 2>&1 < /dev/null &
    echo "job started" ;;
  job) job ;;
  collect)
    end=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $end ] && [ ! -f "$RES/done" ]; do sleep 5; done
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    tar -C "$(dirname "$RES")" -czf "$OUT/results.tgz" --exclude='*.safetensors' \
      --exclude='*.pt' --exclude='trace.json.gz' --exclude=pack "$(basename "$RES")"
    cp "$RES/progress.txt" "$OUT/" 2>/dev/null
    # the packed pair, once (a call brings back at most 8 files)
    if [ -d "$RES/pack" ] && [ ! -f "$RES/pack_sent" ] && [ -f "$RES/end_pack" ]; then
      cp "$RES"/pack/pair.tgz.part-* "$OUT/" && touch "$RES/pack_sent"; fi
    tail -40 "$RES/progress.txt"; ls -l "$OUT" ;;
  *) echo "usage: gpu_session.sh start | collect SECONDS" >&2; exit 2 ;;
esac
