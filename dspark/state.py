"""Per-request decoding state, owned by the engine, and the packed proposal a drafter returns.

``SpecState`` lives on the model's device and is updated in place by the engine's step (no host
sync); drafters read it and never write it. ``Proposal`` is the packed token-tree layout that
``dspark.ops.verify`` and the runner's ``forward_tree`` take. ``cache_len`` is the one rule for
how many KV-cache slots a model needs beyond its committed tokens.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import ops
from .ops import SamplingTensors
from .reference import GREEDY_T

DRAFT_SEED_XOR = 0x5DEECE66D  # drafter coins are keyed by seed ^ this: independent of verify's


def cache_len(tokens: int, block: int) -> int:
    """KV-cache slots for up to ``tokens`` committed tokens plus one block of ``block`` rows
    written right after them (a verify block or a draft block: slots up to tokens - 1 + block),
    plus one spare slot."""
    return tokens + block + 1


class Proposal(NamedTuple):
    """Packed token trees, the layout ``dspark.ops.verify`` takes: request r owns nodes
    ``node_offsets[r]:node_offsets[r+1]``; node 0 of each request is the root = the anchor token
    (``SpecState.anchor()``, the last committed token, not yet in the target KV cache);
    ``parents`` are local ids (-1 at the root, else smaller than the node's id). The node count N
    and the drafter's ``max_nodes`` are static (shape-only), so CUDA graphs can replay the step."""
    draft_tokens: torch.Tensor  # [N] i64, root (anchor) first in every request
    parents: torch.Tensor  # [N] i64 local parent ids, -1 at the root
    draft_probs: Optional[torch.Tensor]  # [N, V] distribution each node was drawn from, or None
    node_offsets: torch.Tensor  # [R + 1] i64


_serials = itertools.count(1)


@dataclass
class SpecState:
    """Per-request decoding state, all on the model's device.

    tokens[b, :n_tokens[b]] are the committed tokens (prompt, then generated); the last one is the
    anchor, at position n_tokens[b] - 1, which is also the target KV cache length.

    The engine allocates the buffers once per shape (:meth:`allocate`) and refills them for every
    generate() call (:meth:`reset`), so CUDA graphs captured over them stay valid; ``serial``
    names one allocation. :meth:`commit` also keeps the round log: per step, which requests were
    active and how many drafts each accepted (written on the device: no host sync per step).
    """
    tokens: torch.Tensor  # [B, C] i64
    n_tokens: torch.Tensor  # [B] i64
    prompt_lens: torch.Tensor  # [B] i64
    max_new: torch.Tensor  # [B] i64
    stop_tokens: torch.Tensor  # [B, S] i64, -1 padded
    params: SamplingTensors
    seeds: torch.Tensor  # [B] i64
    active: torch.Tensor  # [B] bool: not finished
    prompts: list  # host copy of the prompts (list of lists of ints)
    round_active: Optional[torch.Tensor] = None  # [C, B] bool: active at the start of round i
    round_accepts: Optional[torch.Tensor] = None  # [C, B] i64: drafts accepted in round i
    # scheduled verification (dspark/schedule_step.py) also logs, per round, the drafts each
    # request verified and the tokens the scheduler expected the active requests to commit
    round_verified: Optional[torch.Tensor] = None  # [C, B] i64
    round_expected: Optional[torch.Tensor] = None  # [C] f64
    rounds: Optional[torch.Tensor] = None  # [] i64: rounds logged
    any_active: Optional[torch.Tensor] = None  # [] bool: some request still active
    serial: int = 0
    # drafting temperature = the request's x draft_scale (given to reset): a sharper draft
    # distribution q where the drafter is under-confident; verify reads the q a draft was drawn
    # from, so any q keeps the output exact
    draft_temperature: Optional[torch.Tensor] = None  # [B] f32
    draft_scale: float = 1.0
    # every request greedy (set on the host from the host lists given to reset / reset_rows):
    # verify then ignores the draft distributions, so drafters need not make them (a round
    # without q rows: no probability kernels, verify's one-hot path) and the engine passes none
    greedy: bool = False

    def __post_init__(self):
        if self.draft_temperature is None:  # (a state built directly, as some tests do)
            self.draft_temperature = self.params.temperature * self.draft_scale

    @classmethod
    def allocate(cls, batch: int, capacity: int, stop_width: int, device) -> "SpecState":
        """Zeroed buffers for ``batch`` requests of up to ``capacity`` tokens and ``stop_width``
        stop tokens each (a step commits at least one token per active request, so ``capacity``
        rounds always fit the round log)."""
        def z(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)
        B, C = batch, capacity
        params = SamplingTensors(z(B, dtype=torch.float32), z(B), z(B, dtype=torch.float32))
        return cls(tokens=z(B, C), n_tokens=z(B), prompt_lens=z(B), max_new=z(B),
                   stop_tokens=z(B, stop_width), params=params, seeds=z(B),
                   active=z(B, dtype=torch.bool), prompts=[],
                   round_active=z(C, B, dtype=torch.bool), round_accepts=z(C, B),
                   round_verified=z(C, B), round_expected=z(C, dtype=torch.float64), rounds=z(),
                   any_active=z(dtype=torch.bool), serial=next(_serials),
                   draft_temperature=z(B, dtype=torch.float32))

    def reset(self, prompts: list, max_new: list, stop_tokens: list, params: SamplingTensors,
              seeds: list, draft_scale: float = 1.0) -> None:
        """Refill for a new set of requests (host lists; one host-to-device copy each);
        draft_scale: the drafting temperature over the request's (kept for reset_rows)."""
        self.draft_scale = draft_scale
        B, C = self.tokens.shape
        tokens = torch.zeros(B, C, dtype=torch.int64)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.as_tensor(p, dtype=torch.int64)
        S = self.stop_tokens.shape[1]
        stops = torch.tensor([list(s) + [-1] * (S - len(s)) for s in stop_tokens],
                             dtype=torch.int64)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        self.tokens.copy_(tokens)
        self.n_tokens.copy_(lens)
        self.prompt_lens.copy_(lens)
        self.max_new.copy_(torch.as_tensor(max_new, dtype=torch.int64))
        self.stop_tokens.copy_(stops)
        for mine, new in zip(self.params, params):
            mine.copy_(new)
        self.draft_temperature.copy_(self.params.temperature * self.draft_scale)
        self.greedy = _all_greedy(params.temperature)
        self.seeds.copy_(torch.as_tensor(seeds, dtype=torch.int64))
        self.active.fill_(True)
        self.round_active.zero_()
        self.round_accepts.zero_()
        self.round_verified.zero_()
        self.round_expected.zero_()
        self.rounds.zero_()
        self.any_active.fill_(True)
        self.prompts = [list(p) for p in prompts]

    def reset_rows(self, rows: list, prompts: list, max_new: list, stop_tokens: list,
                   params: SamplingTensors, seeds: list) -> None:
        """Refill the given rows for new requests (continuous batching, dspark/serve.py), the
        other rows untouched; the round log is the caller's (it is not per row). The int64
        fields travel as one host-to-device copy."""
        C, S = self.capacity, self.stop_tokens.shape[1]
        if any(len(p) > C for p in prompts) or any(len(s) > S for s in stop_tokens):
            raise ValueError(f"refilled prompts need <= {C} tokens and <= {S} stop tokens")
        dev = self.tokens.device
        k = len(rows)
        host = torch.zeros(k, C + 3 + S, dtype=torch.int64)  # tokens | len, max_new, seed | stops
        host[:, C + 3:] = -1  # (stop lists are -1 padded)
        for i, (p, s) in enumerate(zip(prompts, stop_tokens)):
            host[i, :len(p)] = torch.as_tensor(p, dtype=torch.int64)
            host[i, C + 3:C + 3 + len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
        host[:, C] = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        host[:, C + 1] = torch.as_tensor(max_new, dtype=torch.int64)
        host[:, C + 2] = torch.as_tensor(seeds, dtype=torch.int64)
        block = host.to(dev)
        idx = torch.as_tensor(rows, dtype=torch.int64, device=dev)
        self.tokens[idx] = block[:, :C]
        self.n_tokens[idx] = block[:, C]
        self.prompt_lens[idx] = block[:, C]
        self.max_new[idx] = block[:, C + 1]
        self.seeds[idx] = block[:, C + 2]
        self.stop_tokens[idx] = block[:, C + 3:]
        for mine, new in zip(self.params, params):
            mine[idx] = new.to(dev)
        self.draft_temperature[idx] = self.params.temperature[idx] * self.draft_scale
        # (a sampled row keeps the flag off until the next reset: rows finish at any time)
        self.greedy = self.greedy and _all_greedy(params.temperature)
        self.active[idx] = True
        self.any_active.fill_(True)
        for i, r in enumerate(rows):
            self.prompts[r] = list(prompts[i])

    def outputs(self, rows: Optional[list] = None) -> list:
        """Each request's generated tokens (``rows``: those rows, default all): what follows its
        prompt, cut at max_new_tokens and after the first stop token. One device-to-host copy."""
        C = self.capacity
        idx = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.int64,
                                                               device=self.tokens.device)
        block = torch.cat([self.tokens[idx], self.n_tokens[idx, None], self.max_new[idx, None],
                           self.stop_tokens[idx]], 1).cpu()
        out = []
        for i, b in enumerate(range(self.batch) if rows is None else rows):
            n, max_new = int(block[i, C]), int(block[i, C + 1])
            stops = set(block[i, C + 2:].tolist())
            gen = block[i, len(self.prompts[b]):n].tolist()[:max_new]
            for j, t in enumerate(gen):
                if t in stops:
                    gen = gen[:j + 1]
                    break
            out.append(gen)
        return out

    def commit_first_rows(self, rows: list, first: torch.Tensor) -> None:
        """The token sampled from the refilled rows' prefill logits (first [len(rows)]),
        committed by ``dspark::commit_tokens`` on a copy of those rows (the other rows and the
        round log untouched): a row finishes at once if it is a stop token or max_new is 1."""
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.tokens.device)
        k, dev = len(rows), self.tokens.device
        tokens, n, active = self.tokens[idx], self.n_tokens[idx], self.active[idx]
        ops.commit_tokens(tokens, n, active, first[:, None], torch.zeros_like(first),
                          self.stop_tokens[idx], self.prompt_lens[idx], self.max_new[idx],
                          torch.zeros(1, k, dtype=torch.bool, device=dev),
                          torch.zeros(1, k, dtype=torch.int64, device=dev),
                          torch.zeros((), dtype=torch.int64, device=dev),
                          torch.zeros((), dtype=torch.bool, device=dev))
        self.tokens[idx], self.n_tokens[idx], self.active[idx] = tokens, n, active

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def anchor_pos(self) -> torch.Tensor:
        return self.n_tokens - 1

    def anchor(self) -> torch.Tensor:
        return self.tokens.gather(1, (self.n_tokens - 1)[:, None])[:, 0]

    def draft_seeds(self) -> torch.Tensor:
        return self.seeds ^ DRAFT_SEED_XOR

    def draft_params(self) -> SamplingTensors:
        """What drafters sample with: the request's top-k / top-p at the drafting temperature."""
        return SamplingTensors(self.draft_temperature, self.params.top_k, self.params.top_p)

    def commit(self, out_tokens: torch.Tensor, accept_count: torch.Tensor) -> None:
        """One round's result, in place (one ``dspark::commit_tokens`` kernel): append
        ``accept_count + 1`` tokens of out_tokens [B, W] per active request, clear ``active``
        where a stop token was committed or max_new is reached, log the round (the active flags
        at its start and the accepted counts) and refresh ``any_active``. No host sync."""
        ops.commit_tokens(self.tokens, self.n_tokens, self.active, out_tokens, accept_count,
                          self.stop_tokens, self.prompt_lens, self.max_new, self.round_active,
                          self.round_accepts, self.rounds, self.any_active)

    def commit_first(self, first: torch.Tensor) -> None:
        """The token sampled from the prefill logits [B]: committed, but not a round."""
        self.commit(first[:, None], torch.zeros_like(first))
        self.round_active[0].zero_()
        self.round_accepts[0].zero_()
        self.rounds.zero_()


def _all_greedy(temperature: torch.Tensor) -> bool:
    """Every temperature below the kernels' greedy threshold (host tensors: no device sync)."""
    return bool((temperature.float() < GREEDY_T).all())


def chain_proposal(anchor: torch.Tensor, drafts: torch.Tensor,
                   probs: Optional[torch.Tensor] = None) -> Proposal:
    """Pack chains: anchor [B], drafts [B, G] -> N = B * (G + 1) nodes; probs [B, G, V] or None
    (the root's row is unused by verify and set to the first draft's row)."""
    B, G = drafts.shape
    dev = drafts.device
    tokens = torch.cat([anchor[:, None], drafts], 1).reshape(-1)
    parents = (torch.arange(G + 1, device=dev) - 1).repeat(B)
    offsets = torch.arange(B + 1, device=dev) * (G + 1)
    if probs is not None:
        probs = torch.cat([probs[:, :1], probs], 1).reshape(B * (G + 1), -1)
    return Proposal(tokens, parents, probs, offsets)
