"""Continuous batching: more requests than batch slots, a finished request's slot refilled with
the next prompt while the others keep generating (``SpeculativeEngine.serve``).

Why: ``generate()`` runs a static batch until its slowest request ends. Plain decoding of
equal-length requests ends them together, but speculation ends each at its own pace: on the
benchmark pair (H100, 2026-12-06 s13) a speculative batch of 32-128 took 1.85x (code) and 2.33x
(chat) the mean request's rounds, so its aggregate rate was about half its per-request rate (at
batch 128, fixed γ 7 decoded 2.07x faster per user and only 1.02x faster in aggregate).

How: the state buffers, the target's KV cache and the drafter's buffers keep their batch shape
(so every captured step graph stays valid); after each step the host reads which slots finished
(one step late, like the engine's loop, so it never waits on the step it just queued), copies
their tokens out and refills those slots in place: the new prompt's row of the state
(``SpecState.reset_rows``), its prefill into the slot's cache row only
(``ModelRunner.prefill_rows``, graphed per (rows, bucket)), the first token sampled from it
(``commit_first_rows``) and the drafter's per-row start (``Drafter.start_rows``: DSpark,
DFlash, EAGLE-3, draft model, n-gram). Every token is still drawn by the same ops from the
target's distribution given the committed prefix, so each request's output distribution is the
one ``generate()`` gives it (greedy: the same tokens up to last-bit differences of a prefill
batched with other prompts or alone). With ``ar_fallback`` the first call at a load (slots,
block, sampling) probes as ``generate()``'s does and later calls keep its choice.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Sequence

import torch

from . import ops
from .metrics import Metrics


def serve(engine, prompts: Sequence, slots: int, *, speculative: bool = True, **kw):
    """``engine.generate`` / ``generate_autoregressive`` over ``prompts`` with at most ``slots``
    requests in flight; keyword arguments as there (scalar or one per prompt). Returns a
    ``Generation`` in prompt order; its metrics count the whole run (aggregate tokens/s over the
    wall time, per-user tokens/s over each request's time in a slot, tau per request-round)."""
    from .engine import Generation  # (engine imports this module)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
    d = engine.drafter if speculative else None
    if speculative and d is None:
        raise ValueError("this engine has no drafter: serve(..., speculative=False)")
    prompts = engine._tokenize(prompts)  # (a named error for no prompts)
    n = len(prompts)
    per = engine._request_kw(kw, n)  # every request checked up front, not at its refill
    if speculative and not d.refillable:
        raise ValueError(f"{type(d).__name__} cannot refill single requests (continuous "
                         f"batching): use a trained, draft-model or n-gram drafter")
    slots = min(slots, n)

    def of(reqs) -> dict:  # the generate() keyword arguments of these requests
        return {k: [v[r] for r in reqs] for k, v in per.items()}

    t0 = time.perf_counter()
    if speculative and engine.scheduler is not None:
        engine.scheduler.check(d)
        engine.scheduler.prepare(engine.target, slots, d.max_nodes)
    reserve = (max(len(p) for p in prompts), max(per["max_new_tokens"]),
               max(len(s) for s in per["stop_tokens"]))
    taps = d.target_taps if speculative else ()
    first = list(range(slots))
    st, timer, hidden = engine._start([prompts[r] for r in first], taps, of(first), speculative,
                                      reserve)
    # ar_fallback: the load's choice as in generate() (the first call at a load probes)
    gate = engine.fallback if speculative else None
    load = (slots, d.max_nodes if speculative else 1, max(per["temperature"]) > 0)
    if gate is not None and gate.choices.get(load) is not None and gate.choices[load].plain:
        d = None  # plain decoding at this load: no drafter to start or refill
    if d is not None:
        with timer("prefill"):
            d.setup(st.batch, st.capacity)
            d.start(st, hidden)
            if engine.scheduler is not None:
                engine.scheduler.start(st, d)
    if gate is not None:
        step = gate.stepper(engine, st, timer, load)
    elif speculative:
        step = lambda: engine._step(st, timer)  # noqa: E731
    else:
        step = lambda: engine._decode_step(st, timer)  # noqa: E731
    owner = list(first)  # the request in each slot (None: idle)
    now = time.perf_counter()  # (after the prefill: a request's time counts its steps only)
    began = {r: (0, now) for r in first}  # request -> (step, time) it entered its slot
    ended: dict = {}  # request -> (steps in its slot, seconds)
    out: list = [None] * n
    queue = deque(range(slots, n))
    refilled = [0] * slots  # the step after which a slot's current request started
    flags = [torch.zeros(slots, dtype=torch.bool) for _ in range(2)]
    cuda = st.tokens.device.type == "cuda"
    if cuda:
        flags = [f.pin_memory() for f in flags]
    events = [torch.cuda.Event() if cuda else None for _ in range(2)]
    prev, k = None, 0
    with engine._graphs_enabled(d is None or d.graphable), ops.sync_checks(False):
        while any(o is not None for o in owner):
            step()
            k += 1
            flag, event = flags[k % 2], events[k % 2]
            flag.copy_(st.active, non_blocking=cuda)
            if cuda:
                event.record()
            if prev is not None:  # the flags of step k - 1 (step k is already queued)
                if cuda:
                    prev[1].synchronize()
                done = [b for b, r in enumerate(owner)
                        if r is not None and refilled[b] < k - 1 and not bool(prev[0][b])]
                if done:
                    _harvest(st, done, owner, out, began, ended, k - 1)
                    _refill(engine, st, d, timer, done, owner, queue, prompts, of, began,
                            refilled, k, taps)
            prev = (flag, event)
    if gate is not None:
        gate.finish()  # a probing call's measurements: the load's choice
    text = None
    if engine.tokenizer is not None:
        text = [engine.tokenizer.decode(g, skip_special_tokens=True) for g in out]
    return Generation(out, text, _metrics(d, out, ended, timer, t0))


def _harvest(st, rows, owner, out, began, ended, step) -> None:
    """The finished requests in ``rows``: their tokens (cut at max_new / a stop token)."""
    gens = st.outputs(rows)
    now = time.perf_counter()
    for b, gen in zip(rows, gens):
        r = owner[b]
        out[r] = gen
        # active from the step after it entered its slot to its last commit (found a step
        # late); a request whose only token came from its prefill was active in no round
        rounds = step - began[r][0] if len(gen) > 1 else 0
        ended[r] = (rounds, now - began[r][1])
        owner[b] = None


def _refill(engine, st, d, timer, rows, owner, queue, prompts, of, began, refilled, step,
            taps) -> None:
    """The next queued prompts into the free ``rows``: state row, cache row, first token,
    drafter context."""
    rows = [b for b in rows if queue][:len(queue)]
    if not rows:
        return
    reqs = [queue.popleft() for _ in rows]
    kw = of(reqs)
    with timer("prefill"):
        st.reset_rows(rows, [prompts[r] for r in reqs], kw["max_new_tokens"], kw["stop_tokens"],
                      ops.sampling_tensors(len(rows), kw["temperature"], kw["top_k"],
                                           kw["top_p"]), kw["seed"])
        fwd = engine.target.prefill_rows(rows, [prompts[r] for r in reqs], taps)
        idx = torch.as_tensor(rows, device=st.tokens.device)
        params = ops.SamplingTensors(*(p[idx] for p in st.params))
        first, _ = ops.sample(fwd.logits, params, st.seeds[idx], st.n_tokens[idx] - 1)
        st.commit_first_rows(rows, first)
        if d is not None:
            d.start_rows(st, rows, fwd.hidden)
    now = time.perf_counter()
    for b, r in zip(rows, reqs):
        owner[b] = r
        began[r] = (step, now)
        refilled[b] = step


def _metrics(d, out, ended, timer, t0) -> Metrics:
    total = time.perf_counter() - t0
    new = sum(len(g) for g in out)
    request_rounds = sum(s for s, _ in ended.values())
    from_rounds = sum(max(len(g) - 1, 0) for g in out)  # each first token came from its prefill
    user = [len(g) / t for g, (_, t) in zip(out, (ended[r] for r in range(len(out)))) if t > 0]
    times = timer.totals()
    prefill = times.get("prefill", 0.0)
    return Metrics(gamma=d.gamma if d is not None else 0, rounds=max(s for s, _ in ended.values()),
                   request_rounds=request_rounds, new_tokens=new,
                   tau=from_rounds / request_rounds if request_rounds else 1.0,
                   prefill_s=prefill, total_s=total,
                   tokens_per_s=new / total, decode_tokens_per_s=new / max(total - prefill, 1e-9),
                   user_tokens_per_s=sum(user) / max(len(user), 1))
