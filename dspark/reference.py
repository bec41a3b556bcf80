"""Plain-PyTorch reference of every dspark op: the executable specification the tests hold the
CPU and CUDA kernels to. Written for clarity (Python loops over requests and tree nodes).

Arithmetic (shared with include/dspark/prob.h so every backend returns the same tokens):
  t(v) = (w(v) * fp32(1/T)) * fp32(log2 e)            all fp32, each product rounded once
  e(v) = P(t - floor t) * 2^(floor(t) - N)            P: degree-6 polynomial ~ 2^f (fp32 Horner)
  p(v) = e(v) / sum(e)                                N = floor(max t); sums in float64
Greedy rows (T < 1e-5) are one-hot at the first maximal logit.
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


# ---- fused_linear ---------------------------------------------------------------------------
def fused_linear_input(x, weight, norm_weight=None, eps=1e-6, silu_gate=False):
    """xhat of fused_linear: x, RMSNorm(x) * norm_weight, or silu(gate) * up (stored in x's
    dtype)."""
    dt = x.dtype
    if silu_gate:
        gate, up = x.float().split(weight.shape[1], -1)
        return (torch.nn.functional.silu(gate).to(dt).float() * up).to(dt)
    if norm_weight is not None:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt)
        return (norm_weight.float() * normed.float()).to(dt)
    return x


def fused_linear(x, weight, bias=None, residual=None, norm_weight=None, eps=1e-6, silu_gate=False):
    """What dspark::fused_linear computes, written as the unfused modules it replaces (RMSNorm ->
    Linear -> residual add, or SiLU(gate) * up -> Linear -> residual add). x [M, K] (or [M, 2K]),
    weight [N, K] -> [M, N]. Every intermediate is stored in x's dtype; the matmul sums in fp32."""
    dt = x.dtype
    y = fused_linear_input(x, weight, norm_weight, eps, silu_gate).float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(dt)
    if residual is not None:
        y = (residual.float() + y.float()).to(dt)
    return y


# ---- decode_attention -----------------------------------------------------------------------
def _norm_rope(x, weight, eps, cos, sin):
    """x [..., D] in dtype T: per-head RMSNorm (if weight) then rotary with T-rounded cos/sin,
    each product and the sum rounded to T (what the model's separate ops store)."""
    dt = x.dtype
    if weight is not None:
        xf = x.float()
        x = (weight.float()
             * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dt).float()).to(dt)
    x1, x2 = x.chunk(2, -1)
    rot = torch.cat((-x2, x1), -1)
    return ((x.float() * cos.float()).to(dt).float()
            + (rot.float() * sin.float()).to(dt).float()).to(dt)


def tree_paths(parents: list) -> list:
    """Ancestors of each node from the root to itself (parents: local ids, -1 at roots)."""
    paths = []
    for j, q in enumerate(parents):
        paths.append((paths[q] if q >= 0 else []) + [j])
    return paths


