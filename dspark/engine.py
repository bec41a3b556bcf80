"""The speculative loop: draft -> one packed target verify -> dspark.ops.verify -> commit.

``SpeculativeEngine.generate`` runs speculative decoding; ``generate_autoregressive`` runs plain
decoding on the same runner with the same randomness keying (token after position p is drawn with
key (seed, p)), so greedy outputs are identical and sampled outputs have the same distribution.
"""
from __future__ import annotations

import contextlib
import time
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import ops
from .drafters import Drafter, DraftModelDrafter, NgramDrafter, SpecState
from .metrics import Metrics, StageTimer
from .models import ModelRunner, Transformer, commit_kv, load_model, load_tokenizer
from .ops import VerifyResult, sampling_tensors

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


# Autoregressive baseline: tokens decoded between two reads of the finished flags.
AR_TOKENS_PER_SYNC = 8


class SpeculativeEngine:
    def __init__(self, target: Union[Transformer, ModelRunner], drafter: Optional[Drafter] = None,
                 *, gamma: Optional[int] = None, tokenizer=None, max_len: Optional[int] = None,
                 use_cuda_graphs: Optional[bool] = None, compile: Union[bool, str] = False,
                 fused: Optional[bool] = None, batch_invariant: bool = False):
        # fused: the runner's dspark::fused_linear / decode_attention path for calls of up to
        # FUSED_MAX_ROWS rows (None: on for CUDA); batch_invariant: that path for every decode /
        # verify call (greedy speculative == greedy autoregressive at any batch size, bf16
        # included); compile: torch.compile the graphed bodies (see ModelRunner)
        if not isinstance(target, ModelRunner):
            target = ModelRunner(target, use_cuda_graphs, compile=compile, fused=fused,
                                 batch_invariant=batch_invariant)
        self.target = target
        self.drafter = drafter
        if gamma is not None and drafter is not None:
            drafter.gamma = gamma
        vocab = self.target.vocab_size
        if drafter is not None and drafter.vocab_size not in (None, vocab):
            raise ValueError(f"draft vocab size {drafter.vocab_size} != target vocab size {vocab}")
        self.tokenizer = tokenizer
        self.state: Optional[SpecState] = None  # the last generate() call's final state
        self.max_len = max_len or self.target.config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, target: str, draft: Optional[str] = None, ngram: Optional[int] = None,
                        gamma: int = 4, tree_topk: int = 1, device="cpu", dtype=None, **kw):
        """Target (and draft model) from HF checkpoint dirs; ``ngram`` = max n of prompt lookup."""
        model = load_model(target, device, dtype)
        drafter = None
        if draft is not None:
            drafter = DraftModelDrafter(load_model(draft, device, model.dtype), gamma, tree_topk)
        elif ngram is not None:
            drafter = NgramDrafter(gamma, max_ngram=ngram)
        return cls(model, drafter, tokenizer=load_tokenizer(target), **kw)

    # ---- the speculative step ----------------------------------------------------------------
    def _step(self, st: SpecState, timer: StageTimer) -> VerifyResult:
        """One speculative step for all requests; no host sync inside."""
        d, W = self.drafter, self.drafter.max_nodes
        root = st.anchor_pos()  # [B] anchor positions = target KV lengths
        with timer("draft"):
            prop = d.propose(st)  # packed trees: [N] tokens/parents, [N, V] probs | None, [B+1]
        with timer("verify"):
            fwd = self.target.verify(prop.draft_tokens, prop.parents, prop.node_offsets, root, W,
                                     d.target_taps)  # logits [N, V], taps [n, N, hidden]
            res = ops.verify(fwd.logits, prop.node_offsets, prop.draft_tokens, prop.parents,
                                 prop.draft_probs, st.params, seeds=st.seeds, positions=root,
                                 max_nodes=W)  # out_tokens [B, W], accept_count [B]
        if not d.is_chain:  # tree: move the accepted path's K/V into slots root + depth
            commit_kv(self.target.cache, root, res.accept_nodes - prop.node_offsets[:-1, None],
                      res.accept_count)
        st.append(res.out_tokens, res.accept_count)  # chain rollback = lengths only
        d.commit(st, prop, res, root, fwd.hidden)
        return res

    @torch.inference_mode()
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], **kw) -> Generation:
        """Speculative decoding. Keyword arguments (scalar or one per request): max_new_tokens
        (default 128), temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed, and
        stop_tokens (ids for all requests or one list per request; default: the target's EOS)."""
        if self.drafter is None:
            raise ValueError("this engine has no drafter: use generate_autoregressive()")
        t0 = time.perf_counter()
        d = self.drafter
        bar = kw.pop("progress", False)
        st, timer, hidden = self._start(prompts, d.max_nodes, d.target_taps, kw)
        with timer("prefill"):
            self.drafter.setup(st.batch, st.capacity)
            self.drafter.start(st, hidden)
        accepts, actives = [], []
        # Inputs were validated in _start: CUDA ops need not read their status back (no sync).
        with ops.sync_checks(False):
            with _progress(st, bar) as tick:
                while bool(st.active.any()):  # the one host sync per step
                    actives.append(st.active.clone())
                    accepts.append(self._step(st, timer).accept_count)
                    tick()
        return self._finish(st, timer, t0, self.drafter.gamma, accepts, actives)

    @torch.inference_mode()
    def generate_autoregressive(self, prompts: Union[Prompt, Sequence[Prompt]], **kw) -> Generation:
        """Plain decoding on the same runner (the baseline); same arguments as :meth:`generate`."""
        t0 = time.perf_counter()
        bar = kw.pop("progress", False)
        st, timer, _ = self._start(prompts, 1, (), kw)
        steps = 0
        # The finished flags are read back (a host sync) once per AR_TOKENS_PER_SYNC tokens, so
        # the GPU runs ahead of this Python loop instead of idling after every token. A chunk
        # never exceeds the steps the longest request may still take; steps of finished
        # requests commit nothing (append skips inactive rows), so at most AR_TOKENS_PER_SYNC - 1
        # steps are spent after every request stopped on a stop token.
        left = int(st.max_new.max()) - 1  # the first new token came with the prefill
        with ops.sync_checks(False), _progress(st, bar) as tick:  # validated in _start: no sync
            while bool(st.active.any()):
                for _ in range(max(1, min(AR_TOKENS_PER_SYNC, left))):
                    steps += 1
                    left -= 1
                    with timer("verify"):
                        root = st.anchor_pos()
                        logits = self.target.decode(st.anchor(), root)
                        tok, _ = ops.sample(logits, st.params, st.seeds, root)
                    st.append(tok[:, None], torch.zeros_like(tok))
                    tick()
        gen = self._finish(st, timer, t0, 0, [], [])
        gen.metrics.rounds = steps
        return gen

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

    def _start(self, prompts, room: int, taps, kw):
        unknown = set(kw) - {"max_new_tokens", "temperature", "top_k", "top_p", "seed",
                             "stop_tokens"}
        if unknown:
            raise TypeError(f"unknown generate() arguments {sorted(unknown)}")
        prompts = self._tokenize(prompts)
        B = len(prompts)
        max_new = _per_request(kw.get("max_new_tokens", 128), B, "max_new_tokens")
        temp = _per_request(kw.get("temperature", 0.0), B, "temperature")
        top_k = _per_request(kw.get("top_k", 0), B, "top_k")
        top_p = _per_request(kw.get("top_p", 1.0), B, "top_p")
        seed = _per_request(kw.get("seed", 0), B, "seed")
        if min(max_new) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {min(max_new)}")
        if min(temp) < 0 or min(top_k) < 0 or not all(0 < p <= 1 for p in top_p):
            raise ValueError("need temperature >= 0, top_k >= 0 and top_p in (0, 1]")
        stops = kw.get("stop_tokens")
        if stops is None:
            stops = list(self.target.config.eos_token_ids)
        if not (len(stops) and isinstance(stops[0], (list, tuple))):
            stops = [list(stops)] * B
        stops = _per_request(stops, B, "stop_tokens")
        longest = max(len(p) for p in prompts)
        need = longest + max(max_new) + 2 * room + 1
        if need > self.max_len:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max(max_new)} + "
                             f"{2 * room + 1} draft slots exceeds the cache length {self.max_len}")
        cap = min(-(-need // 64) * 64, self.max_len)  # round up: fewer graph re-captures
        dev = self.target.device
        timer = StageTimer(dev)
        with timer("prefill"):
            self.target.allocate(B, cap)
            fwd = self.target.prefill(prompts, taps)
            lens = torch.tensor([len(p) for p in prompts], device=dev)
            params = sampling_tensors(B, temp, top_k, top_p, dev)
            seeds = torch.tensor(seed, dtype=torch.int64, device=dev)
            first, _ = ops.sample(fwd.logits, params, seeds, lens - 1)
            tokens = torch.zeros(B, cap, dtype=torch.int64)
            for b, p in enumerate(prompts):
                tokens[b, :len(p)] = torch.tensor(p)
            S = max(1, max(len(s) for s in stops))
            stop_t = torch.tensor([list(s) + [-1] * (S - len(s)) for s in stops], dtype=torch.int64)
            st = SpecState(tokens=tokens.to(dev), n_tokens=lens.clone(), prompt_lens=lens,
                           max_new=torch.tensor(max_new, device=dev), stop_tokens=stop_t.to(dev),
                           params=params, seeds=seeds,
                           active=torch.ones(B, dtype=torch.bool, device=dev),
                           prompts=prompts)
            st.append(first[:, None], torch.zeros_like(first))
        self.state = st
        return st, timer, fwd.hidden

    def _finish(self, st: SpecState, timer: StageTimer, t0: float, gamma: int, accepts, actives):
        tokens, n = st.tokens.cpu(), st.n_tokens.cpu()
        stops, max_new = st.stop_tokens.cpu().tolist(), st.max_new.cpu().tolist()
        out = []
        for b, prompt in enumerate(st.prompts):
            gen = tokens[b, len(prompt):int(n[b])].tolist()[:max_new[b]]
            for i, t in enumerate(gen):
                if t in stops[b]:
                    gen = gen[:i + 1]
                    break
            out.append(gen)
        times = timer.totals()
        total = time.perf_counter() - t0
        B = st.batch
        acc = torch.stack(accepts).cpu() if accepts else torch.zeros(0, B, dtype=torch.long)
        act = torch.stack(actives).cpu() if actives else torch.zeros(0, B, dtype=torch.bool)
        metrics = Metrics.from_rounds(gamma, acc, act, sum(map(len, out)), times, total)
        text = None
        if self.tokenizer is not None:
            text = [self.tokenizer.decode(g, skip_special_tokens=True) for g in out]
        return Generation(out, text, metrics)
