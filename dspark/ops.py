"""Typed thin wrappers over ``torch.ops.dspark.*``. Shapes: R requests, N packed nodes, V vocab,
W = max_nodes (static output width, usually gamma + 1).

Randomness is either keyed (``seeds`` + ``positions``: uniform = hash(seed, position, node,
purpose), so a request's draws never depend on its place in the batch) or caller-supplied
(``uniforms``). Greedy requests (temperature < 1e-5) use no randomness: a call whose requests are
all greedy may pass neither. Every op takes an empty batch (R = 0) and returns empty results.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import _C

Floats = Union[float, Sequence[float], torch.Tensor]
Ints = Union[int, Sequence[int], torch.Tensor]


@contextlib.contextmanager
def sync_checks(enabled: bool):
    """Within the block, CUDA ops do (or do not) read their data-check status back after each
    launch. Reading it back is a host sync; a decode loop that validated its inputs turns it off.
    The kernels stay memory-safe either way (invalid requests give -1 tokens). CPU ops always
    check; CUDA-graph capture never reads back."""
    before = _C.set_sync_checks(enabled)
    try:
        yield
    finally:
        _C.set_sync_checks(before)


# Whether callers that have a fallback (KVCache.commit: a gather/scatter; the DSpark drafter: the
# Python Markov loop) take these ops' CUDA kernels; on the CPU they always do. Flipping one entry
# moves every such caller. kv_commit: its CUDA tests, memcheck and racecheck passed on an H100
# (2026-12-06). markov_draft: so did its (H100 2026-12-07; on an H200 the same day with the
# confidence prefix and programmatic launch, and the whole CUDA suite with the op on); the
# DSpark drafter takes it up to a batch bound (drafters/dspark_drafter.py).
CUDA_KERNEL_TESTED = {"kv_commit": True, "markov_draft": True}
# DSPARK_CUDA_KERNELS=kv_commit,markov_draft (read at import) turns entries on for one process:
# the GPU session script sets it after those kernels' tests and sanitizers passed on that machine.
for _name in filter(None, os.environ.get("DSPARK_CUDA_KERNELS", "").split(",")):
    if _name not in CUDA_KERNEL_TESTED:
        raise ValueError(f"DSPARK_CUDA_KERNELS: unknown op {_name!r}; "
                         f"known: {', '.join(CUDA_KERNEL_TESTED)}")
    CUDA_KERNEL_TESTED[_name] = True


def op_in_use(name: str, device: Union[str, torch.device]) -> bool:
    """Whether a caller with a fallback runs dspark op ``name`` on ``device``."""
    return torch.device(device).type != "cuda" or CUDA_KERNEL_TESTED[name]


@contextlib.contextmanager
def _verify_impl(name: str):
    """Internal A/B switch: within the block, CUDA ``verify`` / ``sample`` calls run the "fused"
    kernel (the default) or the "staged" pipeline it replaced. A call captured in a CUDA graph
    keeps the implementation it was captured with. ``DSPARK_VERIFY_IMPL=staged`` in the
    environment at import picks the staged one for the whole process."""
    before = _C.set_verify_impl(name)
    try:
        yield
    finally:
        _C.set_verify_impl(before)


class SamplingTensors(NamedTuple):
    temperature: torch.Tensor  # [R] f32, 0 = greedy
    top_k: torch.Tensor  # [R] i64, 0 = off
    top_p: torch.Tensor  # [R] f32, 1 = off


def sampling_tensors(num_requests: int, temperature: Floats = 1.0, top_k: Ints = 0,
                     top_p: Floats = 1.0,
                     device: Union[str, torch.device] = "cpu") -> SamplingTensors:
    """Per-request sampling parameters as the ops take them (scalars are broadcast to [R])."""
    def full(x, dtype):
        t = torch.as_tensor(x, dtype=dtype, device=device)
        return t.expand(num_requests).contiguous() if t.dim() == 0 else t.contiguous()
    return SamplingTensors(full(temperature, torch.float32), full(top_k, torch.int64),
                           full(top_p, torch.float32))


class VerifyResult(NamedTuple):
    out_tokens: torch.Tensor  # [R, W] i64: accepted drafts then the bonus/correction, -1 padded
    accept_count: torch.Tensor  # [R] i64: accepted draft tokens (bonus excluded)
    accept_nodes: torch.Tensor  # [R, W] i64: flat node ids of root + accepted nodes, -1 padded


def verify(target_logits: torch.Tensor, node_offsets: torch.Tensor, draft_tokens: torch.Tensor,
           parents: torch.Tensor, draft_probs: Optional[torch.Tensor], params: SamplingTensors,
           seeds: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
           uniforms: Optional[torch.Tensor] = None,
           max_nodes: Optional[int] = None) -> VerifyResult:
    """Verify packed draft trees (a chain is a tree with parents [-1, 0, 1, ...]).

    Parameters
    ----------
    target_logits : [N, V] float32/bfloat16/float16. Row i holds the target's logits after node i
        of its request (node 0 of each request is the root: the anchor token).
    node_offsets : [R + 1] int64, strictly increasing, node_offsets[0] = 0, node_offsets[R] = N
        (an empty batch: R = 0, N = 0, node_offsets = [0]).
    draft_tokens, parents : [N] int64. parents[i] is the parent's index *within the request*
        (-1 at the root; otherwise smaller than the node's own index). The root's token is
        never read (it is the anchor, already committed): any value, -1 included; every other
        node's token must lie in [0, V).
    draft_probs : [N, V] float32/float64 or None. Row i is the distribution node i was drawn
        from. None means deterministic drafts (target-only verification). The root rows are
        never read (nothing drew the anchor): zeros, or anything.
    params : per-request temperature / top_k / top_p (see :func:`sampling_tensors`).
    seeds, positions : [R] int64 (keyed randomness; positions = absolute position of the root),
        or ``uniforms`` : [N, 2] float64 in [0, 1) (accept coin, sampling coin per node), or
        neither when every request is greedy.
    max_nodes : static output width W (>= nodes of every request); defaults to the widest
        request (which reads node_offsets, i.e. syncs on CUDA; pass it in a decode loop).

    Examples
    --------
    >>> import torch, dspark
    >>> logits = torch.tensor([[0., 5., 0.], [0., 0., 5.]])  # root row, row after node 1
    >>> r = dspark.ops.verify(logits, torch.tensor([0, 2]), torch.tensor([0, 1]),
    ...                       torch.tensor([-1, 0]), None, dspark.ops.sampling_tensors(1, 0.0),
    ...                       max_nodes=2, uniforms=torch.full((2, 2), 0.5, dtype=torch.float64))
    >>> r.out_tokens.tolist(), r.accept_count.tolist()
    ([[1, 2]], [1])
    """
    if max_nodes is None:
        max_nodes = _widest_request(node_offsets)
    out = torch.ops.dspark.verify(target_logits, node_offsets, draft_tokens, parents, draft_probs,
                                  params.temperature, params.top_k, params.top_p, seeds,
                                  positions, uniforms, max_nodes)
    return VerifyResult(*out)


def _widest_request(node_offsets) -> int:
    """The most nodes of a request. Only a well-formed offsets tensor is read; anything else
    goes to the op with a width of 1, whose checks name the problem (so no max() over a 0-dim
    or empty tensor, and no difference of a stride-0 view of 10^12 entries)."""
    off = node_offsets
    if not (isinstance(off, torch.Tensor) and off.dim() == 1 and off.dtype == torch.int64
            and off.is_contiguous() and off.numel() >= 2):
        return 1
    return max(1, int((off[1:] - off[:-1]).max()))


def sample(logits: torch.Tensor, params: SamplingTensors, seeds: Optional[torch.Tensor] = None,
           positions: Optional[torch.Tensor] = None, uniforms: Optional[torch.Tensor] = None,
           return_probs: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sample one token per row of ``logits`` [R, V] with per-request temperature/top-k/top-p.

    Returns ``tokens`` [R] int64 and, if ``return_probs``, ``probs`` [R, V] float64: the exact
    distribution sampled from (what :func:`verify` takes as ``draft_probs``). With keyed
    randomness the draw equals verify's draw for a request with no drafts.

    Examples
    --------
    >>> import torch, dspark
    >>> tok, _ = dspark.ops.sample(torch.tensor([[1., 3., 2.]]),
    ...                            dspark.ops.sampling_tensors(1, 0.0),
    ...                            uniforms=torch.tensor([0.5], dtype=torch.float64))
    >>> tok.tolist()
    [1]
    """
    tokens, probs = torch.ops.dspark.sample(logits, params.temperature, params.top_k,
                                            params.top_p, seeds, positions, uniforms, return_probs)
    return tokens, (probs if return_probs else None)


class MarkovDraft(NamedTuple):
    tokens: torch.Tensor  # [R, gamma] i64: x_1..x_gamma (-1 only for invalid requests on CUDA)
    conf_logits: Optional[torch.Tensor]  # [R, gamma] f32 raw confidence logits z_k, or None
    probs: Optional[torch.Tensor]  # [R, gamma, V] f64: the distribution each x_k came from


def markov_draft(base_logits: torch.Tensor, anchors: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, params: SamplingTensors, seeds: torch.Tensor,
                 positions: torch.Tensor, hidden: Optional[torch.Tensor] = None,
                 conf_weight: Optional[torch.Tensor] = None,
                 conf_bias: Optional[torch.Tensor] = None,
                 return_probs: bool = False) -> MarkovDraft:
    """DSpark's sequential draft stage in one op (spec: dspark.reference.markov_draft): for
    k = 1..gamma, ``z_k = U_k + round_W(W1[x_{k-1}] @ W2)`` and ``x_k`` drawn from z_k exactly as
    :func:`sample` draws (keyed by ``seeds`` and ``positions + k - 1``), ``x_0 = anchors``.

    base_logits : [R, gamma, V] U, float32 or the weights' dtype (the LM head's output as is).
    w1 : [V, rank], w2 : [rank, V] the Markov factors (``MarkovHead.w1.weight`` and
        ``MarkovHead.w2.weight.t().contiguous()``), one dtype float32/bfloat16/float16; the bias is
        summed in fp32 (rank in order) and rounded to that dtype, as nn.Linear stores it.
    params : per-request temperature / top-k / top-p, as the target's; seeds, positions : [R]
        int64 (positions: the anchor's position; step k draws with position + k - 1).
    hidden, conf_weight, conf_bias : the confidence head (all or none): H_d [R, gamma, d],
        weight [d + rank], bias [1] in the weights' dtype; ``conf_logits[:, k-1]`` is
        ``round_W(w . [H_d[k]; W1[x_{k-1}]] + b)`` (calibrate, then sigmoid, as the drafter does).
    return_probs : also return q [R, gamma, V] float64, the rows verify takes as draft_probs
        (8 bytes per entry written; the tokens alone read U once and W2 once per step).

    CPU and CUDA compute the same logits bit for bit and return the same tokens.

    Examples
    --------
    >>> import torch, dspark
    >>> U = torch.tensor([[[0., 0., 9.], [9., 0., 0.]]])  # one request, gamma = 2, V = 3
    >>> w1, w2 = torch.zeros(3, 1), torch.zeros(1, 3)
    >>> out = dspark.ops.markov_draft(U, torch.tensor([1]), w1, w2,
    ...                               dspark.ops.sampling_tensors(1, 0.0), torch.tensor([7]),
    ...                               torch.tensor([0]))
    >>> out.tokens.tolist()
    [[2, 0]]
    """
    tokens, conf, probs = torch.ops.dspark.markov_draft(
        base_logits, anchors, w1, w2, hidden, conf_weight, conf_bias, params.temperature,
        params.top_k, params.top_p, seeds, positions, return_probs)
    return MarkovDraft(tokens, conf if conf_weight is not None else None,
                       probs if return_probs else None)


LINEAR_MAX_ROWS = 1 << 24  # fused_linear's rows per call (csrc/checks.h kLinearMaxRows)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 residual: Optional[torch.Tensor] = None,
                 norm_weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, silu_gate: bool = False) -> torch.Tensor:
    """``residual + linear(xhat, weight, bias)`` in one kernel, for the few-token calls (decode,
    verify) where a linear layer streams its weight.

    x : [..., K] (``silu_gate``: [..., 2K], xhat = silu(x[..., :K]) * x[..., K:]); with
        ``norm_weight`` [K], xhat = RMSNorm(x) * norm_weight (epsilon ``eps``); else xhat = x.
    weight : [N, K] (nn.Linear layout); bias : [N]; residual : [..., N]. One dtype throughout
        (float32 / bfloat16 / float16); intermediates are rounded to it as the separate PyTorch
        ops would store them (see dspark.reference.fused_linear). Returns [..., N].
    A row's result is bit-identical whatever the other rows are and however many there are
    (one summation order for every row count: a decoded token and the same token inside a
    verify block get the same bits). The CUDA kernel reads the weight once per 64 rows
    (tensor cores for bf16/fp16).
    """
    def rows(t, name):  # [..., F] -> [M, F]; a 0-dim or non-tensor argument: the op's checks
        if not isinstance(t, torch.Tensor) or t.dim() in (0, 2):
            return t
        m = math.prod(t.shape[:-1])
        if m > LINEAR_MAX_ROWS:  # the op's limit, checked before reshape copies a strided view
            raise ValueError(f"{name} has {m} rows (shape {list(t.shape)}); at most "
                             f"{LINEAR_MAX_ROWS} are supported")
        return t.reshape(m, t.shape[-1])
    lead = x.shape[:-1] if isinstance(x, torch.Tensor) and x.dim() else None
    if residual is not None and lead is not None and isinstance(residual, torch.Tensor) \
            and residual.shape[:-1] != lead:
        raise ValueError(f"residual must have x's leading dims {list(lead)} and N outputs, got "
                         f"shape {list(residual.shape)}")
    out = torch.ops.dspark.fused_linear(rows(x, "x"), weight, bias, rows(residual, "residual"),
                                        norm_weight, eps, silu_gate)
    return out.view(*lead, out.shape[-1])


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
                     positions: torch.Tensor, inv_freq: torch.Tensor, num_heads: int,
                     q_norm_weight: Optional[torch.Tensor] = None,
                     k_norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                     window: int = 0, parents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of a block of new tokens per request (decode: one; verify: a causal chain or a
    token tree), with their QK-norm, rotary embedding and KV-cache write in the same kernels.

    qkv : [B, (H + 2 Hkv) D] (one token per request) or [B, T, (H + 2 Hkv) D] (T <= 64 rows;
        H = ``num_heads``): the tokens' q | k | v projections.
    k_cache, v_cache : [L, B, Hkv, S, D]; row j of request b is written to layer ``layer``'s
        slot ``positions[b] + j`` (rotated, normed k; v).
    positions : [B] int64, slot and position of row 0; the block must fit: positions + T <= S.
    parents : [B, T] int64 local parent ids (-1 at roots) or None (a causal chain). Row j sits
        at position ``positions[b] + depth(j)`` and attends the cache slots below positions[b]
        and its ancestors (itself included), within the sliding ``window`` (0 = none).
    inv_freq : [D/2] float32 rotary frequencies; q/k_norm_weight : [D] per-head RMSNorm (Qwen3).
    Returns [B, H * D] or [B, T, H * D] in qkv's dtype (what the output projection takes).
    A row's bits equal those of decoding its token alone at its position once its ancestors
    sit in the slots below it (compacted path), whatever T, the other rows or S.
    """
    return torch.ops.dspark.decode_attention(qkv, k_cache, v_cache, layer, positions, inv_freq,
                                             q_norm_weight, k_norm_weight, eps, num_heads, window,
                                             parents)


def chain_layout(draft_lengths: Sequence[int], device: Union[str, torch.device] = "cpu"):
    """node_offsets [R+1] and parents [N] for chains with the given draft lengths (0 allowed)."""
    lengths = torch.as_tensor(list(draft_lengths), dtype=torch.int64) + 1
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    parents = torch.cat([torch.arange(-1, n - 1) for n in lengths.tolist()])
    return offsets.to(device), parents.to(device)


def commit_tokens(tokens: torch.Tensor, n_tokens: torch.Tensor, active: torch.Tensor,
                  out_tokens: torch.Tensor, accept_count: torch.Tensor, stop_tokens: torch.Tensor,
                  prompt_lens: torch.Tensor, max_new: torch.Tensor, round_active: torch.Tensor,
                  round_accepts: torch.Tensor, rounds: torch.Tensor,
                  any_active: torch.Tensor) -> None:
    """Commit a verified step to the per-request state, in place and in one kernel (what
    ``SpecState.commit`` runs; spec: dspark.reference.commit_tokens).

    tokens : [B, C] int64, n_tokens : [B] int64, active : [B] bool — the state (updated).
        An active request appends ``add = clamp(accept_count + 1, 0, W)`` tokens of its
        ``out_tokens`` row at ``tokens[b, min(n_tokens + k, C - 1)]``; an inactive one adds none.
    out_tokens : [B, W] int64 (W >= 1), accept_count : [B] int64 — as :func:`verify` returns them.
    stop_tokens : [B, S] int64 (-1 padded), prompt_lens, max_new : [B] int64 — a committed stop
        token, or ``n_tokens - prompt_lens >= max_new`` after the commit, clears ``active``.
    round_active : [Rmax, B] bool, round_accepts : [Rmax, B] int64 — row ``min(rounds, Rmax - 1)``
        gets the active flags from before the commit and ``accept_count``.
    rounds : [] int64 (incremented), any_active : [] bool (set to ``active.any()`` afterwards).

    Capturable in a CUDA graph (no host sync there; see :func:`sync_checks` for eager calls).
    ``n_tokens < 0`` is bad input (ValueError; on CUDA without the read-back the request is
    skipped).
    """
    torch.ops.dspark.commit_tokens(tokens, n_tokens, active, out_tokens, accept_count,
                                   stop_tokens, prompt_lens, max_new, round_active,
                                   round_accepts, rounds, any_active)


def ngram_propose(tokens: torch.Tensor, n_tokens: torch.Tensor, gamma: int, max_ngram: int = 3,
                  min_ngram: int = 1) -> torch.Tensor:
    """Prompt-lookup drafts in one kernel (what ``NgramDrafter.propose`` computes; spec:
    dspark.reference.ngram_propose).

    tokens : [B, C] int64, n_tokens : [B] int64 in [1, C]; request b's context is
        ``tokens[b, :n_tokens[b]]`` (entries beyond it are never read).
    gamma : drafts per request, in [1, 4095] (verify takes chains of up to 4096 nodes).
    For the largest size in max_ngram..min_ngram (sizes >= C skipped) whose last ``size`` tokens
    occur earlier in the context, the drafts continue after the most recent occurrence (repeated
    periodically where they reach the end of the context); without any match the anchor repeats.
    Returns drafts [B, gamma + 1] int64: the anchor ``tokens[b, n - 1]`` then gamma drafts, so
    ``drafts.view(-1)`` is the packed chain proposal (``gamma + 1`` nodes per request).

    Examples
    --------
    >>> import torch, dspark
    >>> dspark.ops.ngram_propose(torch.tensor([[5, 6, 7, 5, 6, 0]]), torch.tensor([5]), 3).tolist()
    [[6, 7, 5, 6]]
    """
    return torch.ops.dspark.ngram_propose(tokens, n_tokens, gamma, max_ngram, min_ngram)


class KvCommitResult(NamedTuple):
    lengths: torch.Tensor  # [B] i64: cache length after the commit (start + accept_count + 1)
    freed_pages: torch.Tensor  # [B, F]: pages that became free (paged), -1 padded


def kv_commit(k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor,
              accept_nodes: torch.Tensor, accept_count: torch.Tensor, node_offsets: torch.Tensor,
              block_table: Optional[torch.Tensor] = None) -> KvCommitResult:
    """After :func:`verify`: compact the KV cache in place, every layer, K and V in one launch
    (spec: dspark.reference.kv_commit).

    k_cache, v_cache : [L, B, H, S, D] (contiguous: request b's slots in its own planes), or
        [L, P, page_size, H, D] with ``block_table`` (paged, as vLLM / SGLang caches: P pages of
        page_size token rows; SGLang's token pool is page_size 1). Any dtype (a byte copy);
        contiguous past the layer dim, whose stride may be anything (e.g. K and V as views of
        one [L, 2, ...] buffer).
    start : [B] int64, slot of each request's root: node j of its verified tree was written at
        slot start + j (what ``ModelRunner.forward_tree`` does).
    accept_nodes, accept_count, node_offsets : verify's outputs ([B, W] flat node ids: root, then
        the accepted path, -1 padded; [B]) and the [B + 1] node layout it verified.
        accept_count = -1 marks an inactive request: nothing is read or moved for it.
    block_table : [B, pages_per_request] int32/int64, logical page -> physical page; pages
        holding a request's slots >= start must not be shared with another request.

    Slot start + d then holds the K/V of the path's node at depth d (d = 0..accept_count).
    Rows already in place are not moved: a chain moves nothing (its rollback is the shorter
    length alone; a caller that tracks lengths itself need not call this for chains at all).
    Returns ``lengths`` [B] int64 = start + accept_count + 1 and ``freed_pages`` [B, F]
    (block_table's dtype, F = ceil((W - 1) / page_size); [B, 0] int64 when contiguous): the
    block-table entries of the pages the verified block used (slots < start + its nodes) beyond
    those the new length keeps, -1 padded. Bad data (a path that is not root-first increasing
    ids of its request, counts out of range, start or the block beyond the cache, short block
    tables, page ids outside [0, P)) raises ValueError; on CUDA without the read-back
    (:func:`sync_checks`) such a request is left untouched with length -1.

    Examples
    --------
    >>> import torch, dspark
    >>> k = torch.arange(8.).view(1, 1, 1, 8, 1); v = -k.clone()    # L = B = H = D = 1, S = 8
    >>> offsets = torch.tensor([0, 5])                               # one tree of 5 nodes ...
    >>> nodes, count = torch.tensor([[0, 2, 4, -1, -1]]), torch.tensor([2])  # path 0 -> 2 -> 4
    >>> res = dspark.ops.kv_commit(k, v, torch.tensor([3]), nodes, count, offsets)  # ... at 3..7
    >>> k.flatten().tolist(), res.lengths.tolist()
    ([0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 6.0, 7.0], [6])
    """
    return KvCommitResult(*torch.ops.dspark.kv_commit(k_cache, v_cache, start, accept_nodes,
                                                      accept_count, node_offsets, block_table))


SCHEDULE_MODES = ("sync", "async", "threshold", "fixed")


def schedule_prefix(confidences: torch.Tensor, draft_lengths: torch.Tensor,
                    sps: Optional[torch.Tensor] = None, mode: str = "sync",
                    threshold: float = 0.0, budget: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Verify lengths of a speculative step from calibrated confidences (the prefix scheduler,
    docs/method.md "Scheduling"; spec: dspark.reference.schedule_prefix). One kernel, static
    shapes, no host sync (capturable in a CUDA graph; see :func:`sync_checks`).

    confidences : [R, gamma] float32 in [0, 1], gamma <= 32, R * gamma <= 16384.
        c[r, j] = P(draft j accepted | drafts before j accepted); entries at j >= draft_lengths[r]
        are never read. The prefix survival is a[r, j] = c[r, 0] * ... * c[r, j].
    draft_lengths : [R] int64 in [0, gamma]: drafts request r proposed.
    sps : [Bmax] float32 > 0 or None: steps per second of a verify forward of B = index + 1
        tokens (:func:`dspark.scheduler.load_sps`); required for mode "sync".
    mode : "sync" — Algorithm 1: every request sends its anchor (B = R, expected tokens
        tau = R); draft positions are admitted in decreasing order of a (ties: smaller j, then
        smaller r; a < 2^-44 never), each adding 1 to B and a to tau, while
        Theta = tau * SPS(B) rises strictly; the first that does not (or whose B > Bmax) stops
        the scan. That early stop keeps the output distribution exact.
        "async" — the first ``budget`` ([] int64, clamped to [0, candidates]) positions of the
        same ranking, no stop; the budget comes from :func:`schedule_budget` on confidences two
        steps old. "threshold" — the leading drafts with c >= ``threshold`` (in [0, 1]).
        "fixed" — every draft.
    Returns lengths [R] int64, 0 <= lengths[r] <= draft_lengths[r]: verify the first lengths[r]
    drafts of request r (its verify block is 1 + lengths[r] tokens, anchor included).

    Examples
    --------
    >>> import torch, dspark
    >>> c = torch.tensor([[0.9, 0.9, 0.5], [0.6, 0.5, 0.9]])
    >>> sps = torch.tensor([100., 99., 98., 97., 96., 60., 50., 40.])  # slower from B = 6 on
    >>> lengths = torch.tensor([3, 3])
    >>> dspark.ops.schedule_prefix(c, lengths, sps).tolist()  # a = .9 .81 .6 admitted, .405 not
    [2, 1]
    >>> dspark.ops.schedule_budget(c, lengths, sps).item()
    3
    >>> dspark.ops.schedule_prefix(c, lengths, mode="threshold", threshold=0.55).tolist()
    [2, 1]
    """
    return torch.ops.dspark.schedule_prefix(confidences, draft_lengths, sps, mode, threshold,
                                            budget)


def schedule_budget(confidences: torch.Tensor, draft_lengths: torch.Tensor,
                    sps: torch.Tensor) -> torch.Tensor:
    """The asynchronous scheduler's draft-token budget K ([] int64; spec:
    dspark.reference.schedule_budget): the greedy path of :func:`schedule_prefix` (sync) run to
    its end without the early stop, K = the first n maximising Theta_n = tau_n * SPS(R + n) over
    n = 0..candidates with R + n <= Bmax. Pass confidences from two steps back (independent of
    the current drafts, which is what lets it search past a non-improvement without biasing the
    output); the current step then admits its top K with ``schedule_prefix(mode="async")``.
    Shapes as in :func:`schedule_prefix`; one kernel, no host sync."""
    return torch.ops.dspark.schedule_budget(confidences, draft_lengths, sps)
