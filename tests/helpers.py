"""Shared test helpers: input factories of the ops (a :class:`Batch` holds every argument of
``torch.ops.dspark.verify`` in schema order), tiny random HF checkpoints, exact-distribution and
chi-square helpers for the engine's statistical tests, and a SpecState builder.

Factories build their random inputs from an explicit ``torch.Generator`` so every test is
deterministic. Test modules import from here, never from each other.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch

import dspark
from dspark import reference
from dspark.engine import SpeculativeEngine
from dspark.models import ModelRunner
from dspark.ops import sampling_tensors
from dspark.state import SpecState

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SAMPLED_TEMPERATURES = (0.6, 1.0, 1.4)


@dataclasses.dataclass
class Batch:
    target_logits: torch.Tensor
    node_offsets: torch.Tensor
    draft_tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: Optional[torch.Tensor]
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: Optional[torch.Tensor]
    positions: Optional[torch.Tensor]
    uniforms: Optional[torch.Tensor]
    max_nodes: int

    def args(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device)
        return Batch(**moved)

    def replace(self, **kw) -> "Batch":
        return dataclasses.replace(self, **kw)

    @property
    def num_requests(self) -> int:
        return self.node_offsets.numel() - 1

    def sizes(self) -> list[int]:
        off = self.node_offsets.tolist()
        return [b - a for a, b in zip(off, off[1:])]


def run_kernel(batch: Batch, device="cpu") -> tuple[torch.Tensor, ...]:
    """torch.ops.dspark.verify on ``device``; outputs returned on CPU."""
    out = torch.ops.dspark.verify(*batch.to(device).args())
    return tuple(t.cpu() for t in out)


def run_reference(batch: Batch) -> tuple[torch.Tensor, ...]:
    return reference.verify(*batch.to("cpu").args())


def assert_equal_outputs(got, want, what=""):
    names = ("out_tokens", "accept_count", "accept_nodes")
    for name, g, w in zip(names, got, want):
        assert g.dtype == torch.int64 and g.shape == w.shape, (what, name, g.dtype, g.shape)
        assert torch.equal(g, w), \
            f"{what} {name} differs:\nkernel    {g.tolist()}\nreference {w.tolist()}"


# ---- building blocks -------------------------------------------------------------------------
def random_logits(rows: int, V: int, gen: torch.Generator, scale: float = 2.0,
                  mask_frac: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Gaussian logits; optionally a fraction of entries masked to -inf (never a whole row)."""
    w = torch.randn(rows, V, generator=gen) * scale
    if mask_frac > 0.0:
        mask = torch.rand(rows, V, generator=gen) < mask_frac
        keep = torch.randint(0, V, (rows,), generator=gen)
        mask[torch.arange(rows), keep] = False
        w[mask] = -float("inf")
    return w.to(dtype)


