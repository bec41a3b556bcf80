"""scripts/bench_pair.sh at toy scale (PAIR_SCALE=smoke, CPU): the benchmark pair's exact
commands run end to end — target, shared draft data, the three drafters and the draft LM side by
side, `dspark bench` with its JSON and plots, the tar parts — so the GPU run of the same script
fails on nothing but the GPU."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from safetensors.torch import load

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_pair.sh")


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="needs the source tree's scripts/")
def test_bench_pair_smoke(tmp_path):
    evals = tmp_path / "eval"
    evals.mkdir()
    for name, turns in (("humaneval", ["def add(a, b):\n    return", "def is_even(n):"]),
                        ("mt-bench", ["Write a short note about tests.", "Name three colors."])):
        with open(evals / f"{name}.jsonl", "w") as f:
            for t in turns:
                f.write(json.dumps({"turns": [t]}) + "\n")
    out, pair = tmp_path / "out", tmp_path / "pair"
    env = dict(os.environ, PAIR_SCALE="smoke", OUT=str(out), PAIR_DIR=str(pair),
               EVAL_DIR=str(evals), PY=sys.executable, DEVICE="cpu", OMP_NUM_THREADS="1")
    stages = ["target", "data", "drafters", "bench", "ablate", "pack"]
    proc = subprocess.run(["bash", SCRIPT, *stages],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    times = [line.split() for line in open(out / "pair_times.txt")]
    assert [t[0] for t in times] == stages
    assert all(t[2] == "0" for t in times)
    target_cfg = json.load(open(pair / "target" / "config.json"))
    lm_cfg = json.load(open(pair / "draftlm" / "config.json"))
    assert lm_cfg["vocab_size"] == target_cfg["vocab_size"]  # the draft LM shares the tokenizer
    assert "val_loss" in json.load(open(out / "train_target.json"))
    report = json.load(open(out / "bench" / "results.json"))
    # DSpark also under its confidence scheduler; the drafters without a confidence head are
    # listed as skipped for that mode, not run
    methods = {"autoregressive", "dspark", "dspark[sync]", "dflash", "eagle3", "draft-lm",
               "ngram"}
    assert {s["method"] for s in report["skipped"]} == {
        "dflash[sync]", "eagle3[sync]", "draft-lm[sync]", "ngram[sync]"}
    for ds in ("humaneval", "mt-bench"):
        for temp in (0.0, 1.0):
            runs = [r for r in report["runs"] if r["dataset"] == ds and r["temperature"] == temp]
            assert {r["method"] for r in runs} == methods, (ds, temp)
            for r in runs:
                assert r["new_tokens"] > 0 and r["tokens_per_s"] > 0
                if temp == 0.0 and r["method"] != "autoregressive":
                    assert r["greedy_identical_fraction"] == 1.0, (ds, r["method"])
    for png in ("acceptance_by_position", "speedup", "time_split"):
        assert (out / "bench" / f"{png}.png").stat().st_size > 0
    for temp in (0, 1):  # the recipe ablation: every variant evaluated at T = 0 and 1
        ablate = json.load(open(out / f"ablate_T{temp}.json"))
        assert sorted(os.path.basename(p) for p in ablate) == \
            ["base", "halfdata", "layers1", "layers3", "method", "softtv"]
        assert all(r["speculative"]["tau"] >= 1.0 for r in ablate.values())
    parts = sorted(p for p in os.listdir(out) if p.startswith("pair.tgz.part-"))
    assert parts and all((out / p).stat().st_size <= 15 << 20 for p in parts)
    # the parts are one gzipped tar of the target and the drafters, their weights in bf16
    blob = b"".join((out / p).read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = set(tar.getnames())
        assert {"pair/target/config.json", "pair/target/tokenizer.json"} <= names
        for m in ("dspark", "dflash", "eagle3"):
            assert f"pair/{m}/drafter_config.json" in names
            weights = load(tar.extractfile(f"pair/{m}/model.safetensors").read())
            assert weights and all(w.dtype == torch.bfloat16 for w in weights.values()
                                   if w.is_floating_point())
        assert not any("checkpoint" in n or n.endswith(".pt") for n in names)
