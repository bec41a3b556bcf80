"""`dspark demo`: a self-contained, offline tour on this machine (GPU if there is one, else CPU).

1. The `verify` op on a hand-made batch (a greedy chain and a sampled chain).
2. The shipped demo pair (``dspark/demo_models``): a 2.0 M-parameter Qwen3-architecture target
   trained by ``dspark train-target`` on Python's stdlib sources and docs, and a DSpark drafter
   trained for it by ``dspark train-draft`` (recipe: ``demo_models/README.md``). It writes text;
   greedy speculative output is checked token for token against autoregressive output.
3. The other drafters on a seeded random Qwen3-shaped target: a correlated draft model (the
   target with 5% weight noise; chain and tree) and n-gram prompt lookup.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import dspark
from dspark.drafters import DraftModelDrafter, NgramDrafter, load_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import ModelConfig, Transformer, load_model, load_tokenizer
from dspark.models.random import random_transformer

DEMO_MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_models")
DEMO_PROMPTS = ["def read_config(path):\n", "class Stack:\n    \"\"\"", "The os module provides"]


def _random_qwen3(vocab: int, seed: int, noise: float = 0.0, device="cpu") -> Transformer:
    cfg = ModelConfig.from_dict(dict(  # the config.json fields of a Qwen3 checkpoint
        model_type="qwen3", vocab_size=vocab, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=512))
    return random_transformer(cfg, seed, noise).to(device)


def _ops_tour(device: str) -> None:
    V = 6
    # Request 0: greedy chain of 2 drafts; request 1: sampled chain of 1 draft with its q.
    logits = torch.tensor([[0, 4, 0, 0, 0, 0], [0, 0, 4, 0, 0, 0], [4, 0, 0, 0, 0, 0],
                           [1, 2, 0, 0, 0, 0], [0, 0, 0, 3, 0, 0]], dtype=torch.float32)
    offsets, parents = dspark.ops.chain_layout([2, 1])
    tokens = torch.tensor([0, 1, 5, 0, 1])  # request 0 drafts 1 then 5 (5 is wrong)
    q = torch.full((5, V), 1.0 / V, dtype=torch.float64)
    res = dspark.ops.verify(*(t.to(device) for t in (logits, offsets, tokens, parents, q)),
                            dspark.ops.sampling_tensors(2, [0.0, 1.0], device=device),
                            seeds=torch.tensor([1, 2], device=device),
                            positions=torch.tensor([10, 10], device=device), max_nodes=3)
    print("verify: request 0 greedy, drafts [1, 5] (5 is wrong: the target wants 2);"
          " request 1 T=1, draft [1] with uniform q:")
    print("  out_tokens  ", res.out_tokens.tolist(), "(accepted drafts, then bonus/correction)")
    print("  accept_count", res.accept_count.tolist())


def load_demo_pair(device="cpu"):
    """(target Transformer, tokenizer, DSpark drafter) of the shipped demo pair (fp32)."""
    target_dir = os.path.join(DEMO_MODELS, "target")
    if not os.path.isfile(os.path.join(target_dir, "config.json")):
        raise FileNotFoundError(f"the demo pair is missing from {DEMO_MODELS}: reinstall dspark")
    target = load_model(target_dir, device, torch.float32)
    return target, load_tokenizer(target_dir), load_drafter(os.path.join(DEMO_MODELS, "dspark"),
                                                            target)


def _trained_pair_tour(device: str, max_new_tokens: int) -> bool:
    target, tok, drafter = load_demo_pair(device)
    c = target.config
    print(f"\nshipped pair (dspark/demo_models): Qwen3-architecture target, {c.num_layers} layers"
          f" x {c.hidden_size}, trained on Python's stdlib; DSpark drafter (gamma {drafter.gamma})")
    timed = {}
    for name, eng in (("autoregressive", SpeculativeEngine(target, tokenizer=tok)),
                      ("dspark", SpeculativeEngine(target, drafter, tokenizer=tok))):
        fn = eng.generate_autoregressive if name == "autoregressive" else eng.generate
        run = lambda: fn(DEMO_PROMPTS, max_new_tokens=max_new_tokens, temperature=0.0)  # noqa
        run()  # warm-up at the timed shapes (CUDA-graph capture on a GPU)
        t0 = time.perf_counter()
        timed[name] = (run(), time.perf_counter() - t0)
    (ar, t_ar), (sp, t_sp) = timed["autoregressive"], timed["dspark"]
    same = sp.tokens == ar.tokens
    m = sp.metrics
    print(f"greedy, {len(DEMO_PROMPTS)} prompts x {max_new_tokens} tokens: identical to "
          f"autoregressive: {same}  tau={m.tau:.2f}  per-position acceptance="
          f"{[round(a, 2) for a in m.position_acceptance]}  {t_sp:.2f}s (autoregressive "
          f"{t_ar:.2f}s)")
    print(f"  {DEMO_PROMPTS[0]!r} -> {sp.text[0]!r}")
    out = SpeculativeEngine(target, drafter, tokenizer=tok).generate(
        DEMO_PROMPTS, max_new_tokens=max_new_tokens, temperature=1.0, seed=3)
    print(f"sampled (T=1, exact rejection sampling): tau={out.metrics.tau:.2f}")
    print(f"  {DEMO_PROMPTS[2]!r} -> {out.text[2]!r}")
    return same


def run(args: argparse.Namespace) -> int:
    from .cli_common import cli_error, resolve_device
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        return cli_error("demo", exc)
    print("dspark", json.dumps(dspark.build_info()), f"-> running on {device}")
    _ops_tour(device)
    ok = _trained_pair_tour(device, args.max_new_tokens)
    print("\nother drafters, on a seeded random Qwen3-shaped target:")
    V = 256
    target = _random_qwen3(V, seed=7, device=device)
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4], [10, 20, 30], [5, 6, 5, 6, 5, 6]]
    base = SpeculativeEngine(target)
    t0 = time.perf_counter()
    ar = base.generate_autoregressive(prompts, max_new_tokens=args.max_new_tokens, temperature=0.0)
    t_ar = time.perf_counter() - t0
    print(f"\nautoregressive (greedy): {t_ar:.2f}s, {ar.metrics.new_tokens} tokens")
    def noisy_target():  # the target with 5% weight noise: a correlated draft model
        return _random_qwen3(V, 7, 0.05, device)
    drafters = {
        "draft model (target + 5% noise), chain": DraftModelDrafter(noisy_target(), gamma=4),
        "draft model, tree (top-2 children)": DraftModelDrafter(noisy_target(), gamma=4,
                                                                tree_topk=2),
        "n-gram prompt lookup": NgramDrafter(gamma=4, max_ngram=3),
    }
    for name, drafter in drafters.items():
        eng = SpeculativeEngine(target, drafter)
        t0 = time.perf_counter()
        out = eng.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=0.0)
        same = out.tokens == ar.tokens
        ok &= same
        m = out.metrics
        print(f"{name:40s} identical to autoregressive: {same}  tau={m.tau:.2f}  "
              f"acceptance={m.acceptance_rate:.2f}  rounds={m.rounds}  "
              f"{time.perf_counter() - t0:.2f}s")
    sampled = SpeculativeEngine(target, DraftModelDrafter(noisy_target(), gamma=4))
    out = sampled.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=3)
    print(f"sampled (T=1, exact rejection sampling): tau={out.metrics.tau:.2f}  first request: "
          f"{out.tokens[0][:12]}")
    return 0 if ok else 1


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline tour of the ops and the speculative engine")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=run)
