"""The 8B-shape projection: measured step costs at the Qwen3-8B shape, a tau from elsewhere.

Random bf16 weights at the Qwen3-8B shape (36 layers, d = 4096, V = 151936) and a DSpark
drafter at the paper's width for that target (5 draft layers of d = 4096, taps [1, 9, 17, 25,
33], Markov head of rank 256, confidence head; docs: dspark-method.md section 1), both on the
GPU, through the engine exactly as `dspark bench` runs it (CUDA graphs; the step as one graph).
Random weights accept almost nothing, so every round costs what a round costs and emits ~1
token; what is measured is the cost: T_decode (a decode step), T_round (a whole speculative
step: draft + verify forward over gamma + 1 rows + acceptance + commit) and, in a second run with
one graph per stage, its split. The projection for a tau measured elsewhere (the benchmark pair,
or the paper's reported tau) is

    speedup = tau * T_decode / T_round

It is a projection from measured step costs, not a measured speedup: labelled so in the output.

    python bench/project_8b.py --batches 1,8 --tau pair=4.1 paper-humaneval=5.52 \
        [--tau-json $OUT/bench/results.json] --out project_8b.json
"""
import argparse
import json
import time

import torch
from bench_decode import random_qwen3_8b

from dspark.drafters import DrafterSpec, make_drafter
from dspark.drafters.registry import get_method
from dspark.engine import SpeculativeEngine
from dspark.models import ModelRunner

TAPS_8B = [1, 9, 17, 25, 33]  # dspark-method.md, the Qwen3-8B row
MASK_8B = 151669


def random_dspark_drafter(target, gamma: int, layers: int, rank: int, taps=TAPS_8B,
                          mask_token_id=MASK_8B):
    """A DSpark draft model for ``target`` with random weights in its dtype on its device
    (normal(0, 0.02), norms 1)."""
    spec = DrafterSpec.for_target(target.config, "dspark", gamma=gamma, target_layer_ids=taps,
                                  mask_token_id=mask_token_id, num_draft_layers=layers,
                                  markov_rank=rank)
    with torch.device("meta"):
        model = get_method("dspark").model_class(spec)
    dev = target.device
    gen = torch.Generator(device=dev).manual_seed(1)
    sd = {}
    for k, v in model.state_dict().items():
        t = torch.empty(v.shape, dtype=target.dtype, device=dev)
        sd[k] = t.normal_(0.0, 0.02, generator=gen) if v.dim() > 1 else t.fill_(1.0)
    model.load_state_dict(sd, assign=True, strict=True)
    model.inv_freq = spec.draft_config().inv_freq().to(dev)
    model.attach_target(target)
    return make_drafter(model.eval().requires_grad_(False))


def per_round(gen, key: str) -> float:
    m = gen.metrics
    return getattr(m, key) / max(m.rounds, 1) * 1e3


def measure(runner, drafter, B: int, prompt_len: int, new_tokens: int) -> dict:
    g = torch.Generator().manual_seed(B)
    V = runner.vocab_size
    prompts = [torch.randint(1, V - 1, (prompt_len,), generator=g).tolist() for _ in range(B)]
    kw = dict(max_new_tokens=new_tokens, temperature=0.0, stop_tokens=[])
    ar = SpeculativeEngine(runner)
    whole = SpeculativeEngine(runner, drafter, stage_times=False)
    split = SpeculativeEngine(runner, drafter, stage_times=True)
    out = {}
    for name, eng, fn in (("decode", ar, "generate_autoregressive"), ("round", whole, "generate"),
                          ("split", split, "generate")):
        getattr(eng, fn)(prompts, **kw)  # warm-up: graph capture
        t0 = time.perf_counter()
        gen = getattr(eng, fn)(prompts, **kw)
        wall = time.perf_counter() - t0
        out[name] = {"rounds": gen.metrics.rounds, "tau": gen.metrics.tau, "wall_s": wall}
        if name == "decode":
            out[name]["ms"] = per_round(gen, "target_forward_s")
        elif name == "round":
            out[name]["ms"] = per_round(gen, "step_s")
        else:
            out[name].update({s: per_round(gen, f"{s}_s") for s in
                              ("draft", "target_forward", "accept", "commit")})
        eng.graphs.clear()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--draft-layers", type=int, default=5)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--tau", nargs="*", default=[], metavar="NAME=TAU",
                    help="tau values to project (e.g. the benchmark pair's, the paper's)")
    ap.add_argument("--tau-json", default=None, help="a `dspark bench` results.json: the "
                    "dspark runs' tau at batch 1 per dataset and temperature are projected too")
    ap.add_argument("--fused-max-rows", type=int, default=None,
                    help="the runner's fused / cuBLAS crossover (default 64; 8 is where cuBLAS "
                    "wins at this shape: bench/RESULTS.md, ninth session)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    taus = {k: float(v) for k, v in (t.split("=", 1) for t in a.tau)}
    if a.tau_json:
        for r in json.load(open(a.tau_json))["runs"]:
            if r["method"] == "dspark" and r["batch"] == 1:
                taus[f"{r['dataset']} T={r['temperature']:g}"] = r["tau"]
    model, _ = random_qwen3_8b(a.layers)
    runner = ModelRunner(model, fused_max_rows=a.fused_max_rows)
    drafter = random_dspark_drafter(model, a.gamma, a.draft_layers, a.rank)
    report = {"device": torch.cuda.get_device_name(), "gamma": a.gamma, "layers": a.layers,
              "draft_layers": a.draft_layers, "kind": "projection from measured step costs",
              "batches": {}}
    for B in (int(b) for b in a.batches.split(",")):
        m = measure(runner, drafter, B, a.prompt_len, a.new_tokens)
        t_dec, t_round = m["decode"]["ms"], m["round"]["ms"]
        m["round_over_decode"] = t_round / t_dec
        m["projected_speedup"] = {k: tau * t_dec / t_round for k, tau in taus.items()}
        report["batches"][B] = m
        s = m["split"]
        print(f"B={B}: decode {t_dec:.3f} ms, round {t_round:.3f} ms ({t_round / t_dec:.2f}x); "
              f"split draft {s['draft']:.3f} / forward {s['target_forward']:.3f} / accept "
              f"{s['accept']:.3f} / commit {s['commit']:.3f} ms (one graph per stage)")
        for k, v in m["projected_speedup"].items():
            print(f"    PROJECTED speedup for tau {taus[k]:.2f} ({k}): {v:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
