"""Drafters next to a tensor-parallel target: replicated (the default) or on rank 0 + broadcast.

``replicated``: every rank holds the whole drafter and runs it on its own copy of the state.
The state, the target's tapped hidden states and the logits are identical on every rank (see
``dspark.models.tp``), so every rank proposes the same trees as long as the drafter's kernels
are deterministic on identical inputs and identical devices (dspark's and cuBLAS's are). No
communication; each rank pays the drafter's weights and time (in parallel).

``broadcast``: only rank 0 runs the drafter (the others keep it only for its shapes and graph
keys) and broadcasts the packed proposal — tokens, parents, offsets and, when the drafter
samples, the [N, V] float64 distributions ``verify`` needs, which at a large vocabulary is most
of the traffic. Identical proposals by construction, whatever the drafter does.

Which is faster on several GPUs is a measurement for ``bench/bench_tp.py`` on an NCCL machine;
replicated is the default because it adds no collective to the step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..distributed import TensorParallel
from ..state import Proposal, SpecState
from .base import Drafter
from .io import drafter_kind, load_drafter

DRAFTER_MODES = ("replicated", "broadcast")
_PROB_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_mode(mode: str) -> None:
    if mode not in DRAFTER_MODES:
        raise ValueError(f"drafter mode must be one of {DRAFTER_MODES}, got {mode!r}")


def place_drafter(d: Drafter, tp: Optional[TensorParallel], mode: str) -> Drafter:
    """``d`` as it runs next to a tensor-parallel target: itself (replicated, or no ``tp``) or
    wrapped to run on rank 0 and broadcast its proposals."""
    check_mode(mode)
    return d if tp is None or mode == "replicated" else BroadcastDrafter(d, tp)


def load_drafter_tp(path: str, target, tp: TensorParallel, gamma: Optional[int] = None,
                    tree_topk: int = 1, mode: str = "replicated") -> Drafter:
    """The drafter stored in ``path`` next to the :class:`~dspark.models.tp.TPTransformer`
    ``target``, loaded on every rank (a failure on any rank raises on all of them). A trained
    drafter attaches to the full embedding and LM head (all-gathered from the shards)."""
    check_mode(mode)
    kind = tp.agree(lambda: drafter_kind(path), f"finding the drafter {path!r}")
    attach = target.replicated_parts() if kind == "trained" else target  # a collective
    d = tp.agree(lambda: load_drafter(path, attach, gamma, tree_topk=tree_topk),
                 f"loading the drafter {path!r}")
    return place_drafter(d, tp, mode)


class BroadcastDrafter(Drafter):
    """``inner`` runs on rank 0 only; its proposal is broadcast to the other ranks."""

    def __init__(self, inner: Drafter, tp: TensorParallel):
        self.inner, self.tp = inner, tp
        self.vocab_size = inner.vocab_size
        self.target_taps = inner.target_taps
        self._probs: dict = {}  # (batch, greedy, graph key) -> dtype of draft_probs or None

    @property
    def gamma(self) -> int:
        return self.inner.gamma

    @gamma.setter
    def gamma(self, value: int) -> None:
        self.inner.gamma = value

    @property
    def max_nodes(self) -> int:
        return self.inner.max_nodes

    @property
    def is_chain(self) -> bool:
        return self.inner.is_chain

    @property
    def graphable(self) -> bool:
        return self.inner.graphable

    def graph_key(self) -> tuple:
        return self.inner.graph_key()

    def compile(self, mode=None) -> None:
        self.inner.compile(mode)  # (only rank 0 calls the compiled bodies)

    def setup(self, batch: int, capacity: int) -> None:
        # on every rank: the inner drafter's graph keys must change on every rank together (a
        # stage captured on one rank and run eagerly on another would mismatch the broadcasts)
        self.inner.setup(batch, capacity)

    def start(self, state: SpecState, target_hidden) -> None:
        if self.tp.is_main:
            self.inner.start(state, target_hidden)

    def commit(self, state, proposal, result, root_pos, target_hidden) -> None:
        if self.tp.is_main:
            self.inner.commit(state, proposal, result, root_pos, target_hidden)

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, dist.get_global_rank(self.tp.group, 0) if self.tp.group else 0,
                       group=self.tp.group)
        return t

    def propose(self, state: SpecState) -> Proposal:
        B, W, dev = state.batch, self.max_nodes, state.tokens.device
        prop = self.inner.propose(state) if self.tp.is_main else None
        key = (B, state.greedy, self.graph_key())  # (greedy states carry no q)
        if key not in self._probs:  # once per shape (eager: a host read), then static
            code = -1 if prop is None or prop.draft_probs is None else \
                _PROB_DTYPES.index(prop.draft_probs.dtype)
            flag = self._bcast(torch.tensor([code], device=dev))
            self._probs[key] = None if int(flag) < 0 else _PROB_DTYPES[int(flag)]
        probs_dtype = self._probs[key]
        if prop is None:
            i64 = dict(dtype=torch.int64, device=dev)
            V = self.vocab_size or 1
            prop = Proposal(torch.empty(B * W, **i64), torch.empty(B * W, **i64),
                            None if probs_dtype is None else
                            torch.empty(B * W, V, dtype=probs_dtype, device=dev),
                            torch.empty(B + 1, **i64))
        out = [self._bcast(t.contiguous()) if t is not None else None for t in prop]
        return Proposal(*out)