def random_parents(n: int, gen: torch.Generator, layout: str) -> list[int]:
    """Local parent indices of one request with n nodes (node 0 = root)."""
    if layout == "chain":
        return list(range(-1, n - 1))
    par = [-1]
    for j in range(1, n):
        # Favour shallow nodes so that nodes commonly get several children.
        hi = j if torch.rand((), generator=gen) < 0.5 else max(1, j // 2)
        par.append(int(torch.randint(0, hi, (), generator=gen)))
    return par


def softmax64(x: torch.Tensor, temperature: float) -> torch.Tensor:
    x = x.double()
    return torch.softmax(x / max(temperature, 0.3), dim=-1)


def make_batch(draft_lengths: Sequence[int], V: int, gen: torch.Generator, *,
               layout: str = "chain", dtype=torch.float32, q_dtype=None,
               randomness: str = "keyed", temperature="sampled", top_k=0, top_p=1.0,
               scale: float = 2.0, mask_frac: float = 0.0, draft_noise: float = 0.3,
               max_nodes: Optional[int] = None) -> Batch:
    """A packed batch of chains or trees.

    temperature: "greedy", "sampled", "mixed" (per-request random greedy or sampled) or a float.
    top_k / top_p: a number applied to every request, or "random" (per-request mix of on/off).
    q_dtype: None (deterministic drafts, draft_probs=None) or torch.float32/float64.
    Drafts are drawn the way a drafter would: with draft_probs, node j's token is sampled from
    q_j = softmax((parent's target logits + noise) / T) (siblings share q: iid tree children);
    without, tokens are mostly the parent's argmax (greedy) or a sample from p, sometimes random.
    """
    R = len(draft_lengths)
    sizes = [int(g) + 1 for g in draft_lengths]
    N = sum(sizes)
    offsets = torch.zeros(R + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(sizes), 0)

    temps = []
    for _ in range(R):
        if temperature == "greedy":
            temps.append(0.0)
        elif temperature in ("sampled", "mixed"):
            choices = SAMPLED_TEMPERATURES + ((0.0,) if temperature == "mixed" else ())
            temps.append(choices[int(torch.randint(0, len(choices), (), generator=gen))])
        else:
            temps.append(float(temperature))

    def per_request(value, choices):
        if value != "random":
            return [value] * R
        return [choices[int(torch.randint(0, len(choices), (), generator=gen))] for _ in range(R)]

    ks = per_request(top_k, (0, 0, 1, 5, max(1, V // 2)))
    ps = per_request(top_p, (1.0, 1.0, 0.9, 0.5))

    logits32 = random_logits(N, V, gen, scale, mask_frac, torch.float32)
    logits = logits32.to(dtype)
    parents, tokens = [], []
    q = torch.zeros(N, V, dtype=torch.float64) if q_dtype is not None else None
    for r in range(R):
        o, n = int(offsets[r]), sizes[r]
        par = random_parents(n, gen, layout)
        parents += par
        tokens.append(int(torch.randint(-1, V, (), generator=gen)))  # root token: ignored
        sibling_q = {}
        for j in range(1, n):
            prow = logits[o + par[j]].float()
            if q is not None:
                if par[j] not in sibling_q:
                    noise = torch.randn(V, generator=gen) * draft_noise
                    base = torch.where(torch.isfinite(prow), prow, torch.zeros_like(prow))
                    sibling_q[par[j]] = softmax64(base + noise, temps[r])
                q[o + j] = sibling_q[par[j]]
                tokens.append(int(torch.multinomial(q[o + j], 1, generator=gen)))
            else:
                coin = float(torch.rand((), generator=gen))
                if coin < 0.25:
                    tokens.append(int(torch.randint(0, V, (), generator=gen)))
                elif temps[r] == 0.0 or coin < 0.5:
                    tokens.append(int(torch.argmax(prow)))
                else:
                    p = softmax64(prow, temps[r])
                    tokens.append(int(torch.multinomial(p, 1, generator=gen)))

    seeds = positions = uniforms = None
    if randomness == "keyed":
        seeds = torch.randint(-(2**63), 2**63 - 1, (R,), generator=gen, dtype=torch.int64)
        positions = torch.randint(0, 1 << 40, (R,), generator=gen, dtype=torch.int64)
    elif randomness == "uniforms":
        uniforms = torch.rand(N, 2, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(randomness)
    params = dspark.ops.sampling_tensors(R, temps, ks, ps)
    return Batch(logits, offsets, torch.tensor(tokens, dtype=torch.int64),
                 torch.tensor(parents, dtype=torch.int64),
                 None if q is None else q.to(q_dtype), params.temperature, params.top_k,
                 params.top_p, seeds, positions, uniforms,
                 max_nodes if max_nodes is not None else max(sizes))


def random_draft_lengths(R: int, gamma: int, gen: torch.Generator) -> list[int]:
    """Ragged draft lengths in [0, gamma]; with R >= 2 one request has 0 and one has gamma."""
    lengths = torch.randint(0, gamma + 1, (R,), generator=gen).tolist()
    if R >= 2:
        lengths[0], lengths[-1] = gamma, 0
    elif R == 1:
        lengths[0] = gamma
    return lengths


def permute_requests(batch: Batch, perm: Sequence[int]) -> Batch:
    """The same requests in another order (packed rows moved with their requests)."""
    off = batch.node_offsets.tolist()
    rows = torch.cat([torch.arange(off[r], off[r + 1]) for r in perm])
    sizes = torch.tensor([off[r + 1] - off[r] for r in perm])
    new_off = torch.zeros_like(batch.node_offsets)
    new_off[1:] = torch.cumsum(sizes, 0)
    p = torch.as_tensor(list(perm))
    pick = lambda t: None if t is None else t[p]  # noqa: E731
    return batch.replace(
        target_logits=batch.target_logits[rows], node_offsets=new_off,
        draft_tokens=batch.draft_tokens[rows], parents=batch.parents[rows],
        draft_probs=None if batch.draft_probs is None else batch.draft_probs[rows],
        temperature=batch.temperature[p], top_k=batch.top_k[p], top_p=batch.top_p[p],
        seeds=pick(batch.seeds), positions=pick(batch.positions),
        uniforms=None if batch.uniforms is None else batch.uniforms[rows])


def sample_args(logits: torch.Tensor, gen: torch.Generator, *, temperature="sampled", top_k=0,
                top_p=1.0, randomness="keyed"):
    """Arguments of torch.ops.dspark.sample for the rows of ``logits`` (return_probs excluded)."""
    R = logits.shape[0]
    temps = [0.0 if temperature == "greedy" else
             SAMPLED_TEMPERATURES[int(torch.randint(0, 3, (), generator=gen))]
             if temperature == "sampled" else float(temperature) for _ in range(R)]
    params = dspark.ops.sampling_tensors(R, temps, top_k, top_p)
    seeds = positions = uniforms = None
    if randomness == "keyed":
        seeds = torch.randint(-(2**63), 2**63 - 1, (R,), generator=gen, dtype=torch.int64)
        positions = torch.randint(0, 1 << 40, (R,), generator=gen, dtype=torch.int64)
    else:
        uniforms = torch.rand(R, generator=gen, dtype=torch.float64)
    return (logits, *params, seeds, positions, uniforms)


def manual_batch(logits, tokens, parents=None, *, draft_probs=None, temperature=1.0, top_k=0,
                 top_p=1.0, accept_u=0.5, sample_u=0.5, offsets=None, max_nodes=None) -> Batch:
    """A hand-made batch with caller uniforms (default: one request; chain unless parents given).

    accept_u / sample_u: a number for every node or a per-node list (node = packed row).
    """
    logits = torch.as_tensor(logits, dtype=torch.float32)
    N = logits.shape[0]
    offsets = torch.as_tensor([0, N] if offsets is None else offsets, dtype=torch.int64)
    R = offsets.numel() - 1
    if parents is None:
        parents = torch.cat([torch.arange(-1, int(b - a) - 1)
                             for a, b in zip(offsets[:-1], offsets[1:])])
    u = torch.empty(N, 2, dtype=torch.float64)
    u[:, 0] = torch.as_tensor(accept_u, dtype=torch.float64)
    u[:, 1] = torch.as_tensor(sample_u, dtype=torch.float64)
    params = dspark.ops.sampling_tensors(R, temperature, top_k, top_p)
    q = None if draft_probs is None else torch.as_tensor(draft_probs, dtype=torch.float64)
    sizes = (offsets[1:] - offsets[:-1]).tolist()
    return Batch(logits, offsets, torch.as_tensor(tokens, dtype=torch.int64),
                 torch.as_tensor(parents, dtype=torch.int64), q, *params, None, None, u,
                 max_nodes if max_nodes is not None else max(sizes))


def keyed_uniforms(batch: Batch) -> torch.Tensor:
    """The [N, 2] uniforms keyed randomness (seeds, positions) draws, via the reference hash."""
    off = batch.node_offsets.tolist()
    u = torch.empty(off[-1], 2, dtype=torch.float64)
    for r in range(len(off) - 1):
        s, p = int(batch.seeds[r]), int(batch.positions[r])
        for j in range(off[r + 1] - off[r]):
            for purpose in (0, 1):
                u[off[r] + j, purpose] = reference.keyed_uniform(s, p, j, purpose)
    return u


ONE_MINUS = 1.0 - 2.0**-53  # the largest double below 1: the least favourable accept coin


# ---- tiny random Hugging Face checkpoints ----------------------------------------------------
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
}


def make_checkpoint(path, arch="llama", vocab=97, hidden=64, layers=3, heads=4, kv_heads=2,
                    inter=96, seed=0, init=0.02, shard=None, tokenizer=True, perturb=0.0, **extra):
    """Save a random HF model (safetensors) + a word-level tokenizer.json to ``path``.
    perturb > 0: the same model (same seed) with relative Gaussian noise on every weight, i.e. a
    correlated draft model for the target made with perturb = 0."""
    import transformers
    cfg_name, model_name, arch_extra = ARCHS[arch]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=256, initializer_range=init, eos_token_id=vocab - 1,
              bos_token_id=0)
    kw.update(arch_extra)
    kw.update(extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw)).eval()
    with torch.no_grad():  # make the random model opinionated: bigger logits, varied norms
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters() if perturb else ():
            p.add_(torch.randn(p.shape, generator=gen) * perturb * p.std())
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        words = ["<s>"] + [f"w{i}" for i in range(1, vocab - 1)] + ["</s>"]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w1"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(os.path.join(path, "tokenizer.json"))
    return model


# ---- exact distributions and goodness of fit (engine statistical tests) ----------------------
SV, NSAMP, PROMPT = 12, 4000, [1, 2, 3]  # vocabulary, samples, prompt of the sampling tests


def joint_first_two(model, params):
    """Exact P(t1, t2 | PROMPT) [SV, SV] of the runner under sampling params (T, top_k, top_p)."""
    r = ModelRunner(model)
    r.allocate(SV, 8)
    logits = r.prefill([PROMPT] * SV).logits
    p1 = reference.target_probs(logits[0], *params)
    nxt = r.decode(torch.arange(SV), torch.full((SV,), len(PROMPT)))
    return torch.stack([p1[t] * reference.target_probs(nxt[t], *params) for t in range(SV)])


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit; cells with expected count < 5 are pooled; a sample in a cell of
    probability 0 rejects the fit outright (p = 0)."""
    from scipy import stats
    exp = probs.flatten() * counts.sum()
    obs = counts.flatten().double()
    if obs[exp == 0].sum() > 0:
        return 0.0
    exp, obs = exp[exp > 0], obs[exp > 0]
    small = exp < 5
    if small.any():
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
    exp = exp * obs.sum() / exp.sum()
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def two_sample_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy import stats
    table = torch.stack([a.flatten(), b.flatten()]).double()
    keep = table.sum(0) >= 10
    pool = table[:, ~keep].sum(1, keepdim=True)
    table = torch.cat([table[:, keep]] + ([pool] if pool.sum() > 0 else []), 1)
    return float(stats.chi2_contingency(table.numpy())[1])


def histogram(tokens) -> torch.Tensor:
    counts = torch.zeros(SV * SV, dtype=torch.long)
    for t in tokens:
        counts[t[0] * SV + t[1]] += 1
    return counts.view(SV, SV)


def assert_first_three_tokens_fit(target, drafter, seed0: int, n: int = 6000,
                                  batch: Optional[int] = None, **engine_kw) -> list:
    """The joint of the first three tokens (T = 1) generated with ``drafter`` fits the target's
    exact joint (chi-square), and depth >= 2 drafts were accepted in some rounds. The n requests
    run in batches of ``batch`` (default all at once) on a SpeculativeEngine made with
    ``engine_kw``; returns each batch's Metrics."""
    r = ModelRunner(target)
    r.allocate(SV * SV, 8)
    t12 = torch.cartesian_prod(torch.arange(SV), torch.arange(SV))  # [SV^2, 2]
    logits = r.prefill([PROMPT + t.tolist() for t in t12]).logits
    p3 = torch.stack([reference.target_probs(row, 1.0) for row in logits])  # [SV^2, SV]
    exact = joint_first_two(target, (1.0, 0, 1.0)).flatten()[:, None] * p3
    engine, batch = SpeculativeEngine(target, drafter, **engine_kw), batch or n
    counts, metrics, deep = torch.zeros(SV ** 3, dtype=torch.long), [], False
    for i in range(seed0, seed0 + n, batch):
        out = engine.generate([PROMPT] * batch, seed=list(range(i, i + batch)), max_new_tokens=3,
                              temperature=1.0, stop_tokens=[])
        for t in out.tokens:
            counts[(t[0] * SV + t[1]) * SV + t[2]] += 1
        metrics.append(out.metrics)
        deep |= bool((round_accepts(engine) >= 2).any())
    assert chi2_pvalue(counts, exact) > 1e-3
    assert deep  # depth >= 2 was accepted in some rounds
    return metrics


def round_accepts(engine) -> torch.Tensor:
    """Accepted drafts of every request-round of the engine's last generate() call, from its
    round log: what verify accepted, including tokens past max_new_tokens that the metrics (which
    count emitted tokens only) leave out."""
    st = engine.state
    rounds = min(int(st.rounds), st.round_active.shape[0])
    return st.round_accepts[:rounds].cpu()[st.round_active[:rounds].cpu()]


# ---- engine state ----------------------------------------------------------------------------
def spec_state(rows, capacity: int = 16) -> SpecState:
    """A greedy SpecState whose committed tokens are ``rows`` (the last one is the anchor)."""
    B, C = len(rows), capacity
    tokens = torch.zeros(B, C, dtype=torch.int64)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
    n = torch.tensor([len(r) for r in rows])
    return SpecState(tokens, n, n.clone(), torch.full((B,), 99), torch.full((B, 1), -1),
                     sampling_tensors(B, 0.0), torch.zeros(B, dtype=torch.int64),
                     torch.ones(B, dtype=torch.bool), [list(r) for r in rows])
