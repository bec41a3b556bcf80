"""`dspark bench`: speculative decoding against the autoregressive baseline, per dataset.

In one process and on one runner (the engine's code path, CUDA graphs on a GPU): for every
dataset (a DeepSpec-format jsonl, ``{"turns": [...]}``, its first turn as the prompt), every
temperature and batch size, the autoregressive baseline and each drafter generate the same
prompts. Reported per run: tau, per-position conditional acceptance, tokens/s, speedup over the
baseline, the fraction of requests whose greedy output is identical to the baseline's, and the
time per round split into draft / target forward / accept (the verify op) / commit / other.
Results are a JSON file and PNG plots (acceptance by position, speedup by dataset and batch,
stacked time split) in ``--out``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import torch

from .metrics import Metrics

STAGE_FIELDS = ("draft_s", "target_forward_s", "accept_s", "commit_s", "step_s", "other_s")


def load_prompts(path: str, tokenizer, limit: Optional[int], max_tokens: int) -> list:
    """First turn of each record of a jsonl prompt set, tokenized (its last ``max_tokens``)."""
    from .train.data import read_records
    texts = [r["turns"][0] for r in read_records([path]) if r.get("turns")]
    if not texts:
        raise ValueError(f"{path!r} holds no prompts (expected jsonl lines with a 'turns' list)")
    texts = texts[:limit] if limit else texts
    return [ids[-max_tokens:] or [0] for ids in (e.ids for e in tokenizer.encode_batch(texts))]


def _pool(metrics: Sequence[Metrics]) -> dict:
    """Totals over the calls of one run."""
    hist = None
    rounds = sum(m.rounds for m in metrics)
    out = {k: sum(getattr(m, k) for m in metrics) for k in
           ("new_tokens", "total_s", "prefill_s") + STAGE_FIELDS}
    for m in metrics:
        if m.speculative:
            h = torch.tensor(m.accept_hist, dtype=torch.float64)
            hist = h if hist is None else hist + h
    out["rounds"] = rounds
    out["tokens_per_s"] = out["new_tokens"] / out["total_s"] if out["total_s"] else 0.0
    if hist is not None and hist.sum() > 0:
        k = torch.arange(len(hist), dtype=torch.float64)
        reached = hist.flip(0).cumsum(0).flip(0)
        out["tau"] = float(((k + 1) * hist).sum() / hist.sum())
        out["position_acceptance"] = [float(reached[i] / reached[i - 1]) if reached[i - 1]
                                      else 0.0 for i in range(1, len(hist))]
        out["accept_hist"] = [int(x) for x in hist.tolist()]
    per_round = 1e3 / max(1, rounds)
    out["round_ms"] = {k[:-2]: out[k] * per_round for k in STAGE_FIELDS}
    return out


def _generate(engine, fn: str, prompts: list, batch: int, kw: dict, bar) -> tuple:
    tokens, metrics = [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        seeds = [kw["seed"] + i + j for j in range(len(chunk))]
        g = getattr(engine, fn)(chunk, **{**kw, "seed": seeds})
        tokens += g.tokens
        metrics.append(g.metrics)
        if bar is not None:
            bar.update(len(chunk))
    return tokens, metrics


def run_bench(target, drafters: dict, datasets: dict, *, temperatures=(0.0,), batches=(1,),
              max_new_tokens: int = 128, seed: int = 0, progress: bool = False,
              stage_times: Optional[bool] = None) -> dict:
    """target: a ModelRunner; drafters: name -> Drafter; datasets: name -> token prompts.
    Returns {"runs": [...]} with one entry per (dataset, temperature, batch, method).
    stage_times: split each round's time into draft / target forward / accept / commit (on GPU
    one graph per stage: slower rounds); default off on GPU (one graph per step: "step")."""
    from .engine import SpeculativeEngine
    engines = {"autoregressive": SpeculativeEngine(target)}
    engines.update({n: SpeculativeEngine(target, d, stage_times=stage_times)
                    for n, d in drafters.items()})
    total = len(datasets) * len(temperatures) * len(batches) * len(engines)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total * max(len(p) for p in datasets.values()), unit="prompt",
                   desc="bench")
    runs = []
    for dname, prompts in datasets.items():
        for temp in temperatures:
            for batch in batches:
                kw = dict(max_new_tokens=max_new_tokens, temperature=temp, seed=seed)
                base = None
                for name, eng in engines.items():
                    fn = "generate_autoregressive" if name == "autoregressive" else "generate"
                    _generate(eng, fn, prompts[:batch], batch, kw, None)  # warm-up (graphs)
                    t0 = time.perf_counter()
                    tokens, metrics = _generate(eng, fn, prompts, batch, kw, bar)
                    wall = time.perf_counter() - t0
                    r = {"dataset": dname, "temperature": temp, "batch": batch, "method": name,
                         "prompts": len(prompts), "wall_s": wall, **_pool(metrics)}
                    if base is None:
                        base = (tokens, r)
                    else:
                        r["speedup"] = r["tokens_per_s"] / base[1]["tokens_per_s"]
                        if temp == 0:
                            same = [a == b for a, b in zip(tokens, base[0])]
                            r["greedy_identical_fraction"] = sum(same) / len(same)
                    runs.append(r)
    if bar is not None:
        bar.close()
    return {"runs": runs}


def format_table(report: dict) -> str:
    """One table per dataset: a row per (temperature, batch, method)."""
    lines = []
    runs = report["runs"]
    for dname in dict.fromkeys(r["dataset"] for r in runs):
        lines.append(f"== {dname}")
        lines.append(f"{'T':>4} {'batch':>5} {'method':<16} {'tau':>5} {'tok/s':>8} "
                     f"{'speedup':>7} {'identical':>9}  ms/round: draft fwd accept commit step "
                     f"other | per-position")
        for r in (r for r in runs if r["dataset"] == dname):
            rm = r["round_ms"]
            pos = " ".join(f"{p:.2f}" for p in r.get("position_acceptance", []))
            ident = r.get("greedy_identical_fraction")
            lines.append(
                f"{r['temperature']:>4g} {r['batch']:>5} {r['method']:<16} "
                f"{r.get('tau', 1.0):>5.2f} {r['tokens_per_s']:>8.1f} "
                f"{r.get('speedup', 1.0):>6.2f}x {'' if ident is None else f'{ident:.0%}':>9}  "
                f"{rm['draft']:.3f} {rm['target_forward']:.3f} {rm['accept']:.3f} "
                f"{rm['commit']:.3f} {rm['step']:.3f} {rm['other']:.3f}  | {pos}")
    return "\n".join(lines)


def write_plots(report: dict, out_dir: str) -> list:
    """acceptance_by_position.png, speedup.png, time_split.png in ``out_dir``; returns paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    spec = [r for r in runs if r["method"] != "autoregressive"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in spec:
        pos = r.get("position_acceptance")
        if pos:
            ax.plot(range(1, len(pos) + 1), pos, marker="o",
                    label=f"{r['method']} {r['dataset']} T={r['temperature']:g} b={r['batch']}")
    ax.set(xlabel="draft position k", ylabel="P(accept k | accepted k-1)", ylim=(0, 1.05),
           title="Conditional acceptance by position")
    ax.legend(fontsize=6)
    paths.append(_save(fig, out_dir, "acceptance_by_position.png"))

    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(spec)), 4.5))
    labels = [f"{r['method']} {r['dataset']} T={r['temperature']:g} b={r['batch']}"
              for r in spec]
    ax.bar(range(len(spec)), [r.get("speedup", 0.0) for r in spec])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(spec)), labels, fontsize=6, rotation=90)
    ax.set(ylabel="speedup over autoregressive", title="Speedup by dataset and batch")
    paths.append(_save(fig, out_dir, "speedup.png"))

    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(runs)), 4.5))
    bottom = [0.0] * len(runs)
    for stage in ("draft", "target_forward", "accept", "commit", "step", "other"):
        vals = [r["round_ms"][stage] for r in runs]
        ax.bar(range(len(runs)), vals, bottom=bottom, label=stage.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(runs)), [f"{r['method']} {r['dataset']} T={r['temperature']:g} "
                                     f"b={r['batch']}" for r in runs], fontsize=6, rotation=90)
    ax.set(ylabel="ms per round (decode step)", title="Time split per round")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "time_split.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def save_report(report: dict, out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return [path] + write_plots(report, out_dir)
