"""Plain-PyTorch reference of every dspark op: the executable specification the tests hold the
CPU and CUDA kernels to. Written for clarity (Python loops over requests and tree nodes).

Arithmetic (shared with include/dspark/prob.h so every backend returns the same tokens):
  t(v) = (w(v) * fp32(1/T)) * fp32(log2 e)            all fp32, each product rounded once
  e(v) = P(t - floor t) * 2^(floor(t) - N)            P: degree-6 polynomial ~ 2^f (fp32 Horner)
  p(v) = e(v) / sum(e)                                N = floor(max t); sums in float64
Greedy rows (T < 1e-5) are one-hot at the first maximal logit.

This module holds the sampling ops (verify, sample, markov_draft); the layer ops and the state
ops live in reference_layers.py / reference_state.py and are re-exported here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

GREEDY_T = float(torch.tensor(1e-5, dtype=torch.float32))  # kernels compare in fp32
LOG2E = torch.tensor(1.44269502, dtype=torch.float32)
EXP2_POLY = [1.0, 0.693146944, 0.240230501, 0.0554804280, 0.00968458038, 0.00123878219,
             0.000218775051]
MAX_VOCAB = (1 << 19) - 1  # top-p masses are 44-bit fixed point summed in int64: V <= 2^19 - 1
_M64 = (1 << 64) - 1


# ---- randomness -----------------------------------------------------------------------------
def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def keyed_uniform(seed: int, position: int, node: int, purpose: int) -> float:
    """Uniform in (0, 1) keyed by (seed, position, node, purpose); purpose 0 accept, 1 sample."""
    h = _mix64((seed + 0x9E3779B97F4A7C15) & _M64)
    h = _mix64(h ^ ((position * 0xD1B54A32D192ED03) & _M64))
    h = _mix64(h ^ ((node * 2 + purpose + 0x8CB92BA72F3D8DD7) & _M64))
    return ((h >> 11) + 0.5) * (1.0 / 9007199254740992.0)


# ---- one row --------------------------------------------------------------------------------
def _exp2_frac(f: torch.Tensor) -> torch.Tensor:
    g = torch.full_like(f, EXP2_POLY[6])
    for c in reversed(EXP2_POLY[:6]):
        g = g * f  # two separately rounded fp32 ops: no fused multiply-add
        g = g + torch.tensor(c, dtype=torch.float32)
    return g.clamp(1.0, 1.99999988)


def _pow2_neg(k: torch.Tensor) -> torch.Tensor:
    """Exact 2^-k as float64 for integer k in [0, 1000]."""
    return ((1023 - k.to(torch.int64)) << 52).view(torch.float64)


def _scaled_exp(t: torch.Tensor, nbase: torch.Tensor) -> torch.Tensor:
    finite = t > -math.inf
    n = torch.floor(torch.where(finite, t, nbase))
    drop = nbase - n
    keep = finite & (drop <= 1000)
    g = _exp2_frac(torch.where(finite, t, nbase) - n).double()
    return torch.where(keep, g * _pow2_neg(torch.where(keep, drop, 0.0)), 0.0)


def _fixed_mass(t: torch.Tensor, nbase: torch.Tensor) -> torch.Tensor:
    finite = t > -math.inf
    tt = torch.where(finite, t, nbase)
    n = torch.floor(tt)
    drop = (nbase - n)
    m = (_exp2_frac(tt - n) * 8388608.0).to(torch.int64)
    d = drop.clamp(0, 63).to(torch.int64)
    up = m << (20 - d).clamp(min=0)
    down = m >> (d - 20).clamp(min=0, max=62)
    out = torch.where(d <= 20, up, down)
    return torch.where(finite & (drop < 44), out, torch.zeros_like(out))


class Row:
    """The target (or draft) distribution of one logits row: e(v) and its total."""

    def __init__(self, logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
        w = logits.detach().to("cpu", torch.float32)
        if not 1 <= w.numel() <= MAX_VOCAB:
            raise ValueError(f"vocabulary size must be in [1, {MAX_VOCAB}], got {w.numel()}")
        if torch.isnan(w).any() or (w == math.inf).any():
            raise ValueError("logits contain NaN or +inf")
        finite = w > -math.inf
        if not finite.any():
            raise ValueError("a logits row has no finite entry (all -inf)")
        self.greedy = temperature < GREEDY_T
        if self.greedy:
            self.e = torch.zeros_like(w, dtype=torch.float64)
            self.e[int(torch.argmax(w))] = 1.0  # first maximal index
            self.total = 1.0
            return
        inv_t = (torch.tensor(1.0, dtype=torch.float32)
                 / torch.tensor(temperature, dtype=torch.float32))
        t = (w * inv_t) * LOG2E
        if (finite & ~torch.isfinite(t)).any():
            raise ValueError("logits / temperature overflows float32")
        nbase = torch.floor(t.max())
        keep = torch.tensor(-math.inf)
        nfinite = int(finite.sum())
        if 0 < top_k < nfinite:
            keep = torch.topk(t, top_k).values[-1]
        if top_p < 1.0:
            kept = t >= keep
            tk, mk = t[kept], _fixed_mass(t, nbase)[kept]
            order = torch.argsort(tk, descending=True, stable=True)
            tk, mk = tk[order], mk[order]
            cum = torch.cumsum(mk, 0)
            total = int(cum[-1])
            want = math.ceil(float(torch.tensor(top_p, dtype=torch.float32)) * float(total))
            need = total if want >= float(total) else max(1, int(want))
            group_end = torch.ones_like(tk, dtype=torch.bool)
            group_end[:-1] = tk[1:] != tk[:-1]
            idx = int(torch.nonzero(group_end & (cum >= need))[0])
            keep = torch.maximum(keep, tk[idx])
        self.e = torch.where(t >= keep, _scaled_exp(t, nbase), 0.0)
        self.total = _seq_sum(self.e)


def _seq_sum(x: torch.Tensor) -> float:
    """float64 sum in index order (as the CPU kernel adds), via the last cumulative sum."""
    return float(torch.cumsum(x, 0)[-1])


def _draw(r: torch.Tensor, u: float, row: Row) -> int:
    """Inverse-CDF draw in index order from unnormalized r; r == 0 falls back to the row."""
    z = _seq_sum(r)
    if z == 0.0:
        r, z = row.e, row.total
    cum = torch.cumsum(r, 0)
    hit = torch.nonzero((cum > u * z) & (r > 0))
    if len(hit):
        return int(hit[0])
    return int(torch.nonzero(r > 0)[-1])


def _coin(uniforms, seeds, positions, r: int, row: int, node: int, purpose: int,
          temperature: float) -> float:
    """Caller uniforms [N, 2], else keyed by (seed, position); with neither only a greedy
    request may run, and its decisions do not depend on the coin (0)."""
    if uniforms is not None:
        return float(uniforms[row, purpose])
    if seeds is not None:
        return keyed_uniform(int(seeds[r]), int(positions[r]), node, purpose)
    if not temperature < GREEDY_T:
        raise ValueError("a sampled request (temperature > 0) needs randomness: pass seeds and "
                         "positions, or uniforms")
    return 0.0


# ---- ops ------------------------------------------------------------------------------------
def verify(target_logits, node_offsets, draft_tokens, parents, draft_probs, temperature, top_k,
           top_p, seeds=None, positions=None, uniforms=None, max_nodes: Optional[int] = None):
    """Reference of ``torch.ops.dspark.verify`` (same arguments, same outputs)."""
    off = node_offsets.tolist()
    R = len(off) - 1
    W = max_nodes if max_nodes is not None else max(b - a for a, b in zip(off, off[1:]))
    tok, par = draft_tokens.tolist(), parents.tolist()
    out_tokens = torch.full((R, W), -1, dtype=torch.int64)
    out_count = torch.zeros(R, dtype=torch.int64)
    out_nodes = torch.full((R, W), -1, dtype=torch.int64)
    q_all = None if draft_probs is None else draft_probs.detach().to("cpu", torch.float64)
    for r in range(R):
        o, n = off[r], off[r + 1] - off[r]
        params = (float(temperature[r]), int(top_k[r]), float(top_p[r]))

        def coin(node, purpose):
            return _coin(uniforms, seeds, positions, r, o + node, node, purpose, params[0])

        cur, accepted = 0, 0
        out_nodes[r, 0] = o
        while True:
            row = Row(target_logits[o + cur], *params)
            resid, z, final = row.e.clone(), row.total, None
            for j in range(cur + 1, n):
                if par[o + j] != cur:
                    continue
                x = tok[o + j]
                qx = 1.0 if q_all is None else float(q_all[o + j, x])
                if coin(j, 0) * qx * z < float(resid[x]):
                    final = j
                    break
                if q_all is None:
                    z = z - float(resid[x])
                    resid[x] = 0.0
                else:
                    resid = torch.clamp(resid - q_all[o + j] * z, min=0.0)
                    z = _seq_sum(resid)
            if final is None:
                out_tokens[r, accepted] = _draw(resid, coin(cur, 1), row)
                break
            out_tokens[r, accepted] = tok[o + final]
            accepted += 1
            out_nodes[r, accepted] = o + final
            cur = final
        out_count[r] = accepted
    dev = draft_tokens.device
    return out_tokens.to(dev), out_count.to(dev), out_nodes.to(dev)


def sample(logits, temperature, top_k, top_p, seeds=None, positions=None, uniforms=None,
           return_probs: bool = False):
    """Reference of ``torch.ops.dspark.sample``."""
    R, V = logits.shape
    tokens = torch.empty(R, dtype=torch.int64)
    probs = torch.zeros((R if return_probs else 0, V), dtype=torch.float64)
    for r in range(R):
        row = Row(logits[r], float(temperature[r]), int(top_k[r]), float(top_p[r]))
        u = float(uniforms[r]) if uniforms is not None else _coin(
            None, seeds, positions, r, r, 0, 1, float(temperature[r]))
        tokens[r] = _draw(row.e, u, row)
        if return_probs:
            probs[r] = row.e / row.total
    return tokens.to(logits.device), probs.to(logits.device)


def target_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The exact distribution verify/sample use for one row (float64 [V])."""
    row = Row(logits, temperature, top_k, top_p)
    return row.e / row.total


