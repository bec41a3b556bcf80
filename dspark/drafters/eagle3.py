"""EAGLE-3 drafter (comparison baseline, docs/method.md "Training"): one autoregressive decoder
layer over pairs (hidden_t, x_{t+1}).

Pair at position t: attention input ``[RMSNorm(embed(x_{t+1})); RMSNorm(g_t)]`` (2d wide), where
``g_t = W_fc F_t`` (fused tapped target features) for context positions and the layer's own
previous output for drafted positions; residual stream = g_t; output h_t; logits
``LMHead(RMSNorm(h_t))`` predict x_{t+2}. With anchor x_p (no target state yet) the last context
pair is (g_{p-1}, x_p), whose output drafts x_{p+1}; draft step j >= 2 runs the pair
(h_{p+j-3}, x_{p+j-1}) at position p+j-2.

Training-time test (TTT): step 0 runs every context pair; step j runs (h^{j-1}_t, x_{t+j+1}) at
position t+j for every t, attending to step-0 keys at positions <= t and to its own earlier steps
at the same t (exactly what inference sees). Output [b, t, j] predicts the token at t + j + 2,
i.e. slot k = j + 1 of anchor p = t + 1 (the DSpark convention).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..models.layers import MLP, RMSNorm, rope
from ..state import Proposal, SpecState, cache_len, chain_proposal
from .dspark_drafter import FrozenTargetParts, TrainedDrafter
from .layers import Projections, attend, init_weights
from .spec import DrafterSpec


class Eagle3Model(FrozenTargetParts, nn.Module):
    def __init__(self, spec: DrafterSpec):
        super().__init__()
        from .registry import get_method
        if get_method(spec.method).model_class is not Eagle3Model:
            raise ValueError(f"Eagle3Model needs an eagle3 spec, got {spec.method!r}")
        if spec.num_draft_layers != 1:
            raise ValueError("the EAGLE-3 drafter has exactly one decoder layer")
        self.spec = spec
        c = spec.draft_config()
        d = c.hidden_size
        self.fc = nn.Linear(len(spec.target_layer_ids) * d, d, bias=False)
        self.embed_norm = RMSNorm(d, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(d, c.rms_norm_eps)
        self.attn = Projections(c, 2 * d)
        self.mlp_norm = RMSNorm(d, c.rms_norm_eps)
        self.mlp = MLP.from_config(c)
        self.norm = RMSNorm(d, c.rms_norm_eps)
        self.register_buffer("inv_freq", c.inv_freq(), persistent=False)
        init_weights(self)

    @property
    def param_dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def fuse(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats.to(self.param_dtype))

    def pair_qkv(self, tokens, hidden, positions):
        """tokens [B, T] (x_{t+1}), hidden [B, T, d] (g_t or h), positions [B, T] -> q, k, v."""
        x = torch.cat([self.embed_norm(self.embed(tokens)),
                       self.hidden_norm(hidden.to(self.param_dtype))], -1)
        cos, sin = rope(positions, self.inv_freq, self.param_dtype)
        k, v = self.attn.key_value(x, cos, sin)
        return self.attn.query(x, cos, sin), k, v

    def finish(self, hidden, attn) -> torch.Tensor:
        h = hidden.to(self.param_dtype) + self.attn.out(attn)
        return h + self.mlp(self.mlp_norm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.base_logits(self.norm(h))

    def forward_train(self, ids: torch.Tensor, feats: torch.Tensor, steps: int) -> torch.Tensor:
        """ids [B, S], feats [B, S, m*d] -> logits [B, S-1, steps, V] fp32; [b, t, j] predicts
        ids[b, t + j + 2] (positions past the sequence are garbage; mask them in the loss)."""
        B, S = ids.shape
        T = S - 1
        dev = ids.device
        t = torch.arange(T, device=dev)
        hidden = self.fuse(feats[:, :T])
        ks, vs, out = [], [], []
        rep = self.attn.h // self.attn.hkv
        causal = t[None, :] <= t[:, None]  # [T(query), T(key)]
        scale = self.attn.d ** -0.5
        for j in range(steps):
            tok = ids.gather(1, (t + j + 1).clamp(max=S - 1).expand(B, T))
            q, k, v = self.pair_qkv(tok, hidden, (t + j).expand(B, T))
            ks.append(k.repeat_interleave(rep, 1))
            vs.append(v.repeat_interleave(rep, 1))
            s0 = (q @ ks[0].transpose(-1, -2)).float() * scale  # [B, H, T, T]
            s0 = s0.masked_fill(~causal, float("-inf"))
            diag = [((q * ks[i]).sum(-1)).float() * scale for i in range(1, j + 1)]
            scores = torch.cat([s0] + [d[..., None] for d in diag], -1).softmax(-1)
            attn = scores[..., :T].to(vs[0].dtype) @ vs[0]
            for i in range(1, j + 1):
                attn = attn + scores[..., T + i - 1, None].to(vs[i].dtype) * vs[i]
            hidden = self.finish(hidden, attn.to(q.dtype))
            out.append(self.logits(hidden))
        return torch.stack(out, 2)


class Eagle3Drafter(TrainedDrafter):
    """Chain of gamma tokens, each sampled with the request's parameters (exact draft_probs).
    Cache slot = position; a query at position t sees slots <= t (context pairs and, while
    drafting, its own earlier draft pairs, which the next commit overwrites)."""

    def __init__(self, model: Eagle3Model, gamma: Optional[int] = None):
        super().__init__(model, gamma)
        self.k = self.v = None

    def setup(self, batch: int, capacity: int) -> None:
        c = self.spec.draft_config()
        p = next(self.model.parameters())
        shape = (batch, c.num_kv_heads, cache_len(capacity, self.gamma + 1), c.head_dim)
        if self.k is None or self.k.shape != shape or self.k.device != p.device:
            self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
            self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
            self.h_last = torch.zeros(batch, c.hidden_size, dtype=p.dtype, device=p.device)
            self._buffers_changed()

    def _run(self, tokens, hidden, positions, rows=None) -> torch.Tensor:
        """Pairs [B, T] at positions [B, T] of cache rows ``rows`` [B] (None: 0..B-1): write their
        K/V to slot = position, attend to slots <= own position; returns the layer outputs
        h [B, T, d]."""
        m = self.model
        B, T = tokens.shape
        S = self.k.shape[2]
        q, k, v = m.pair_qkv(tokens, hidden, positions)
        slots = positions.clamp(max=S - 1)
        bidx = (torch.arange(B, device=tokens.device) if rows is None else rows)[:, None]
        self.k[bidx, :, slots] = k.transpose(1, 2).to(self.k.dtype)
        self.v[bidx, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        keys, values = (self.k, self.v) if rows is None else (self.k[rows], self.v[rows])
        mask = torch.arange(S, device=tokens.device)[None, None, :] <= positions[:, :, None]
        return m.finish(hidden, attend(q, keys, values, mask[:, None]))

    def _pairs(self, state: SpecState, target_hidden_rows, start: torch.Tensor, rows=None):
        """Context pairs (g_t, x_{t+1}) for t = start + 0..T-1 from features [B, T, m*d] of the
        requests in ``rows`` (None: all)."""
        B, T, _ = target_hidden_rows.shape
        pos = start[:, None] + torch.arange(T, device=start.device)
        tokens = state.tokens if rows is None else state.tokens[rows]
        nxt = tokens.gather(1, (pos + 1).clamp(max=state.capacity - 1))
        return self._run(nxt, self.model.fuse(target_hidden_rows), pos, rows)

    def start(self, state: SpecState, target_hidden) -> None:
        m, B, T, d = target_hidden.shape
        feats = target_hidden.permute(1, 2, 0, 3).reshape(B, T, m * d)
        h = self._pairs(state, feats, torch.zeros(B, dtype=torch.int64, device=feats.device))
        last = (state.prompt_lens - 1).clamp(max=T - 1)
        self.h_last.copy_(h[torch.arange(B, device=h.device), last])

    def start_rows(self, state: SpecState, rows: list, target_hidden) -> None:
        m, B, T, d = target_hidden.shape
        feats = target_hidden.permute(1, 2, 0, 3).reshape(B, T, m * d)
        idx = torch.as_tensor(rows, dtype=torch.int64, device=feats.device)
        h = self._pairs(state, feats, torch.zeros(B, dtype=torch.int64, device=feats.device), idx)
        last = (state.prompt_lens[idx] - 1).clamp(max=T - 1)
        self.h_last[idx] = h[torch.arange(B, device=h.device), last]

    def commit(self, state, proposal, result, root_pos, target_hidden=None) -> None:
        m, N, d = target_hidden.shape
        B = root_pos.shape[0]
        W = N // B
        feats = target_hidden.view(m, B, W, d).permute(1, 2, 0, 3).reshape(B, W, m * d)
        h = self._pairs(state, feats, root_pos)
        a = result.accept_count.clamp(0, W - 1)
        self.h_last.copy_(h[torch.arange(B, device=h.device), a])

    def propose(self, state: SpecState) -> Proposal:
        m = self.model
        p = state.anchor_pos()
        seeds = state.draft_seeds()
        h = self.h_last.clone()  # propose must not write the buffer commit fills
        toks, probs, logits = [], [], []
        for j in range(1, self.gamma + 1):
            if j > 1:
                h = self._run(toks[-1][:, None], h[:, None], (p + j - 2)[:, None])[:, 0]
            z = m.logits(h)
            tok, prob = ops.sample(z.contiguous(), state.draft_params(), seeds, p + j - 1,
                                   return_probs=not state.greedy)
            toks.append(tok)
            probs.append(prob)
            if self.keep_logits:
                logits.append(z)
        self.last_logits = torch.stack(logits, 1) if self.keep_logits else None
        return chain_proposal(state.anchor(), torch.stack(toks, 1),
                              None if state.greedy else torch.stack(probs, 1))