def decode_attention(qkv, k_cache, v_cache, layer, positions, inv_freq, q_norm_weight,
                     k_norm_weight, eps, num_heads, window, parents=None):
    """What dspark::decode_attention computes (mutates k_cache/v_cache like the op): per request,
    write each row's rotated k and v at slot positions[b] + j, then softmax(q K^T / sqrt(D)) V in
    fp32 over the row's virtual slots (the cache below positions[b], then its ancestors), output
    rounded to qkv's dtype. qkv [B, W] (one row) or [B, T, W]; returns [B, H * D] or
    [B, T, H * D]."""
    squeeze = qkv.dim() == 2
    q3 = qkv[:, None] if squeeze else qkv
    B, T = q3.shape[:2]
    Hkv, S, D = k_cache.shape[2], k_cache.shape[3], k_cache.shape[4]
    H, dt = num_heads, qkv.dtype
    out = torch.empty(B, T, H * D, dtype=dt)
    for b in range(B):
        st = int(positions[b])
        if not (0 <= st and st + T <= S):
            raise ValueError(f"positions must lie in [0, {S}) with room for {T} rows, got {st}")
        par = list(range(-1, T - 1)) if parents is None else [int(x) for x in parents[b]]
        if any(not -1 <= x < j for j, x in enumerate(par)):
            raise ValueError(f"parents must be -1 or a smaller row id, got {par}")
        paths = tree_paths(par)
        pos = [st + len(p) - 1 for p in paths]

        def rope_tables(p):
            f = torch.tensor(float(p), dtype=torch.float32) * inv_freq.float().cpu()
            emb = torch.cat((f, f))
            return emb.cos().to(dt), emb.sin().to(dt)
        for j in range(T):
            k = q3[b, j, H * D:(H + Hkv) * D].view(Hkv, D)
            k_cache[layer, b, :, st + j] = _norm_rope(k, k_norm_weight, eps, *rope_tables(pos[j]))
            v_cache[layer, b, :, st + j] = q3[b, j, (H + Hkv) * D:].view(Hkv, D)
        for j in range(T):
            p = pos[j]
            lo = max(0, p - window + 1) if window > 0 else 0
            slots = [v if v < st else st + paths[j][v - st] for v in range(lo, p + 1)]
            q = _norm_rope(q3[b, j, :H * D].view(H, D), q_norm_weight, eps, *rope_tables(p))
            keys = k_cache[layer, b][:, slots].float()  # [Hkv, n, D]
            vals = v_cache[layer, b][:, slots].float()
            group = H // Hkv
            kk, vv = keys.repeat_interleave(group, 0), vals.repeat_interleave(group, 0)
            scores = torch.einsum("hd,hnd->hn", q.float(), kk) / math.sqrt(D)
            out[b, j] = torch.einsum("hn,hnd->hd", scores.softmax(-1), vv).to(dt).reshape(-1)
    return out[:, 0] if squeeze else out


# ---- the step's bookkeeping (dspark::commit_tokens, dspark::ngram_propose) --------------------
def commit_tokens(tokens, n_tokens, active, out_tokens, accept_count, stop_tokens, prompt_lens,
                  max_new, round_active, round_accepts, rounds, any_active):
    """What dspark::commit_tokens does, in place (``SpecState.commit``): append the accepted
    tokens and the bonus, update the finished flags, then log the round (active flags at its
    start, accepted counts), as tensor ops (capturable in a CUDA graph, no host sync). Two
    clamps are the op's contract for input the engine never passes and change nothing
    otherwise: ``add`` to [0, W] (accept_count outside [0, W - 1]) and the log row to >= 0 (a
    negative round counter)."""
    C, W, R = tokens.shape[1], out_tokens.shape[1], round_active.shape[0]
    active_at_start = active.clone()
    # append
    k = torch.arange(W, device=out_tokens.device)
    add = torch.where(active, (accept_count + 1).clamp(0, W), 0)
    keep = k[None, :] < add[:, None]
    idx = (n_tokens[:, None] + k).clamp(max=C - 1)
    tokens.scatter_(1, idx, torch.where(keep, out_tokens, tokens.gather(1, idx)))
    stop = ((out_tokens[:, :, None] == stop_tokens[:, None, :]).any(-1) & keep).any(-1)
    n_tokens += add
    active &= ~stop & (n_tokens - prompt_lens < max_new)  # the new n_tokens
    # the round log
    i = rounds.clamp(0, R - 1).view(1)
    round_active.index_copy_(0, i, active_at_start[None])
    round_accepts.index_copy_(0, i, accept_count[None])
    rounds += 1
    any_active.copy_(active.any())