# ---- markov_draft (DSpark's sequential stage; include/dspark/markov_draft.h) ------------------
def _mac(acc, a, w, wdt):
    """acc + a * w rounded once to fp32 (16-bit weights: the product is exact, an FMA; the double
    sum rounds like it) or product then sum, each rounded (fp32 weights)."""
    if wdt in (torch.bfloat16, torch.float16):
        return (acc.double() + a.double() * w.double()).float()
    return acc + a * w


def markov_logits(base_logits, prev, w1, w2):
    """z = U + round_W(sum_j W1[prev, j] * W2[j]) fp32, j in order: base_logits [..., V] and the
    previous tokens prev [...] -> [..., V] (markov_draft's corrected draft logits), computed on
    base_logits' device with elementwise ops only (no host sync: capturable)."""
    wdt, dev = w1.dtype, base_logits.device
    W2 = w2.detach().to(dev).float()
    e = w1.detach().to(dev)[prev.to(dev)].float()
    acc = torch.zeros(*prev.shape, W2.shape[1], device=dev)
    for j in range(W2.shape[0]):
        acc = _mac(acc, e[..., j:j + 1], W2[j], wdt)
    return base_logits.detach().float() + acc.to(wdt).float()


def markov_conf(hidden, e, conf_weight, conf_bias):
    """round_W(w . [h; e] + b): entry i summed into partial i % 32, then the partials combined
    as a warp's shuffle-down tree (16, 8, 4, 2, 1). hidden [..., d], e [..., rank] fp32."""
    wdt, w = conf_weight.dtype, conf_weight.detach().cpu().float()
    x = torch.cat([hidden.detach().cpu().float(), e], -1)
    part = torch.zeros(*x.shape[:-1], 32)
    for i in range(0, x.shape[-1], 32):
        n = min(32, x.shape[-1] - i)
        part[..., :n] = _mac(part[..., :n], w[i:i + n], x[..., i:i + n], wdt)
    for s in (16, 8, 4, 2, 1):
        part[..., :s] = part[..., :s] + part[..., s:2 * s]
    return (part[..., 0] + conf_bias.detach().cpu().float().reshape(())).to(wdt).float()


