"""Test-only drafters: ``perfect`` (the target itself drafts: greedy rounds accept everything)
and ``AlwaysWrongDrafter`` (proposes the token after the target's argmax: greedy rounds reject
the first draft)."""
from __future__ import annotations

from .draft_model import DraftModelDrafter


def perfect_drafter(target_model, gamma: int = 4, tree_topk: int = 1) -> DraftModelDrafter:
    """The target model as its own draft model (separate KV cache, same weights)."""
    return DraftModelDrafter(target_model, gamma=gamma, tree_topk=tree_topk)


class AlwaysWrongDrafter(DraftModelDrafter):
    """Chains of (argmax + 1) mod V of the target-as-drafter: deterministic, draft_probs None."""

    def __init__(self, target_model, gamma: int = 4):
        super().__init__(target_model, gamma=gamma, tree_topk=1)

    def _pick(self, logits, state, pos):
        return (logits.argmax(-1) + 1) % logits.shape[-1], None
