"""`dspark bench`: speculative decoding against the autoregressive baseline, per dataset.

In one process and on one runner (the engine's code path, CUDA graphs on a GPU): for every
dataset (a DeepSpec-format jsonl, ``{"turns": [...]}``, its first turn as the prompt), every
temperature and batch size, the autoregressive baseline and each drafter generate the same
prompts. Reported per run: tau, per-position conditional acceptance, tokens/s, speedup over the
baseline, the fraction of requests whose greedy output is identical to the baseline's, and the
time per round split into draft / target forward / accept (the verify op) / commit / other.
Scheduled verification (``--schedule``) adds runs named ``drafter[mode]`` with their verified
drafts per request-round and wasted (rejected) share; every run reports per-user tokens/s
beside the aggregate. Results are a JSON file and PNG plots (acceptance by position, speedup by
dataset and batch, stacked time split, throughput against per-user speed) in ``--out``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, Sequence

import torch

from .metrics import Metrics

STAGE_FIELDS = ("draft_s", "schedule_s", "target_forward_s", "accept_s", "commit_s", "step_s",
                "other_s")


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
    # rounds over the mean request's rounds, pooled over the calls (batches) of the run
    out["tail"] = rounds / max(sum(m.rounds / m.tail for m in metrics if m.tail > 0), 1e-9)
    out["tokens_per_s"] = out["new_tokens"] / out["total_s"] if out["total_s"] else 0.0
    out["user_tokens_per_s"] = sum(m.user_tokens_per_s for m in metrics) / len(metrics)
    spec = [m for m in metrics if m.speculative]
    if spec:  # verify budgets: drafts verified per request-round, rejected ones, forward rows
        req = sum(m.request_rounds for m in spec)
        out["schedule"] = spec[0].schedule
        out["verified_per_request"] = sum(m.verified_per_request * m.request_rounds
                                          for m in spec) / max(1, req)
        out["wasted_tokens"] = sum(m.wasted_tokens for m in spec)
        out["wasted_fraction"] = out["wasted_tokens"] / max(1, sum(
            round(m.verified_per_request * m.request_rounds) for m in spec))
        out["forward_rows"] = sum(m.forward_rows for m in spec)
        for k in ("theta_predicted", "theta_achieved"):
            if all(getattr(m, k) is not None for m in spec):
                out[k] = sum(getattr(m, k) * m.rounds for m in spec) / max(1, rounds)
    if spec and (hist is None or hist.sum() == 0):  # continuous batching: no per-round log
        req = sum(m.request_rounds for m in spec)
        out["tau"] = sum(m.tau * m.request_rounds for m in spec) / max(1, req)
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


def _generate(engine, fn: str, prompts: list, batch: int, kw: dict, bar,
              serve: bool = False) -> tuple:
    """Every prompt through ``engine``: static batches of ``batch`` (``fn``), or with
    ``serve`` one continuous-batching run with ``batch`` slots (SpeculativeEngine.serve)."""
    if serve:
        seeds = [kw["seed"] + j for j in range(len(prompts))]
        g = engine.serve(prompts, batch, speculative=fn == "generate", **{**kw, "seed": seeds})
        if bar is not None:
            bar.update(len(prompts))
        return g.tokens, [g.metrics]
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
              stage_times: Optional[bool] = None, schedules: Sequence[str] = ("fixed",),
              sps=None, step_overhead: float = 0.0, serve_requests: int = 0,
              draft_temperature_scale: float = 1.0,
              on_run: Optional[Callable[[list], None]] = None) -> dict:
    """target: a ModelRunner; drafters: name -> Drafter; datasets: name -> token prompts.
    Returns {"runs": [...], "skipped": [...]} with one run per (dataset, temperature, batch,
    method). stage_times: split each round's time into draft / schedule / target forward /
    accept / commit (on GPU one graph per stage: slower rounds); default off on GPU (one graph
    per step: "step"). schedules: verify budgets run for every drafter ("fixed", "sync",
    "async", "threshold:X", each optionally "+ar": with the engine's ar_fallback; a scheduled
    method is named "drafter[mode]"; a drafter a mode cannot
    schedule is skipped and listed in ``skipped``); sps: their table; step_overhead: the seconds
    a step costs besides the verify forward, for their ranking (VerifyScheduler); on_run: called
    with the runs so far as each one finishes (a long sweep cut short keeps what it measured).
    serve_requests: N > 0 runs N requests (the prompt set cycled) through continuous batching
    with ``batch`` slots (SpeculativeEngine.serve: a finished request's slot takes the next
    prompt), every method the same way; warmed up by one untimed run of the same requests.
    draft_temperature_scale: the speculative engines' (SpeculativeEngine)."""
    from .engine import SpeculativeEngine
    from .schedule_step import check_step_overhead
    from .scheduler import parse_schedule, split_fallback
    for spec in schedules:  # bad specs are errors, not skips (engines' errors are skips below)
        parse_schedule(split_fallback(spec)[0])
    check_step_overhead(step_overhead)
    SpeculativeEngine.check_draft_temperature_scale(draft_temperature_scale)  # (not a skip)
    engines, skipped = {"autoregressive": SpeculativeEngine(target)}, []
    for n, d in drafters.items():
        for spec in schedules:
            name = n if spec == "fixed" else f"{n}[{spec}]"
            mode, fallback = split_fallback(spec)
            try:
                engines[name] = SpeculativeEngine(target, d, stage_times=stage_times,
                                                  schedule=mode, sps=sps,
                                                  step_overhead=step_overhead,
                                                  ar_fallback=fallback,
                                                  draft_temperature_scale=draft_temperature_scale)
            except ValueError as exc:  # e.g. a drafter without a confidence head
                skipped.append({"method": name, "reason": str(exc)})
    total = len(datasets) * len(temperatures) * len(batches) * len(engines)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total * max(serve_requests, max(len(p) for p in datasets.values())),
                   unit="prompt",
                   desc="bench")
    runs = []
    for dname, prompt_set in datasets.items():
        for temp in temperatures:
            for batch in batches:
                # a batch larger than the prompt set cycles it (concurrency sweeps)
                want = serve_requests or max(batch, len(prompt_set))
                prompts = (prompt_set * -(-want // len(prompt_set)))[:want]
                kw = dict(max_new_tokens=max_new_tokens, temperature=temp, seed=seed)
                base = None
                for name, eng in engines.items():
                    fn = "generate_autoregressive" if name == "autoregressive" else "generate"
                    # warm-up, untimed: the longest prompts first (the target's cache grows to
                    # the run's largest bucket and the step graphs are captured for it), then
                    # every prompt's prefill once (cuDNN builds a plan per new attention shape:
                    # measured on an H100, the first engine over a prompt set otherwise lost up
                    # to half its wall time to it, inflating every speedup over it)
                    if serve_requests:  # the refills' prefill graphs (rows x bucket) too
                        _generate(eng, fn, prompts, batch, kw, None, True)
                    else:
                        longest = sorted(prompts, key=len, reverse=True)[:batch]
                        _generate(eng, fn, longest, batch, kw, None)
                        _generate(eng, fn, prompts, batch, {**kw, "max_new_tokens": 2}, None)
                    t0 = time.perf_counter()
                    tokens, metrics = _generate(eng, fn, prompts, batch, kw, bar,
                                                bool(serve_requests))
                    wall = time.perf_counter() - t0
                    eng.graphs.clear()  # many engines, one GPU: only the running one's graphs
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    r = {"dataset": dname, "temperature": temp, "batch": batch, "method": name,
                         "prompts": len(prompts), "wall_s": wall, **_pool(metrics)}
                    if serve_requests:
                        r["serve"] = True  # continuous batching: batch = slots
                    if getattr(eng, "fallback", None) is not None:  # what its probe measured
                        r["fallback"] = next((c.to_dict() for k, c in eng.fallback.choices.items()
                                              if k[0] == batch and k[2] == (temp > 0)), None)
                    if base is None:
                        base = (tokens, r)
                    else:
                        r["speedup"] = r["tokens_per_s"] / base[1]["tokens_per_s"]
                        # per-user decode speed (rounds only): what a user waits for once the
                        # prompt is in, and blind to prefill cost
                        r["user_speedup"] = r["user_tokens_per_s"] / base[1]["user_tokens_per_s"]
                        if temp == 0:
                            same = [a == b for a, b in zip(tokens, base[0])]
                            r["greedy_identical_fraction"] = sum(same) / len(same)
                    runs.append(r)
                    if on_run is not None:
                        on_run(runs)
    if bar is not None:
        bar.close()
    return {"runs": runs, "skipped": skipped}


def format_table(report: dict) -> str:
    """One table per dataset: a row per (temperature, batch, method)."""
    lines = []
    runs = report["runs"]
    for dname in dict.fromkeys(r["dataset"] for r in runs):
        lines.append(f"== {dname}")
        lines.append(f"{'T':>4} {'batch':>5} {'method':<22} {'tau':>5} {'tok/s':>8} "
                     f"{'user':>7} {'speedup':>7} {'u-spd':>6} {'identical':>9} {'verify':>6} "
                     f"{'waste':>5}  "
                     f"ms/round: draft sched fwd accept commit step other | per-position")
        for r in (r for r in runs if r["dataset"] == dname):
            rm = r["round_ms"]
            pos = " ".join(f"{p:.2f}" for p in r.get("position_acceptance", []))
            ident = r.get("greedy_identical_fraction")
            ver = f"{r['verified_per_request']:.2f}" if "verified_per_request" in r else ""
            waste = f"{r['wasted_fraction']:.0%}" if "wasted_fraction" in r else ""
            lines.append(
                f"{r['temperature']:>4g} {r['batch']:>5} {r['method']:<22} "
                f"{r.get('tau', 1.0):>5.2f} {r['tokens_per_s']:>8.1f} "
                f"{r['user_tokens_per_s']:>7.1f} {r.get('speedup', 1.0):>6.2f}x "
                f"{r.get('user_speedup', 1.0):>5.2f}x "
                f"{'' if ident is None else f'{ident:.0%}':>9} {ver:>6} {waste:>5}  "
                f"{rm['draft']:.3f} {rm['schedule']:.3f} {rm['target_forward']:.3f} "
                f"{rm['accept']:.3f} {rm['commit']:.3f} {rm['step']:.3f} {rm['other']:.3f}  "
                f"| {pos}")
    for s in report.get("skipped", []):
        lines.append(f"skipped {s['method']}: {s['reason']}")
    return "\n".join(lines)


def write_plots(report: dict, out_dir: str) -> list:
    """acceptance_by_position.png, speedup.png, time_split.png, throughput_vs_user.png in
    ``out_dir``; returns paths."""
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
    for stage in ("draft", "schedule", "target_forward", "accept", "commit", "step", "other"):
        vals = [r["round_ms"][stage] for r in runs]
        ax.bar(range(len(runs)), vals, bottom=bottom, label=stage.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(runs)), [f"{r['method']} {r['dataset']} T={r['temperature']:g} "
                                     f"b={r['batch']}" for r in runs], fontsize=6, rotation=90)
    ax.set(ylabel="ms per round (decode step)", title="Time split per round")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, "time_split.png"))

    # aggregate throughput against per-user speed across batch sizes (the paper's Fig. 7)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["method"], r["dataset"], r["temperature"]) for r in runs):
        pts = sorted((r["batch"], r["user_tokens_per_s"], r["tokens_per_s"]) for r in runs
                     if (r["method"], r["dataset"], r["temperature"]) == key)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o",
                label=f"{key[0]} {key[1]} T={key[2]:g}")
        for b, x, y in pts:
            ax.annotate(str(b), (x, y), fontsize=5)
    ax.set(xlabel="per-user tokens/s", ylabel="aggregate tokens/s",
           title="Throughput vs per-user speed (points: batch size)")
    ax.legend(fontsize=6)
    paths.append(_save(fig, out_dir, "throughput_vs_user.png"))
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