def markov_draft(base_logits, anchors, w1, w2, hidden, conf_weight, conf_bias, temperature,
                 top_k, top_p, seeds, positions, return_probs: bool = False):
    """Reference of ``torch.ops.dspark.markov_draft``: the Python loop it fuses, each x_k drawn
    by :func:`sample` from the corrected logits with (seed, positions + k - 1)."""
    R, G, V = base_logits.shape
    tokens = torch.empty(R, G, dtype=torch.int64)
    conf = torch.zeros(R if conf_weight is not None else 0, G)
    probs = torch.zeros(R if return_probs else 0, G, V, dtype=torch.float64)
    prev, seeds, positions = anchors.cpu().clone(), seeds.cpu(), positions.cpu()
    for k in range(G):
        z = markov_logits(base_logits[:, k].cpu(), prev, w1, w2)
        if conf_weight is not None:
            e = w1.detach().cpu()[prev].float()
            conf[:, k] = markov_conf(hidden[:, k], e, conf_weight, conf_bias)
        tokens[:, k], q = sample(z, temperature, top_k, top_p, seeds, positions + k, None,
                                 return_probs)
        if return_probs:
            probs[:, k] = q
        prev = tokens[:, k].clone()
    dev = base_logits.device
    return tokens.to(dev), conf.to(dev), probs.to(dev)


from .reference_layers import decode_attention, fused_linear, fused_linear_input, tree_paths  # noqa: E402,F401
from .reference_state import (  # noqa: E402,F401
    SCHEDULE_ONE,
    commit_tokens,
    kv_commit,
    ngram_propose,
    ranked_candidates,
    schedule_budget,
    schedule_prefix,
    schedule_theta,
)