def ngram_propose(tokens, n_tokens, gamma, max_ngram, min_ngram):
    """What dspark::ngram_propose returns: ``NgramDrafter.propose``'s tensor code (static shapes,
    no host sync) with its chain packed as rows: drafts [B, gamma + 1] = anchor, then the gamma
    tokens that followed the most recent earlier occurrence of the longest matching suffix
    (sizes max_ngram .. min_ngram, sizes >= C skipped), continued periodically; without a
    match the anchor repeats."""
    toks, n = tokens, n_tokens  # [B, C], [B]
    B, C = toks.shape
    dev = toks.device
    cont = n - 1  # continuation start; default: repeat the anchor
    found = torch.zeros(B, dtype=torch.bool, device=dev)
    for size in range(max_ngram, min_ngram - 1, -1):
        if size >= C:
            continue
        at = n[:, None] - size + torch.arange(size, device=dev)
        suffix = toks.gather(1, at.clamp(min=0))
        windows = toks.unfold(1, size, 1)  # [B, C - size + 1, size]
        begin = torch.arange(windows.shape[1], device=dev)
        match = (windows == suffix[:, None, :]).all(-1) & (begin[None, :] + size < n[:, None])
        last = torch.where(match, begin, -1).max(1).values
        hit = (last >= 0) & ~found & (n > size)
        cont = torch.where(hit, last + size, cont)
        found |= hit
    period = n - cont  # >= 1
    idx = cont[:, None] + torch.arange(gamma, device=dev) % period[:, None]
    anchor = toks.gather(1, (n - 1)[:, None])
    return torch.cat([anchor, toks.gather(1, idx)], 1)


# ---- the prefix scheduler (dspark::schedule_prefix, dspark::schedule_budget) -------------------
SCHEDULE_ONE = 1 << 44  # survivals in units of 2^-44 (include/dspark/schedule.h)


def ranked_candidates(confidences, draft_lengths) -> list:
    """Every draft position the scheduler may admit, as (q, j, r) in rank order: quantized
    survival q = floor(a_{r,j} * 2^44) descending, then smaller j, then smaller r, where
    a_{r,j} = c_{r,0} * ... * c_{r,j} multiplied left to right in float64. A candidate has
    j < draft_lengths[r] and q >= 1 (so a request's candidates are a prefix of its drafts, and
    so is every request's share of a prefix of the ranking)."""
    c, lengths = confidences.double().tolist(), draft_lengths.tolist()
    cands = []
    for r, row in enumerate(c):
        a = 1.0
        for j in range(lengths[r]):
            a *= row[j]
            q = int(a * SCHEDULE_ONE)
            if q < 1:
                break
            cands.append((q, j, r))
    return sorted(cands, key=lambda t: (-t[0], t[1], t[2]))


def schedule_theta(tau: int, sps: list, B: int) -> float:
    """Predicted tokens/s of a B-token verify expected to commit tau * 2^-44 tokens (float64,
    two roundings), or -1 where B is outside the table."""
    return (float(tau) / SCHEDULE_ONE) * sps[B - 1] if 1 <= B <= len(sps) else -1.0


def schedule_prefix(confidences, draft_lengths, sps, mode, threshold=0.0, budget=None):
    """What dspark::schedule_prefix returns: verify lengths [R] int64 (valid inputs).
    fixed: every draft; threshold: the leading drafts with c >= threshold; async: the first
    `budget` ranked candidates (clamped to [0, M]); sync: Algorithm 1 — start from every anchor
    (B = R, tau = R), admit ranked candidates one by one (B += 1, tau += a) while
    Theta = tau * SPS(B) rises strictly; the first candidate that does not raise it, or whose B
    is past the table, stops the scan and is not admitted."""
    R, dev = confidences.shape[0], draft_lengths.device
    if mode == "fixed":
        return draft_lengths.clone()
    if mode == "threshold":
        out = []
        for row, n in zip(confidences.double().tolist(), draft_lengths.tolist()):
            ell = 0
            while ell < n and row[ell] >= threshold:
                ell += 1
            out.append(ell)
        return torch.tensor(out, dtype=torch.int64, device=dev)
    cands = ranked_candidates(confidences, draft_lengths)
    if mode == "async":
        n = min(max(int(budget), 0), len(cands))
    else:
        table, n, tau = sps.double().tolist(), 0, R * SCHEDULE_ONE
        for q, _, _ in cands:
            B = R + n + 1
            if B > len(table) or not schedule_theta(tau + q, table, B) > schedule_theta(
                    tau, table, B - 1):
                break
            tau, n = tau + q, n + 1
    out = [0] * R
    for _, _, r in cands[:n]:
        out[r] += 1
    return torch.tensor(out, dtype=torch.int64, device=dev)


