#!/usr/bin/env bash
# Train a small target and the three drafters on the GPU machine, then measure them.
# Usage: bash scripts/drafters_device.sh [target] [data] [dspark] [dflash] [eagle3] [parallel] [eval]
# (after `bash scripts/device_run.sh build`). Runs live in out/ (git-ignored, kept while the
# machine stays warm); logs and JSON results are copied to $OUT. Each stage fits in one
# 10-minute command; sizes: target ~29M params (8 x 512, vocab 8192), drafters gamma 7.
# `parallel` trains the three methods side by side on the one GPU (small models leave it mostly
# idle, so each gets about the throughput it would get alone) after `data` built their shared data.
# Eval prompt sets: EVAL_DIR (default shared/data/eval, then .evaldata) *.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" out
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
# run from out/ so that `import dspark` is the installed package, not the source tree
cli() { (cd "$ROOT/out" && "$PY" -m dspark.cli_train "$@"); }
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
log() { echo "== $(date +%T) $*"; }
# the same data (target-written responses to stdlib prompts) for every method
DRAFT=(--target target --data "$STDLIB" --data-cache data --max-mb 32 --max-samples 4000
       --prompt-tokens 64 --gen-tokens 256 --max-length 320 --gen-batch 256 --gamma 7
       --epochs "${DRAFT_EPOCHS:-2}" --batch-size 16 --num-anchors 256 --max-minutes "${DRAFT_MINUTES:-6}" --save-every 200
       --calib-prompts 64 --calib-new-tokens 128 --eval-prompts 16 --eval-new-tokens 128
       --no-progress)
for stage in "$@"; do
  case "$stage" in
    target)
      log train-target
      cli train-target --out target --max-mb 48 --vocab-size 8192 --hidden 512 \
        --layers 8 --heads 8 --kv-heads 4 --head-dim 64 --intermediate 1536 --seq-len 512 \
        --batch-size 32 --steps 3000 --lr 1e-3 --max-minutes "${TARGET_MINUTES:-6}" --no-progress \
        2>&1 | tee "$OUT/train_target.log" | tail -12
      cp out/target/train_target.json out/target/config.json "$OUT/" 2>/dev/null ;;
    data)
      log "draft data"; cli train-draft --method dspark --out dspark --data-only "${DRAFT[@]}" 2>&1 | tail -3 ;;
    dspark|dflash|eagle3)
      log "train-draft $stage"
      cli train-draft --method "$stage" --out "$stage" "${DRAFT[@]}" \
        2>&1 | tee "$OUT/train_$stage.log" | grep -v "^step " | tail -25
      for f in drafter_config.json results.json train_log.jsonl; do
        cp "out/$stage/$f" "$OUT/${stage}_$f"; done ;;
    parallel)
      for m in dspark dflash eagle3; do
        (cli train-draft --method "$m" --out "$m" "${DRAFT[@]}" > "$OUT/train_$m.log" 2>&1
         for f in drafter_config.json results.json train_log.jsonl; do
           cp "out/$m/$f" "$OUT/${m}_$f"; done) &
      done
      log "training dspark, dflash, eagle3 side by side"; wait
      for m in dspark dflash eagle3; do echo "-- $m"; grep -v "^step " "$OUT/train_$m.log" | tail -14; done ;;
    eval)
      DRAFTERS=(); for m in dspark dflash eagle3; do [ -f "out/$m/model.safetensors" ] && DRAFTERS+=("$m"); done
      SETS=("heldout:data/heldout.safetensors")
      EVAL_DIR=${EVAL_DIR:-shared/data/eval}; [ -d "$EVAL_DIR" ] || EVAL_DIR=.evaldata
      for n in humaneval mbpp mt-bench; do
        f=$EVAL_DIR/$n.jsonl; [ -f "$f" ] && SETS+=("$n:$ROOT/$f"); done
      for s in "${SETS[@]}"; do
        for t in 0 1; do
          log "eval ${s%%:*} T=$t"
          cli eval-draft --target target --drafter "${DRAFTERS[@]}" --data "${s#*:}" \
            --num-prompts "${EVAL_PROMPTS:-64}" --max-new-tokens 256 --batch 16 --temperature "$t" --dtype "${EVAL_DTYPE:-auto}" --json \
            > "$OUT/eval_${s%%:*}_T$t.json" 2> "$OUT/eval_${s%%:*}_T$t.err"
          "$PY" - "$OUT/eval_${s%%:*}_T$t.json" <<'EOF'
import json, sys
for path, r in json.load(open(sys.argv[1])).items():
    s = r["speculative"]
    print(f"{path:12s} tau {s['tau']:.3f} accept {s['acceptance_rate']:.1%} per-pos "
          + " ".join(f"{p:.2f}" for p in s["position_acceptance"])
          + f" | {s['tokens_per_s']:.0f} tok/s, speedup {r.get('speedup') or 0:.2f}x"
          + (f", greedy identical {r['greedy_identical']}" if "greedy_identical" in r else ""))
EOF
        done
      done ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
