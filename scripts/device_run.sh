#!/usr/bin/env bash
# One batched session on the GPU machine: build, CUDA checks, sanitizers, benchmarks.
# Usage: bash scripts/device_run.sh [build] [check] [tests] [sanitize] [fuzz] [churn] [linear] [engine]
#        [decode] [bench] [sm80] [verifytests] [verifysanitize] [pair] [sweep] [profile]
#        [project] [tp] [linear_ab]
# (decode: DECODE_VARIANTS=graph,compile,...); results in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }
for stage in "$@"; do
  case "$stage" in
    build)
      log build
      nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
      # NOTE(device): the image's CXX (/opt/gcc/bin/g++) links libstdc++ statically, so the
      # module's iostreams clash with torch's libstdc++ (segfault formatting an error message).
      # Build with the system compiler, which links libstdc++ dynamically like torch.
      SYSCXX=(); [ -x /usr/bin/g++ ] && SYSCXX=(-C cmake.define.CMAKE_CXX_COMPILER=/usr/bin/g++
        -C cmake.define.CMAKE_CUDA_HOST_COMPILER=/usr/bin/g++)
      python3 -m pip install --no-build-isolation --no-deps -v "${SYSCXX[@]}" . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      ldd "$(python3 -c 'import glob, site; print(glob.glob(site.getsitepackages()[0] + "/dspark/_C*.so")[0])')" | grep -q libstdc++ \
        || echo "WARNING: dspark/_C links libstdc++ statically" 
      (cd /tmp && python3 -c "import dspark, json; print(json.dumps(dspark.build_info()))") ;;
    check)
      log check_cuda; (cd bench && python3 check_cuda.py --cases 300) 2>&1 | tail -25 ;;
    tests)
      log pytest; (cd tests && timeout 400 python3 -m pytest -q -p no:cacheprovider 2>&1 | tail -8) ;;
    sanitize)
      log memcheck
      (cd bench && compute-sanitizer --tool memcheck --leak-check no python3 check_cuda.py --cases 12 --small) 2>&1 | tail -6
      log racecheck
      (cd bench && compute-sanitizer --tool racecheck python3 check_cuda.py --cases 6 --small) 2>&1 | tail -6 ;;
    fuzz)  # tests/test_fuzz.py's CUDA variant under memcheck (out-of-bounds accesses that do not
      # fault), verify/sample through the fused kernel (the default) and the staged one
      for impl in staged fused; do
        log "fuzz-memcheck ($impl verify)"
        # the whole log is kept (a tail hides which API call or access memcheck reported)
        (cd tests && DSPARK_VERIFY_IMPL=$impl timeout 290 compute-sanitizer --tool memcheck \
          --leak-check no --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider test_fuzz.py \
          -k cuda > "$OUT/fuzz_memcheck_$impl.log" 2>&1)
        tail -3 "$OUT/fuzz_memcheck_$impl.log"
        echo "memcheck reports (count, first line of each):"
        grep -E "^========= [A-Z]" "$OUT/fuzz_memcheck_$impl.log" | grep -v "ERROR SUMMARY" |
          sed -E 's/0x[0-9a-f]+/0x../g' | sort | uniq -c | sort -rn | head -20
      done ;;
    churn)  # 300 generate calls: flat CUDA memory allocated / reserved (tests/test_churn.py)
      log churn; (cd tests && timeout 300 python3 -m pytest -q -p no:cacheprovider test_churn.py -k cuda 2>&1 | tail -8) ;;
    linear)
      log layer-op-tests; (cd tests && timeout 300 python3 -m pytest -q -p no:cacheprovider test_linear.py test_attention.py -k cuda 2>&1 | tail -4)
      log bench_linear; (cd bench && python3 bench_linear.py --M 1,2,4 --out "$OUT/bench_linear.json") 2>&1 | tail -18
      log bench_attention; (cd bench && python3 bench_attention.py --out "$OUT/bench_attention.json") 2>&1 | tail -5 ;;
    linear_ab)  # fused_linear's activation staging: the rule before 2026-12-06 s14 (-1) against
      # the default (sized to the slice, <= 32 KB a block), same build: the projections alone at
      # 1 / 8 / 16 rows, then the 8B-shape verify forward (decode vs 8 rows at batch 1 and 4)
      for b in ${LINEAR_AB_BUDGETS:--1 0}; do
        log "bench_linear DSPARK_LINEAR_STAGE_BYTES=$b"
        (cd bench && DSPARK_LINEAR_STAGE_BYTES=$b python3 bench_linear.py --M 1,8,16 --reps 100 \
          --out "$OUT/linear_stage$b.json") 2>&1 | tail -16
        log "bench_verify_forward DSPARK_LINEAR_STAGE_BYTES=$b"
        (cd bench && DSPARK_LINEAR_STAGE_BYTES=$b timeout 120 python3 bench_verify_forward.py \
          --batches 1,4 --rows 8 --variants fused --out "$OUT/verify_forward_stage$b.json") 2>&1 | tail -8
      done ;;
    engine)
      log engine; (cd bench && python3 check_engine_cuda.py) 2>&1 | tail -8 ;;
    graphs)
      log engine-graph-tests; (cd tests && timeout 400 python3 -m pytest -q -p no:cacheprovider test_engine_graphs.py 2>&1 | tail -15) ;;
    cudatests)
      log cuda-tests; (cd tests && timeout 500 python3 -m pytest -q -p no:cacheprovider -k cuda 2>&1 | tail -15) ;;
    stateops)
      log state-ops; (cd tests && timeout 300 python3 -m pytest -q -p no:cacheprovider test_state_ops.py -k cuda 2>&1 | tail -4)
      (cd bench && python3 bench_state_ops.py --out "$OUT/bench_state_ops.json") 2>&1 | tail -14 ;;
    round)  # speculative round vs decode step on the demo pair (.data/: carried prompt sets)
      log bench_round
      for dt in bfloat16 float32; do
        (cd bench && python3 bench_round.py --dataset ../.data/humaneval.jsonl --prompts 16 --new 128 --dtype $dt --out "$OUT/round_$dt.json") 2>&1 | tail -4
      done ;;
    decode)
      log decode; (cd bench && python3 bench_decode.py --profile --new 192 --variants "${DECODE_VARIANTS:-graph,compile}" --out "$OUT/bench_decode.json") 2>&1 | tail -8 ;;
    choose)  # keep the working tree's kernels only if they beat .alt/include (the last measured)
      log choose; (cd bench && python3 bench_ops.py --R 1,64 --gamma 1,7 --out "$OUT/bench_ops_try.json") 2>&1 | tail -9
      if python3 -c "import json,sys; r={(x['mode'],x['R'],x['gamma']):x['verify_us'] for x in json.load(open('$OUT/bench_ops_try.json'))['rows']}; sys.exit(0 if r[('sampled',64,7)] < $ALT_SAMPLED and r[('greedy',64,7)] < $ALT_GREEDY else 1)"; then
        echo "choose: working tree kernels kept"
      else
        echo "choose: reverting to .alt/include"; rm -rf include && cp -r .alt/include include && touch .reverted
        python3 -m pip install --no-build-isolation --no-deps . > "$OUT/build2.log" 2>&1 || exit 1
      fi ;;
    sm80)  # the pre-Hopper code paths, JIT-compiled from compute_80 PTX (then the normal build)
      # (build + tests + rebuild fit one call with TEST_LIMIT <= 300 s; if a call is killed
      # before the rebuild, run `build` next: the machine would keep the compute_80 build)
      log sm80; bash bench/check_sm80.sh ;;
    bench)  # fused and staged verify/sample side by side (A/B), bf16 and fp32 logits
      log bench; (cd bench && python3 bench_ops.py --out "$OUT/bench_ops.json") 2>&1 | tail -42 ;;
    verifytests)  # the verify / sample tests on the GPU: the fused kernel, then the staged one
      log verify-tests-fused
      (cd tests && DSPARK_VERIFY_IMPL=fused timeout 330 python3 -m pytest -q -p no:cacheprovider -k cuda test_verify_fused.py \
        test_verify.py test_sample.py test_verify_contract.py test_distribution.py 2>&1 | tail -15)
      log verify-tests-staged
      (cd tests && DSPARK_VERIFY_IMPL=staged timeout 240 python3 -m pytest -q -p no:cacheprovider \
        -k cuda test_verify.py test_sample.py test_verify_contract.py 2>&1 | tail -4) ;;
    verifysanitize)  # memcheck + racecheck over random verify/sample batches, multi-slice rows too
      log memcheck
      (cd bench && compute-sanitizer --tool memcheck --leak-check no python3 check_cuda.py --cases 12 --small) 2>&1 | tail -4
      (cd bench && compute-sanitizer --tool memcheck --leak-check no python3 check_cuda.py --cases 4 --small --vocab 20000) 2>&1 | tail -4
      log racecheck
      (cd bench && compute-sanitizer --tool racecheck python3 check_cuda.py --cases 6 --small) 2>&1 | tail -4
      (cd bench && compute-sanitizer --tool racecheck python3 check_cuda.py --cases 2 --small --vocab 20000) 2>&1 | tail -4 ;;
    pair)  # the benchmark pair, one call per stage or two (PAIR_STAGES, default target;
      # scripts/bench_pair.sh: target data | drafters | bench | ablate)
      bash scripts/bench_pair.sh ${PAIR_STAGES:-target} ;;
    sweep)  # concurrency sweep of the scheduled DSpark drafter on the benchmark pair (issue:
      # confidence-scheduled verification): SPS table first, then every mode at every batch;
      # run from out/ (the installed dspark, not the source tree)
      # SWEEP_PAIR: the pair's directory (default out/pair)
      SP=${SWEEP_PAIR:-$PWD/out/pair}; mkdir -p out
      log profile-sps
      (cd out && GRID=$(python3 -c "from dspark.schedule_step import bucket_grid as g; print(','.join(map(str, g(1024))))") &&
        python3 -m dspark.cli profile-sps --target "$SP/target" --max-tokens 1024 --grid "$GRID" \
          --interpolate step --out "$OUT/sps" --no-progress ${SWEEP_DEVICE:---fused-max-rows auto} 2>&1 | tail -3)
      log "bench sweep"
      # default: code prompts, gamma 7, every mode (30 runs); the rest in further calls, e.g.
      # SWEEP_SET=mt-bench, or SWEEP_GAMMAS="3 5" SWEEP_SCHEDULES=fixed
      (cd out && python3 -m dspark.cli bench --target "$SP/target" --drafter "$SP/dspark" \
        --dataset ../.data/${SWEEP_SET:-humaneval}.jsonl --prompts ${SWEEP_PROMPTS:-32} \
        --max-new-tokens ${SWEEP_TOKENS:-128} --batch ${SWEEP_BATCHES:-1 4 16 32 64 128} \
        --gamma ${SWEEP_GAMMAS:-7} --schedule ${SWEEP_SCHEDULES:-fixed threshold:0.5 sync async} \
        --sps "$OUT/sps/"*.json --no-progress ${SWEEP_DEVICE:---fused-max-rows auto} ${SWEEP_BENCH_ARGS:-} \
        --out "$OUT/sweep" 2>&1 | tail -60) ;;
    profile)  # where a step's time goes (bench/profile.sh) on the benchmark pair
      bash bench/profile.sh out/pair/target out/pair/dspark .data/humaneval.jsonl "$OUT/profile" 2>&1 | tail -40 ;;
    project)  # the 8B-shape projection (with the pair's tau when its bench ran on this machine)
      PBJ=${PAIR_BENCH_JSON:-$PWD/out/pair/bench_results.json}
      TJ=(); [ -f "$PBJ" ] && TJ=(--tau-json "$PBJ")
      (cd bench && python3 project_8b.py --batches 1,8 "${TJ[@]}" --tau ${PROJECT_TAUS:-paper-humaneval=5.52 paper-mbpp=5.16 paper-mt-bench=3.72 paper-gsm8k=6.17} \
        ${PROJECT_ARGS:-} --out "$OUT/${PROJECT_NAME:-project_8b}.json") 2>&1 | tail -20 ;;
    tp)  # tensor parallelism over the host's GPUs (NCCL, multicast off): checks, then speed;
      # one GPU runs a world of one rank (TP_ARGS="--layers 32" fits the 32B shape on an H100)
      N=${TP_NPROC:-$(nvidia-smi -L | wc -l)}
      log "gloo tests"; (cd tests && timeout 300 python3 -m pytest -q -p no:cacheprovider test_tensor_parallel.py 2>&1 | tail -4)
      log "bench_tp over $N GPUs"
      python3 -m torch.distributed.run --nproc-per-node "$N" bench/bench_tp.py ${TP_ARGS:-} \
        --out "$OUT/bench_tp_$N.json" 2>&1 | grep -v Warning | tail -40 ;;
    *) echo "device_run: unknown stage $stage" >&2; exit 2 ;;
  esac
done
log done