def schedule_budget(confidences, draft_lengths, sps):
    """What dspark::schedule_budget returns: [] int64, the first n maximising Theta_n over the
    whole greedy path n = 0..M (no early stop; B = R + n within the table), 0 if none is."""
    R, table = confidences.shape[0], sps.double().tolist()
    tau = R * SCHEDULE_ONE
    best, best_n = schedule_theta(tau, table, R), 0
    for n, (q, _, _) in enumerate(ranked_candidates(confidences, draft_lengths), 1):
        tau += q
        theta = schedule_theta(tau, table, R + n)
        if theta > best:
            best, best_n = theta, n
    return torch.tensor(best_n if best >= 0 else 0, dtype=torch.int64, device=draft_lengths.device)


# ---- KV-cache compaction after verify (dspark::kv_commit) --------------------------------------
def kv_commit(k_cache, v_cache, start, accept_nodes, accept_count, node_offsets, block_table=None):
    """What dspark::kv_commit does (in place) and returns, for valid input. Request b's verified
    tree put node j's K/V at slot start[b] + j; the path accept_nodes[b, :c + 1] (flat ids, root
    first; c = accept_count[b]) moves to slots start[b] + 0..c, all rows gathered before any is
    written (equal to moving them in increasing depth: a path's local ids are >= its depths).
    accept_count -1 marks an inactive request (nothing moved, length = start). Contiguous caches
    are [L, B, H, S, D]; paged ones [L, P, page_size, H, D], slot s of request b at page
    block_table[b, s // page_size], row s % page_size. Returns lengths = start + c + 1 and the
    pages that became free: block-table entries of the pages the block used (slots below
    start + n_b, n_b = the request's nodes) past those the new length keeps, -1 padded to
    F = ceil((W - 1) / page_size) columns ([B, 0] int64 when contiguous)."""
    B, W = accept_nodes.shape
    dev = start.device
    rows = (torch.arange(W, device=dev)[None, :] <= accept_count[:, None]).nonzero()
    b, d = rows[:, 0], rows[:, 1]  # every (request, depth) of every active path
    src = start[b] + accept_nodes[b, d] - node_offsets[b]
    dst = start[b] + d
    for cache in (k_cache, v_cache):
        if block_table is None:  # [L, B, H, S, D]: each request its own planes
            cache[:, b, :, dst] = cache[:, b, :, src]  # the right side is gathered first
        else:
            ps = cache.shape[2]
            cache[:, block_table[b, dst // ps], dst % ps] = \
                cache[:, block_table[b, src // ps], src % ps]
    lengths = start + accept_count + 1
    if block_table is None:
        return lengths, torch.zeros(B, 0, dtype=torch.int64, device=dev)
    ps, width = k_cache.shape[2], block_table.shape[1]
    n = node_offsets[1:] - node_offsets[:-1]
    keep = torch.div(lengths + ps - 1, ps, rounding_mode="floor")
    used = torch.div(start + n + ps - 1, ps, rounding_mode="floor")
    j = keep[:, None] + torch.arange(-(-(W - 1) // ps), device=dev)
    pages = block_table.gather(1, j.clamp(0, max(width - 1, 0))) if width else j
    freed = (j < used[:, None]) & (accept_count >= 0)[:, None]
    return lengths, torch.where(freed, pages, -1).to(block_table.dtype)
