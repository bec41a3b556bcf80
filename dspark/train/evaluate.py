"""Measure a drafter with the engine: tau (accepted tokens per round, bonus included), per-position
conditional acceptance, tokens/s against the autoregressive baseline on the same runner."""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch


def prompts_from(paths: Sequence[str], tokenizer, limit: Optional[int] = None,
                 prompt_tokens: int = 256, seed: int = 0) -> list:
    """Token prompts from a dspark data file (*.safetensors: each sample's prompt part) or
    prompt files (:func:`dspark.train.data.read_prompt_texts`: jsonl records, else one prompt
    per line), each cut to its last ``prompt_tokens`` tokens."""
    import random

    from .data import load_samples, read_prompt_texts
    prompts = []
    rest = []
    for p in paths:
        if p.endswith(".safetensors"):
            prompts += [s.ids[:max(1, s.prompt_len)] for s in load_samples(p)]
        else:
            rest.append(p)
    if rest:
        if tokenizer is None:
            raise ValueError("text prompts need the target's tokenizer.json")
        enc = tokenizer.encode_batch(read_prompt_texts(rest))
        prompts += [e.ids[-prompt_tokens:] for e in enc if e.ids]
    if limit is not None and len(prompts) > limit:
        rng = random.Random(seed)
        prompts = rng.sample(prompts, limit)
    if not prompts:
        raise ValueError(f"no prompts in {list(paths)}")
    return prompts


def _pool(metrics: list, gamma: int) -> dict:
    hist = torch.zeros(gamma + 1, dtype=torch.float64)
    for m in metrics:
        h = torch.tensor(m.accept_hist, dtype=torch.float64)
        hist[:len(h)] += h
    n = float(hist.sum())
    reached = hist.flip(0).cumsum(0).flip(0)
    k = torch.arange(gamma + 1, dtype=torch.float64)
    return {"request_rounds": int(n),
            "tau": float(((k + 1) * hist).sum() / n) if n else 1.0,
            "acceptance_rate": float((k * hist).sum() / (n * gamma)) if n and gamma else 0.0,
            "position_acceptance": [float(reached[i] / reached[i - 1]) if reached[i - 1] else 0.0
                                    for i in range(1, gamma + 1)],
            "accept_hist": [int(x) for x in hist.tolist()]}


@torch.inference_mode()
def evaluate(engine, prompts: Sequence, temperature: float = 0.0, max_new_tokens: int = 128,
             batch_size: int = 8, seed: int = 0, baseline: bool = True,
             reference: Optional[dict] = None) -> dict:
    """Speculative decoding of ``prompts`` with the engine's drafter (and, with ``baseline``,
    the autoregressive run): pooled tau / acceptance, tokens/s, speedup, greedy equality.
    ``reference``: a dict shared across calls on the same prompts and target; the baseline run
    stores its tokens there, and later calls without a baseline compare against them (T = 0)."""
    gamma = engine.drafter.gamma
    out = {"prompts": len(prompts), "temperature": temperature, "gamma": gamma,
           "max_new_tokens": max_new_tokens}
    runs = [("speculative", engine.generate)]
    if baseline:
        runs.append(("autoregressive", engine.generate_autoregressive))
    tokens = {}
    for name, fn in runs:
        ms, toks, t0 = [], [], time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i:i + batch_size])
            gen = fn(chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                     seed=[seed + i + j for j in range(len(chunk))])
            ms.append(gen.metrics)
            toks += gen.tokens
        wall = time.perf_counter() - t0
        n_new = sum(len(t) for t in toks)
        tokens[name] = toks
        out[name] = {"new_tokens": n_new, "seconds": wall,
                     "tokens_per_s": n_new / wall if wall > 0 else 0.0}
        if name == "speculative":
            out[name].update(_pool(ms, gamma))
    if baseline:
        sp, ar = out["speculative"]["tokens_per_s"], out["autoregressive"]["tokens_per_s"]
        out["speedup"] = sp / ar if ar else None
        if reference is not None:
            reference["tokens"] = tokens["autoregressive"]
    ar_tokens = tokens.get("autoregressive", (reference or {}).get("tokens"))
    if temperature == 0 and ar_tokens is not None:
        out["greedy_identical"] = tokens["speculative"] == ar_tokens
    return out


def format_eval(name: str, r: dict) -> str:
    s = r["speculative"]
    pos = " ".join(f"{p:.2f}" for p in s["position_acceptance"])
    line = (f"{name}: tau {s['tau']:.3f} | accept {s['acceptance_rate']:.1%} | per-position "
            f"[{pos}] | {s['tokens_per_s']:.1f} tok/s")
    if "speedup" in r and r["speedup"] is not None:
        line += f" | autoregressive {r['autoregressive']['tokens_per_s']:.1f} tok/s | speedup " \
                f"{r['speedup']:.2f}x"
    if "greedy_identical" in r:
        line += f" | greedy identical: {r['greedy_identical']}"
    return line
