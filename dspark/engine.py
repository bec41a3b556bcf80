"""The speculative loop: draft -> one packed target forward -> dspark.ops.verify -> commit.

``SpeculativeEngine.generate`` runs speculative decoding; ``generate_autoregressive`` runs plain
decoding on the same runner with the same randomness keying (token after position p is drawn with
key (seed, p)), so greedy outputs are identical and sampled outputs have the same distribution.

On CUDA every stage of a step (draft, target forward, accept, commit; the autoregressive decode
step) is replayed from a CUDA graph over buffers that persist across steps and calls
(:mod:`dspark.graphs`), and the host runs one step ahead of the GPU: it reads the finished flags
of step k only after step k+1 is queued, so the GPU never waits for Python.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import ops
from .drafters import Drafter, NgramDrafter, load_drafter
from .fallback import FallbackGate
from .graphs import StageGraphs
from .metrics import Metrics, StageTimer, clip_rounds
from .models import ModelRunner, Transformer, load_model, load_tokenizer
from .models.transformer import FUSED_MAX_BLOCK
from .ops import sampling_tensors
from .schedule_step import SPSSource, VerifyBatch, VerifyScheduler
from .scheduler import parse_schedule
from .serve import serve
from .state import SpecState, cache_len

Prompt = Union[str, Sequence[int]]


class Generation(NamedTuple):
    tokens: list  # per request: generated token ids (stop token included, if hit)
    text: Optional[list]  # per request: decoded text, when the engine has a tokenizer
    metrics: Metrics


def _per_request(x, B: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != B:
            raise ValueError(f"{name} has {len(x)} entries for {B} prompts")
        return list(x)
    return [x] * B


@contextlib.contextmanager
def _progress(st: SpecState, enabled: bool):
    """A tqdm bar over generated tokens (reads the token counts: one extra sync per step, so
    only when asked for)."""
    if not enabled:
        yield lambda: None
        return
    from tqdm import tqdm

    start = int(st.prompt_lens.sum())
    with tqdm(total=int(st.max_new.sum()), unit="tok", desc="generate") as bar:
        def tick():
            bar.n = min(bar.total, int(st.n_tokens.sum()) - start)
            bar.refresh()
        yield tick


class SpeculativeEngine:
    def __init__(self, target: Union[Transformer, ModelRunner], drafter: Optional[Drafter] = None,
                 *, gamma: Optional[int] = None, tokenizer=None, max_len: Optional[int] = None,
                 use_cuda_graphs: Optional[bool] = None, compile: Union[bool, str] = False,
                 fused: Optional[bool] = None, batch_invariant: bool = False,
                 nvtx: bool = False, stage_times: Optional[bool] = None,
                 schedule: Union[None, str, VerifyScheduler] = None, sps: SPSSource = None,
                 bucket_rows: Optional[bool] = None,
                 fused_max_rows: Union[int, str, None] = None,
                 step_overhead: float = 0.0, ar_fallback: Union[bool, float] = False,
                 precapture_buckets: bool = True, draft_temperature_scale: float = 1.0):
        # fused: the runner's dspark::fused_linear / decode_attention path for calls of up to
        # fused_max_rows rows (None: FUSED_MAX_ROWS; "auto": measured, dspark/crossover.py;
        # fused None: on for CUDA); batch_invariant:
        # that path for every decode / verify call (greedy speculative == greedy autoregressive
        # at any batch size, bf16 included); compile: torch.compile the graphed bodies of the
        # target (see ModelRunner) and of the drafter (Drafter.compile);
        # use_cuda_graphs: the runner's forwards and the engine's step stages (None: on CUDA);
        # nvtx: an NVTX range around every stage (for Nsight Systems); stage_times: time (and
        # on GPU graph) the draft / target forward / accept / commit stages apart (None: on CPU,
        # where it is free; off on GPU, where a step is one graph replay: fewer launches);
        # schedule: "fixed" (None: every draft verified) | "sync" | "async" | "threshold:X", or
        # a VerifyScheduler (dspark/schedule_step.py); sps: its steps-per-second table (None: the
        # runner's cached table, profiled on first use; a JSON path; an SPSTable; or the values
        # SPS(1), ...); bucket_rows: pad scheduled verifies to graph buckets (None: when graphs
        # are on); step_overhead: seconds a step costs besides the verify forward, for the
        # scheduler's ranking (VerifyScheduler); ar_fallback: True or a margin (default 0.05):
        # the first call at each new batch size times its speculation against plain decoding
        # steps; later calls there decode plainly unless speculation was faster by the margin
        # (dspark/fallback.py);
        # draft_temperature_scale: drafters sample at the request's temperature times this
        # (greedy requests stay greedy); verify reads the distribution each draft was drawn
        # from, so the output is exact at any scale, and < 1 sharpens an under-confident
        # drafter's proposals at T > 0;
        # precapture_buckets: a scheduled engine with graphs and row buckets captures the verify
        # graph of every bucket a batch size can use when its draft graph is captured (False:
        # each at its first use, after an eager step)
        if not isinstance(target, ModelRunner):
            target = ModelRunner(target, use_cuda_graphs, compile=compile, fused=fused,
                                 batch_invariant=batch_invariant, fused_max_rows=fused_max_rows)
        self.target = target
        self.drafter = drafter
        if compile and drafter is not None:  # the drafter's hot bodies too (Drafter.compile)
            drafter.compile(None if compile is True or compile == "default" else compile)
        if gamma is not None and drafter is not None:
            drafter.gamma = gamma
        if drafter is not None and drafter.max_nodes > FUSED_MAX_BLOCK:
            # a verify block is one decode_attention call per layer: its row limit bounds gamma
            # (a deeper block would also mostly be rejected work)
            raise ValueError(f"gamma {drafter.gamma} gives verify blocks of {drafter.max_nodes} "
                             f"tokens; at most {FUSED_MAX_BLOCK} are supported (gamma <= "
                             f"{FUSED_MAX_BLOCK - 1} for a chain)")
        vocab = self.target.vocab_size
        if drafter is not None and drafter.vocab_size not in (None, vocab):
            raise ValueError(f"draft vocab size {drafter.vocab_size} != target vocab size {vocab}")
        self.tokenizer = tokenizer
        self.state: Optional[SpecState] = None  # the last generate() call's final state
        self.max_len = max_len or self.target.config.max_position_embeddings
        self.nvtx = nvtx
        self.stage_times = (self.target.device.type != "cuda" or nvtx) if stage_times is None \
            else stage_times
        self.graphs = StageGraphs(self.target.use_cuda_graphs)
        # scheduled steps: capture every row bucket's verify graph once the draft graph exists
        self.precapture = precapture_buckets
        self.draft_temperature_scale = self.check_draft_temperature_scale(draft_temperature_scale)
        self.scheduler: Optional[VerifyScheduler] = None
        if isinstance(schedule, VerifyScheduler):
            self.scheduler = schedule
        elif schedule is not None and parse_schedule(schedule)[0] != "fixed":
            self.scheduler = VerifyScheduler(schedule, sps, bucket_rows, overhead=step_overhead)
        if self.scheduler is not None:
            if self.target.tensor_parallel:
                # each rank would profile its own SPS table and could pick another row bucket
                # than its peers: their collectives would then wait on each other forever
                raise ValueError(f"schedule {self.scheduler.spec!r} is not supported with a "
                                 f"tensor-parallel target yet: use schedule 'fixed'")
            if self.scheduler.buckets is None:
                self.scheduler.buckets = self.target.use_cuda_graphs
            if drafter is not None:
                self.scheduler.check(drafter)
        self.fallback: Optional[FallbackGate] = None
        if ar_fallback is not False and ar_fallback is not None:
            if self.target.tensor_parallel:  # ranks timing apart could choose apart: a hang
                raise ValueError("ar_fallback is not supported with a tensor-parallel target")
            self.fallback = FallbackGate() if ar_fallback is True else FallbackGate(ar_fallback)
        self._states: dict = {}  # (batch, capacity, stop width) -> persistent SpecState
        self._flags = None  # pinned host flags + events of the one-step-ahead loop

    @staticmethod
    def check_draft_temperature_scale(scale) -> float:
        """A drafting temperature scale, or a ValueError naming it."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not 0.0 < scale < float("inf"):
            raise ValueError(f"draft_temperature_scale must be a finite number > 0, got {scale!r}")
        return float(scale)

    @classmethod
    def from_pretrained(cls, target: str, drafter: Optional[str] = None,
                        ngram: Optional[int] = None, gamma: Optional[int] = None,
                        tree_topk: int = 1, device="cpu", dtype=None, tp=None,
                        drafter_mode: str = "replicated", **kw):
        """Target from an HF checkpoint dir; ``drafter`` a dir of any kind
        (:func:`dspark.drafters.load_drafter`: a trained DSpark / DFlash / EAGLE-3 drafter, or an
        HF causal LM as draft model) or ``ngram`` = max n of prompt lookup. ``gamma`` defaults to
        a trained drafter's block size, else 4. ``tp``: a :class:`dspark.distributed.
        TensorParallel` (every rank calls this): the target is loaded shard by shard
        (``dspark.models.tp``), the drafter ``replicated`` on every rank or run on rank 0 and
        its proposal ``broadcast`` (``drafter_mode``; see ``dspark.drafters.tp``)."""
        if drafter is not None and ngram is not None:
            raise ValueError("give a drafter dir or ngram, not both")
        d = None
        if tp is None:
            model = load_model(target, device, dtype)
            if drafter is not None:
                d = load_drafter(drafter, model, gamma, tree_topk=tree_topk)
        else:
            from .drafters.tp import load_drafter_tp
            from .models.tp_loader import load_model_tp
            model = load_model_tp(target, tp, device, dtype)
            if drafter is not None:
                d = load_drafter_tp(drafter, model, tp, gamma, tree_topk, drafter_mode)
        if ngram is not None:
            d = NgramDrafter(4 if gamma is None else gamma, max_ngram=ngram)
            if tp is not None:
                from .drafters.tp import place_drafter
                d = place_drafter(d, tp, drafter_mode)
        return cls(model, d, tokenizer=load_tokenizer(target), **kw)

    # ---- the speculative step ----------------------------------------------------------------
    def _step(self, st: SpecState, timer: StageTimer) -> None:
        """One speculative step for all requests; no host sync inside (but the row count of a
        sync / threshold scheduled step: dspark/schedule_step.py). On GPU the step replays one
        CUDA graph, or one per stage with ``stage_times`` (keyed by the buffers they read; a
        scheduled step: the draft and its verify lengths, then the verify of the row bucket the
        host picked); every value crossing stages is a graph output, so it is static."""
        d, W, g, s = self.drafter, self.drafter.max_nodes, self._graph_key(st), self.scheduler
        split = self.stage_times
        stage = (lambda name, key, fn: self._stage(timer, name, key, fn)) if split else \
            (lambda name, key, fn: fn())

        def draft():  # packed trees: [N] tokens/parents, [N, V] probs | None, [B+1] offsets
            root, prop = stage("draft", g, lambda: (st.anchor_pos(), d.propose(st)))
            lengths = None if s is None else stage("schedule", g, lambda: s.lengths(st, d))
            return root, prop, lengths  # scheduled: l [B] and sum(l)

        def verify(root, prop, lengths, key, rows=None):  # rows: (count, scratch width)
            # rows None: fixed gamma, or every draft admitted (the proposal as it is)
            vb = VerifyBatch.full(prop, st, root, W) if rows is None else stage(
                "schedule", key, lambda: s.pack(st, prop, root, lengths[0], *rows))
            fwd = stage("target forward", key, lambda: self.target.forward_tree(  # [N, V]
                vb.proposal.draft_tokens, vb.proposal.parents, vb.forward_offsets(), root, W,
                d.target_taps, layout=vb.layout))
            # greedy requests accept a draft iff it is the argmax: no q (the one-hot path)
            q = None if st.greedy else vb.proposal.draft_probs
            res = stage("accept", key, lambda: ops.verify(  # out_tokens / accept_nodes [B', W']
                fwd.logits, vb.proposal.node_offsets, vb.proposal.draft_tokens,
                vb.proposal.parents, q, vb.params, seeds=vb.seeds,
                positions=vb.positions, max_nodes=vb.max_nodes))
            stage("commit", key, lambda: self._commit(st, root, prop,
                                                      *vb.restore(prop, res, fwd.hidden)))
        whole = (lambda key, fn, shared=False: fn()) if split else self.graphs
        with contextlib.nullcontext() if split else timer("step"):
            if s is None:  # fixed gamma: the step is one graph (or one per stage)
                return whole(("step", g), lambda: verify(*draft(), g))
            # scheduled: the host picks the verify's row bucket between drafting and verifying;
            # the buckets' verify graphs share one memory pool (they return nothing)
            root, prop, lengths = whole(("draft step", g), draft)
            if not split and self.precapture and s.buckets \
                    and self.graphs.has(("draft step", g)) and g not in self.graphs.precaptured:
                # every row bucket's verify graph now (the draft graph's outputs are static
                # from here on), not at its first use mid-generation: there an eager step and
                # a capture cost tens of ms each (s12, H100: scheduled runs of ~1 s took
                # 0.3-0.5 s longer than fixed gamma's, whatever their round count)
                self.graphs.precaptured.add(g)
                for shape in s.shapes(st.batch, W, d.gamma):
                    k = (*g, *(shape or ("full",)))
                    self.graphs.capture(("verify step", k), functools.partial(
                        verify, root, prop, lengths, k, shape), True)
            rows = s.rows(st, d, lengths[1])
            key = (*g, *(rows or ("full",)))
            whole(("verify step", key), lambda: verify(root, prop, lengths, key, rows), True)

    def _stage(self, timer: StageTimer, name: str, key: tuple, fn):
        with timer(name):
            return self.graphs((name, key), fn)

    def _commit(self, st, root, prop, res, hidden) -> None:
        """res: [B, W] in ``prop``'s numbering; hidden: taps [n, N, hidden] of prop's rows."""
        if not self.drafter.is_chain:  # tree: the accepted path's K/V into slots root + depth
            self.target.commit(root, res.accept_nodes, res.accept_count, prop.node_offsets)
        st.commit(res.out_tokens, res.accept_count)  # chain rollback = lengths only
        self.drafter.commit(st, prop, res, root, hidden)

    def _decode_step(self, st: SpecState, timer: StageTimer) -> None:
        """One autoregressive step (the baseline): decode, sample, commit, as one graph."""
        def step():
            root = st.anchor_pos()
            logits = self.target.decode(st.anchor(), root)
            tok, _ = ops.sample(logits, st.params, st.seeds, root)
            st.commit(tok[:, None], torch.zeros_like(tok))
        with timer("target forward"):
            self.graphs(("decode", self._graph_key(st)), step)

    def _graph_key(self, st: SpecState) -> tuple:
        """What the stage graphs read: the state buffers, the target's KV cache, the drafter (and
        the scheduler's buffers)."""
        d, s = self.drafter, self.scheduler
        drafter = () if d is None else (id(d), d.max_nodes, d.graph_key())
        key = (st.serial, st.greedy, self.target.cache_serial, drafter)
        return key if s is None else (*key, s.graph_key())

    def _run(self, st: SpecState, step, bar: bool) -> None:
        """Run ``step`` until no request is active. On CUDA the host stays one step ahead: it
        queues step k+1, then waits for step k's finished flag (a step with every request
        finished commits nothing, so the one extra step is harmless)."""
        with ops.sync_checks(False), _progress(st, bar) as tick:
            # inputs were validated in _start: CUDA ops need not read their status back
            if not bool(st.any_active):
                return
            if st.tokens.device.type != "cuda":
                while bool(st.any_active):
                    step()
                    tick()
                return
            if self._flags is None:
                self._flags = [(torch.zeros((), dtype=torch.bool).pin_memory(),
                                torch.cuda.Event()) for _ in range(2)]
            prev = None
            for k in range(st.capacity + 2):  # every step commits a token per active request
                step()
                flag, event = self._flags[k % 2]
                flag.copy_(st.any_active, non_blocking=True)
                event.record()
                if prev is not None:
                    prev[1].synchronize()
                    if not bool(prev[0]):
                        break
                prev = self._flags[k % 2]
                tick()

    @torch.inference_mode()
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], **kw) -> Generation:
        """Speculative decoding. Keyword arguments (scalar or one per request): max_new_tokens
        (default 128), temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed, and
        stop_tokens (ids for all requests or one list per request; default: the target's EOS)."""
        if self.drafter is None:
            raise ValueError("this engine has no drafter: use generate_autoregressive()")
        d = self.drafter
        prompts = self._tokenize(prompts)
        if self.scheduler is not None:  # an SPS table (profiled now if none is cached: untimed)
            self.scheduler.check(d)
            self.scheduler.prepare(self.target, len(prompts), d.max_nodes)
        t0 = time.perf_counter()
        bar = kw.pop("progress", False)
        st, timer, hidden = self._start(prompts, d.target_taps, kw, speculative=True)
        # ar_fallback's key: the load, the block, and whether any request samples (acceptance,
        # so the faster side, differs: s12, the pair at batch 1: DSpark 1.66x plain decoding
        # greedy, 0.98x at T = 1)
        sampled = max(_per_request(kw.get("temperature", 0.0), st.batch, "temperature")) > 0
        load = (st.batch, d.max_nodes, sampled)
        known = None if self.fallback is None else self.fallback.choices.get(load)
        with timer("prefill"):
            if known is None or not known.plain:  # (plain decoding at this load: no drafting)
                d.setup(st.batch, st.capacity)
                d.start(st, hidden)
                if self.scheduler is not None:
                    self.scheduler.start(st, d)
        if not d.graphable:
            self.graphs.clear()
        with self._graphs_enabled(d.graphable):
            step = (lambda: self._step(st, timer)) if self.fallback is None else \
                self.fallback.stepper(self, st, timer, load)
            self._run(st, step, bar)
            if self.fallback is not None:
                self.fallback.finish()  # a probing call's measurements: the load's choice
        return self._finish(st, timer, t0, d.gamma)

    @torch.inference_mode()
    def serve(self, prompts: Union[Prompt, Sequence[Prompt]], slots: int,
              speculative: bool = True, **kw) -> Generation:
        """Continuous batching (dspark/serve.py): every prompt decoded with at most ``slots``
        requests in flight, a finished request's slot refilled with the next prompt;
        ``speculative=False``: plain decoding the same way (the baseline). Keyword arguments as
        :meth:`generate`."""
        return serve(self, prompts, slots, speculative=speculative, **kw)

    @torch.inference_mode()
    def generate_autoregressive(self, prompts: Union[Prompt, Sequence[Prompt]], **kw) -> Generation:
        """Plain decoding on the same runner (the baseline); same arguments as :meth:`generate`."""
        t0 = time.perf_counter()
        bar = kw.pop("progress", False)
        st, timer, _ = self._start(self._tokenize(prompts), (), kw, speculative=False)
        self._run(st, lambda: self._decode_step(st, timer), bar)
        return self._finish(st, timer, t0, 0)

    @contextlib.contextmanager
    def _graphs_enabled(self, enabled: bool):
        was = self.graphs.enabled
        self.graphs.enabled = was and enabled
        try:
            yield
        finally:
            self.graphs.enabled = was

    # ---- setup and results -------------------------------------------------------------------
    def _tokenize(self, prompts) -> list:
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (pass token ids instead)")
                p = self.tokenizer.encode(p).ids
            p = [int(t) for t in p]
            if not p:
                raise ValueError("empty prompt: every prompt needs at least one token")
            bad = [t for t in p if not 0 <= t < self.target.vocab_size]
            if bad:
                raise ValueError(f"unknown token ids {bad[:5]} (vocab size "
                                 f"{self.target.vocab_size})")
            out.append(p)
        return out

    def _request_kw(self, kw: dict, B: int) -> dict:
        """generate()'s keyword arguments as one checked list per request each (unknown names
        a TypeError, bad values a ValueError); stop_tokens default to the target's EOS."""
        unknown = set(kw) - {"max_new_tokens", "temperature", "top_k", "top_p", "seed",
                             "stop_tokens"}
        if unknown:
            raise TypeError(f"unknown generate() arguments {sorted(unknown)}")
        out = {k: _per_request(kw.get(k, v), B, k) for k, v in
               (("max_new_tokens", 128), ("temperature", 0.0), ("top_k", 0), ("top_p", 1.0),
                ("seed", 0))}
        if min(out["max_new_tokens"]) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {min(out['max_new_tokens'])}")
        if min(out["temperature"]) < 0 or min(out["top_k"]) < 0 \
                or not all(0 < p <= 1 for p in out["top_p"]):
            raise ValueError("need temperature >= 0, top_k >= 0 and top_p in (0, 1]")
        stops = kw.get("stop_tokens")
        if stops is None:
            stops = list(self.target.config.eos_token_ids)
        if not (len(stops) and isinstance(stops[0], (list, tuple))):
            stops = [list(stops)] * B
        out["stop_tokens"] = _per_request(stops, B, "stop_tokens")
        return out

    def _start(self, prompts: list, taps, kw, speculative: bool, reserve=None):
        """prompts: token lists (_tokenize'd by the caller). reserve: (prompt tokens, new
        tokens, stop tokens) the state must also hold (continuous batching: later prompts)."""
        B = len(prompts)
        r = self._request_kw(kw, B)
        max_new, temp, top_k, top_p, seed, stops = (
            r[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed",
                           "stop_tokens"))
        longest, most_new = max(len(p) for p in prompts), max(max_new)
        if reserve is not None:
            longest, most_new = max(longest, reserve[0]), max(most_new, reserve[1])
        # a round may commit up to `room` tokens past max_new (cut in _finish), then a block of
        # `room` rows is written after the committed tokens. The autoregressive baseline sizes
        # its cache like the speculative run where that fits, so both share cache and buffers.
        room = self.drafter.max_nodes if self.drafter is not None else 1
        need = cache_len(longest + most_new + room, room)
        if not speculative and need > self.max_len:
            need = cache_len(longest + most_new + 1, 1)
        if need > self.max_len:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {most_new} + "
                             f"{need - longest - most_new} draft slots exceeds the cache "
                             f"length {self.max_len}")
        # capacity buckets of powers of two, and a cache that only grows for a batch size: calls
        # with other prompt lengths reuse the cache, the state buffers and the captured graphs
        cap = min(max(64, 1 << (need - 1).bit_length()), self.max_len)
        c = self.target.cache
        if c is not None and c.batch == B and cap <= c.max_len:
            cap = c.max_len
        S = max(1, max(len(s) for s in stops), reserve[2] if reserve is not None else 0)
        S = -(-S // 4) * 4  # stop-list width in steps of 4: fewer state shapes
        dev = self.target.device
        timer = StageTimer(dev, self.nvtx)
        with timer("prefill"):
            self.target.allocate(B, cap)
            st = self._states.get((B, cap, S))
            if st is None:
                self._states.clear()  # one set of state buffers (and of stage graphs) at a time
                self.graphs.clear()
                st = self._states[(B, cap, S)] = SpecState.allocate(B, cap, S, dev)
            st.reset(prompts, max_new, stops, sampling_tensors(B, temp, top_k, top_p), seed,
                     self.draft_temperature_scale)
            fwd = self.target.prefill(prompts, taps)
            first, _ = ops.sample(fwd.logits, st.params, st.seeds, st.n_tokens - 1)
            st.commit_first(first)
        self.state = st
        return st, timer, fwd.hidden

    def _finish(self, st: SpecState, timer: StageTimer, t0: float, gamma: int) -> Generation:
        out = st.outputs()
        times = timer.totals()
        total = time.perf_counter() - t0
        rounds = min(int(st.rounds), st.round_active.shape[0])
        act = st.round_active[:rounds].cpu()
        acc = st.round_accepts[:rounds].cpu()
        # tokens past max_new_tokens or a stop token were discarded: count only what each request
        # returned (its first token came from the prefill, not from a round)
        acc, act = clip_rounds(acc, act, [max(len(g) - 1, 0) for g in out])
        keep = act.any(1)  # drop the one step run after every request finished
        sched, verified, rows = {}, None, None
        s = self.scheduler if gamma else None
        if s is not None:  # what the scheduler verified and expected, per round
            verified, rows = st.round_verified[:rounds].cpu(), list(s.rows_log)
            expected = st.round_expected[:rounds].cpu()
            sched = dict(sps=s.table, schedule=s.spec)
        # rounds from `plain` on were plain decoding steps (ar_fallback): one row a request,
        # nothing verified
        plain = self.fallback.plain_from if gamma and self.fallback is not None else None
        if plain is not None:
            if verified is None:
                verified = torch.full((rounds, st.batch), gamma, dtype=torch.long)
                rows = [st.batch * self.drafter.max_nodes] * rounds
            verified[plain:] = 0
            rows = rows[:plain] + [st.batch] * (rounds - plain)
            if s is not None:
                expected[plain:] = 0
        if verified is not None:
            sched.update(verified=verified[keep],
                         rows=[r for r, k in zip(rows, keep.tolist()) if k])
        if s is not None:
            sched["expected"] = expected[keep]
        metrics = Metrics.from_rounds(gamma, acc[keep], act[keep], sum(map(len, out)), times,
                                      total, user_tokens=[len(g) for g in out], **sched)
        text = None
        if self.tokenizer is not None:
            text = [self.tokenizer.decode(g, skip_special_tokens=True) for g in out]
        return Generation(out, text, metrics)
