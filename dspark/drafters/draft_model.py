"""A separate small causal LM (same tokenizer) as the drafter, run by dspark's ModelRunner.

Chain mode (tree_topk = 1): gamma tokens sampled from the draft model with the request's sampling
parameters; draft_probs are the exact distributions sampled (exact rejection sampling).
Tree mode (tree_topk = k > 1): at each depth the k most likely draft tokens become children of
the main-chain node (the top-1 child continues the chain); children are deterministic, so
draft_probs is None. Nodes: root 0; depth d's children are ids 1 + (d-1)k .. dk, main child first.

Draft KV invariant: slots < ``draft_len[b]`` hold committed tokens. Each proposal first runs the
committed tokens draft_len..anchor (1..gamma+1 of them) as one causal block, then gamma - 1
single-token steps along the main chain.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import ops
from ..models import ModelRunner, Transformer
from ..state import Proposal, SpecState, cache_len, chain_proposal
from .base import Drafter


class DraftModelDrafter(Drafter):
    def __init__(self, model: Union[Transformer, ModelRunner], gamma: int = 4, tree_topk: int = 1,
                 use_cuda_graphs: Optional[bool] = None):
        if gamma < 1 or tree_topk < 1:
            raise ValueError(f"gamma and tree_topk must be >= 1, got {gamma}, {tree_topk}")
        if not isinstance(model, ModelRunner):
            model = ModelRunner(model, use_cuda_graphs)
        self.runner = model
        self.gamma, self.topk = gamma, tree_topk
        self.vocab_size = self.runner.vocab_size
        self.draft_len: Optional[torch.Tensor] = None

    @property
    def max_nodes(self) -> int:
        return 1 + self.gamma * self.topk

    @property
    def is_chain(self) -> bool:
        return self.topk == 1

    def setup(self, batch: int, capacity: int) -> None:
        self.runner.allocate(batch, cache_len(capacity, self.gamma))  # draft block: gamma past p
        layout = (batch, self.gamma, self.topk)
        if getattr(self, "_layout", None) == layout:
            return  # the tree layout and draft_len buffers persist (CUDA graphs read them)
        dev = self.runner.device
        g, k = self.gamma, self.topk
        depth = torch.arange(1, g + 1, device=dev).repeat_interleave(k)  # [g * k]
        main = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev),
                          1 + torch.arange(g, device=dev) * k])  # main-chain node id at depth d
        self._parents = torch.cat([torch.tensor([-1], device=dev), main[depth - 1]]).repeat(batch)
        self._offsets = torch.arange(batch + 1, device=dev) * self.max_nodes
        self._main = main[1:]  # [g]
        self.draft_len = torch.zeros(batch, dtype=torch.int64, device=dev)
        self._layout = layout
        self._buffers_changed()

    def graph_key(self) -> tuple:
        return super().graph_key() + (self.runner.cache_serial,)

    def start(self, state: SpecState, target_hidden=None) -> None:
        self.runner.prefill(state.prompts)
        self.draft_len.copy_(state.prompt_lens)

    def start_rows(self, state: SpecState, rows: list, target_hidden=None) -> None:
        self.runner.prefill_rows(rows, [state.prompts[r] for r in rows])
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.draft_len.device)
        self.draft_len[idx] = state.prompt_lens[idx]

    def _pick(self, logits: torch.Tensor, state: SpecState, pos: torch.Tensor):
        """Chain step: the next draft token [B] and the distribution it was drawn from [B, V]."""
        return ops.sample(logits, state.draft_params(), state.draft_seeds(), pos,
                          return_probs=not state.greedy)

    def propose(self, state: SpecState) -> Proposal:
        p = state.anchor_pos()  # [B]
        G = self.gamma + 1
        idx = self.draft_len[:, None] + torch.arange(G, device=p.device)
        idx = idx.clamp(max=state.capacity - 1)
        block = state.tokens.gather(1, idx)  # committed tokens draft_len..p (+ padding)
        logits = self.runner.extend(block, self.draft_len, p - self.draft_len).logits
        toks, probs = [], []
        for d in range(1, self.gamma + 1):
            if d > 1:
                main = toks[-1] if self.topk == 1 else toks[-1][:, 0]
                logits = self.runner.decode(main, p + d - 1)
            if self.topk == 1:
                tok, prob = self._pick(logits, state, p + d - 1)
                probs.append(prob)
            else:
                tok = torch.topk(logits, self.topk, dim=-1).indices  # [B, k], best first
            toks.append(tok)
        if self.topk == 1:
            has_probs = probs[0] is not None
            return chain_proposal(state.anchor(), torch.stack(toks, 1),
                                  torch.stack(probs, 1) if has_probs else None)
        drafts = torch.cat([state.anchor()[:, None]] + toks, 1).reshape(-1)  # [B * (1 + g k)]
        return Proposal(drafts, self._parents, None, self._offsets)

    def commit(self, state, proposal, result, root_pos, target_hidden=None) -> None:
        # the draft cache is valid through the anchor and each accepted main-chain node whose
        # K/V was computed (depths 1..gamma-1); the rest is recomputed by the next proposal
        local = result.accept_nodes[:, 1:self.gamma] - proposal.node_offsets[:-1, None]
        depth = torch.arange(1, self.gamma, device=root_pos.device)
        on_main = (local == self._main[:self.gamma - 1]) & (depth <= result.accept_count[:, None])
        m = on_main.long().cumprod(1).sum(1)
        self.draft_len.copy_(torch.minimum(root_pos + 1 + m, state.anchor_pos()))
