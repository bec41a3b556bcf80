"""Plain-PyTorch reference of the engine's state ops (dspark::commit_tokens, ngram_propose,
schedule_prefix, schedule_budget, kv_commit): part of the executable specification that
``dspark.reference`` re-exports (one namespace for the tests)."""
from __future__ import annotations

import torch


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
