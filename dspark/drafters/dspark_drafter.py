"""DSpark and DFlash drafters: a parallel backbone conditioned on the target's tapped hidden states
(KV injection), plus for DSpark a semi-autoregressive head (Markov or RNN) and a confidence head.

Backbone (docs/method.md, "Drafter"): context features
``C_t = RMSNorm(W_c [H^(l1)_t; ...; H^(lm)_t])`` are keys/values only: in draft layer i,
``K = KNorm([C W_i^K; X W_i^K])``, ``V = [C W_i^V; X W_i^V]`` with RoPE at the context's own
positions. The block ``[x0, MASK, ...]`` at positions ``p, p+1, ...`` attends to every context
position strictly before the anchor (``j < p``) and to the whole block (bidirectional). The
target's embedding table and LM head are shared and frozen.

Inference keeps a per-request draft KV cache of context K/V (slot = position). ``start`` writes the
prompt's features, ``commit`` writes the verified rows (anchor + accepted drafts; the rows of
rejected drafts land in slots past the new anchor and are never visible), ``propose`` runs only
the block against the cache (slots < p) and never stores the block's K/V: so before every draft
call the visible cache length equals the target's KV length, the anchor position p.

Sequential stage (DSpark): ``Z_k = U_k + B(x_{k-1})``; x_k is drawn by ``dspark.ops.sample`` with
the request's temperature / top-k / top-p (the same as the target's) keyed by the request's draft
seed and position p + k - 1, and the exact distribution it was drawn from is what verification
uses. DFlash samples every slot independently from ``U_k``. Confidence ``z_k = w.[H_d[k];
W1[x_{k-1}]] + b`` uses the previous token only. With the Markov head the whole stage (bias,
draws, confidences) is one op, ``dspark.ops.markov_draft`` (``markov_op``; default on CPU, and on
CUDA up to ``MARKOV_OP_MAX_BATCH_CUDA`` requests, where it beat the loop); the Python loop stays
for the RNN head, for larger CUDA batches and as the reference (``markov_op = False``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, reference
from ..models.config import ModelConfig
from ..models.layers import MLP, RMSNorm, rope
from ..state import Proposal, SpecState, cache_len, chain_proposal
from .base import Drafter
from .layers import (
    ConfidenceHead,
    MarkovHead,
    Projections,
    RNNHead,
    attend,
    init_weights,
    sts_scale,
    sts_tensor,
)
from .spec import DrafterSpec

# The batch up to which the CUDA drafter runs markov_draft instead of the Python loop: the op
# beat the loop at R = 1 (H200, 2026-12-07, with q rows: 158 vs 279 us at the benchmark pair's
# shape; demo pair round 0.405 vs 0.499 ms, compiled drafter) and lost at R = 16 (470 vs 389 us)
# and at the Qwen3-8B vocabulary at R = 64 (3411 vs 1801), where the loop's bias GEMM runs on
# tensor cores (bench/RESULTS.md, seventeenth session).
MARKOV_OP_MAX_BATCH_CUDA = 8


class InjectedLayer(nn.Module):
    """Pre-norm decoder layer whose attention keys/values are [context ; block]."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Projections(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP.from_config(c)

    def forward(self, h, cos, sin, ctx_k, ctx_v, mask):
        x = self.attn_norm(h)
        q = self.attn.query(x, cos, sin)
        k, v = self.attn.key_value(x, cos, sin)
        k = torch.cat([ctx_k.to(k.dtype), k], 2)
        v = torch.cat([ctx_v.to(v.dtype), v], 2)
        h = h + self.attn.out(attend(q, k, v, mask))
        return h + self.mlp(self.mlp_norm(h))


class FrozenTargetParts:
    """Mixin: the target's embedding table and LM head, attached (not copied, not saved)."""

    embed_weight: Optional[torch.Tensor] = None
    head_weight: Optional[torch.Tensor] = None

    def attach_target(self, target) -> None:
        """Share ``target``'s (a dspark Transformer) frozen embedding and LM head."""
        spec = self.spec
        c = target.config
        if c.hidden_size != spec.hidden_size or c.vocab_size != spec.vocab_size:
            raise ValueError(
                f"drafter was built for a target with hidden size {spec.hidden_size} and vocab "
                f"{spec.vocab_size}; this target has hidden size {c.hidden_size} and vocab "
                f"{c.vocab_size}")
        if c.num_layers != spec.target["num_layers"]:
            raise ValueError(f"drafter was built for a target with {spec.target['num_layers']} "
                             f"layers; this target has {c.num_layers}")
        self.embed_weight = target.embed.weight.detach()
        self.head_weight = target.lm_head.weight.detach()

    def _need_target(self):
        if self.embed_weight is None:
            raise RuntimeError("attach_target(target) first: the drafter shares the target's "
                               "embedding and LM head")

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        self._need_target()
        return F.embedding(tokens, self.embed_weight).to(self.param_dtype)

    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Frozen LM head, fp32 logits."""
        return self.head_logits(h).float()

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Frozen LM head, logits in its dtype (fp32 conversion of them is exact)."""
        self._need_target()
        return F.linear(h.to(self.head_weight.dtype), self.head_weight)


class ParallelDraftModel(FrozenTargetParts, nn.Module):
    """Trainable part of a DSpark / DFlash drafter."""

    def __init__(self, spec: DrafterSpec):
        super().__init__()
        from .registry import get_method
        if get_method(spec.method).model_class is not ParallelDraftModel:
            raise ValueError(f"ParallelDraftModel is the DSpark/DFlash backbone; {spec.method!r} "
                             "drafters are built by their registered model class")
        self.spec = spec
        c = spec.draft_config()
        d, V, r = c.hidden_size, spec.vocab_size, spec.markov_rank
        self.fc = nn.Linear(len(spec.target_layer_ids) * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, c.rms_norm_eps)
        self.layers = nn.ModuleList(InjectedLayer(c) for _ in range(spec.num_draft_layers))
        self.norm = RMSNorm(d, c.rms_norm_eps)
        if spec.head_type == "markov":
            self.head = MarkovHead(V, r)
        elif spec.head_type == "rnn":
            self.head = RNNHead(V, r, d)
        else:
            self.head = None
        self.confidence = ConfidenceHead(d, r) if spec.confidence_head else None
        self.register_buffer("inv_freq", c.inv_freq(), persistent=False)
        init_weights(self)

    @property
    def param_dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def slot_offset(self) -> int:
        """Block index of prediction slot 1: 0 (anchor layout) or 1 (mask layout)."""
        return 1 if self.spec.block_layout == "mask" else 0

    def fuse(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw concatenated tapped features [..., m*d] -> C [..., d]."""
        return self.hidden_norm(self.fc(feats.to(self.param_dtype)))

    def rope(self, positions: torch.Tensor):
        return rope(positions, self.inv_freq, self.param_dtype)

    def context_kv(self, C: torch.Tensor, positions: torch.Tensor) -> list:
        """Per layer (k, v) [B, Hkv, T, D] of context features C [B, T, d] at positions [B, T]."""
        cos, sin = self.rope(positions)
        return [layer.attn.key_value(C, cos, sin) for layer in self.layers]

    def backbone(self, tokens, positions, ctx_kv: list, mask) -> torch.Tensor:
        """Block tokens/positions [B, T] against per-layer context K/V; mask [B, 1, T, S + T].
        Returns H_d [B, T, d] (after the draft's own final norm)."""
        h = self.embed(tokens)
        cos, sin = self.rope(positions)
        for layer, (k, v) in zip(self.layers, ctx_kv, strict=True):
            h = layer(h, cos, sin, k, v, mask)
        return self.norm(h)

    def prev_embedding(self, prev: torch.Tensor) -> Optional[torch.Tensor]:
        return self.head.w1(prev) if self.head is not None else None

    def forward_train(self, ids: torch.Tensor, feats: torch.Tensor, anchors: torch.Tensor,
                      labels: torch.Tensor):
        """Anchor-bounded packed training forward (method doc 6.3).

        ids [B, S]; feats [B, S, m*d] raw tapped target features; anchors [B, A] anchor
        positions; labels [B, A, G] the tokens at anchor + 1..G (teacher forcing for the heads).
        Returns corrected logits Z [B, A, G, V] fp32 (slot k predicts the token at anchor + k) and
        confidence logits [B, A, G] fp32 (or None)."""
        B, S = ids.shape
        A, G = anchors.shape[1], labels.shape[-1]
        off = self.slot_offset()
        L = G + off
        dev = ids.device
        C = self.fuse(feats)
        ctx = self.context_kv(C, torch.arange(S, device=dev).expand(B, S))
        x0 = ids.gather(1, anchors)  # [B, A]
        tokens = torch.full((B, A, L), self.spec.mask_token_id, dtype=torch.int64, device=dev)
        tokens[..., 0] = x0
        positions = anchors[..., None] + torch.arange(L, device=dev)  # [B, A, L]
        q_anchor = anchors[..., None].expand(B, A, L).reshape(B, A * L)
        ctx_mask = torch.arange(S, device=dev)[None, None, :] < q_anchor[..., None]  # j < p
        blk = torch.arange(A, device=dev).repeat_interleave(L)
        blk_mask = (blk[:, None] == blk[None, :]).expand(B, A * L, A * L)
        mask = torch.cat([ctx_mask, blk_mask], -1)[:, None]
        H = self.backbone(tokens.view(B, A * L), positions.view(B, A * L), ctx, mask)
        H = H.view(B, A, L, -1)[:, :, off:off + G]
        prev = torch.cat([x0[..., None], labels[..., :-1]], -1)  # x_{k-1}: (x0, y1, ..., y_{G-1})
        Z = self.base_logits(H)
        if self.head is not None:
            Z = Z + self.head.unroll(prev, H)
        conf = self.confidence(H, self.prev_embedding(prev)) if self.confidence else None
        return Z, conf


class TrainedDrafter(Drafter):
    """Shared set-up of the drafters backed by a trained draft model attached to its target."""

    def __init__(self, model: nn.Module, gamma: Optional[int] = None):
        if model.embed_weight is None:
            raise ValueError("the draft model has no target attached (model.attach_target)")
        self.model = model
        self.spec = model.spec
        self.gamma = int(self.spec.gamma if gamma is None else gamma)
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        self.vocab_size = self.spec.vocab_size
        self.target_taps = tuple(self.spec.target_layer_ids)
        # keep_logits: tests and analyses set it to keep each proposal's corrected draft logits
        # [B, gamma, V] fp32 in last_logits (off by default: a full vocabulary row per draft)
        self.keep_logits = False
        self.last_logits: Optional[torch.Tensor] = None


class ParallelDrafter(TrainedDrafter):
    """Engine drafter for DSpark (spec.method 'dspark') and DFlash ('dflash')."""

    def __init__(self, model: ParallelDraftModel, gamma: Optional[int] = None):
        super().__init__(model, gamma)
        self.recorder: Optional[list] = None  # set to [] to record (conf logits, L, accepted)
        self.last_conf_logits: Optional[torch.Tensor] = None  # [B, gamma] raw z_k
        self._sts = None  # (key, [gamma] STS temperatures on the logits' device) of confidences()
        self.k = self.v = None
        # markov_op: the Markov head's sequential stage as one dspark.ops.markov_draft call (not
        # gamma x (bias GEMV + sample) launches); False keeps the Python loop. None: on CPU
        # always; on CUDA up to MARKOV_OP_MAX_BATCH_CUDA requests
        self.markov_op: Optional[bool] = None
        self._w2t = None  # (weight key, W2 [rank, V] contiguous): the layout the op streams
        self._commit_write = None  # compile(): the per-round context write under torch.compile

    # ---- cache -------------------------------------------------------------------------------
    def setup(self, batch: int, capacity: int) -> None:
        m = self.model
        c = self.spec.draft_config()
        p = next(m.parameters())
        # context rows are written at the verified block: up to gamma + 1 past the anchor
        shape = (len(m.layers), batch, c.num_kv_heads, cache_len(capacity, self.gamma + 1),
                 c.head_dim)
        if self.k is None or self.k.shape != shape or self.k.device != p.device:
            self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
            self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
            self._buffers_changed()
        if self._markov_fused(batch):
            self._markov_w2()  # made here, outside the stage graphs

    def _write_context(self, feats: torch.Tensor, start: torch.Tensor,
                       rows: Optional[torch.Tensor] = None) -> None:
        """feats [B, T, m*d] of positions start[b] + t -> cache slots (same numbers) of cache
        rows ``rows`` [B] (None: 0..B-1)."""
        B, T, _ = feats.shape
        pos = start[:, None] + torch.arange(T, device=start.device)
        kv = self.model.context_kv(self.model.fuse(feats), pos)
        slots = pos.clamp(max=self.k.shape[3] - 1)
        bidx = (torch.arange(B, device=start.device) if rows is None else rows)[:, None]
        for i, (k, v) in enumerate(kv):
            self.k[i][bidx, :, slots] = k.transpose(1, 2).to(self.k.dtype)
            self.v[i][bidx, :, slots] = v.transpose(1, 2).to(self.v.dtype)

    def start(self, state: SpecState, target_hidden: Optional[torch.Tensor]) -> None:
        m, B, T, d = target_hidden.shape  # prompt features, positions 0..T-1 (right padded)
        feats = target_hidden.permute(1, 2, 0, 3).reshape(B, T, m * d)
        self._write_context(feats, torch.zeros(B, dtype=torch.int64, device=feats.device))

    def start_rows(self, state: SpecState, rows: list, target_hidden) -> None:
        m, B, T, d = target_hidden.shape
        feats = target_hidden.permute(1, 2, 0, 3).reshape(B, T, m * d)
        idx = torch.as_tensor(rows, dtype=torch.int64, device=feats.device)
        self._write_context(feats, torch.zeros(B, dtype=torch.int64, device=feats.device), idx)

    def commit(self, state, proposal, result, root_pos, target_hidden=None) -> None:
        m, N, d = target_hidden.shape
        B = root_pos.shape[0]
        W = N // B  # gamma + 1 verified rows per request: positions root .. root + gamma
        if self.recorder is not None:
            self._record(state, proposal, result)
        feats = target_hidden.view(m, B, W, d).permute(1, 2, 0, 3).reshape(B, W, m * d)
        (self._commit_write or self._write_context)(feats, root_pos)

    # ---- drafting ----------------------------------------------------------------------------
    def draft_hidden(self, state: SpecState) -> torch.Tensor:
        """Backbone pass for the current anchors: H_d [B, gamma, d] (prediction slots only)."""
        m = self.model
        p = state.anchor_pos()
        B, g = p.shape[0], self.gamma
        off = m.slot_offset()
        L = g + off
        dev = p.device
        tokens = torch.full((B, L), self.spec.mask_token_id, dtype=torch.int64, device=dev)
        tokens[:, 0] = state.anchor()
        positions = p[:, None] + torch.arange(L, device=dev)
        S = self.k.shape[3]
        ctx = (torch.arange(S, device=dev)[None, :] < p[:, None])[:, None, :].expand(B, L, S)
        mask = torch.cat([ctx, torch.ones(B, L, L, dtype=torch.bool, device=dev)], -1)[:, None]
        kv = [(self.k[i], self.v[i]) for i in range(len(m.layers))]
        return m.backbone(tokens, positions, kv, mask)[:, off:off + g]

    def _markov_fused(self, batch: int) -> bool:
        on = self.markov_op
        if on is None and self.model.head is not None:
            dev = self.model.head.w1.weight.device
            on = ops.op_in_use("markov_draft", dev) and (
                dev.type != "cuda" or batch <= MARKOV_OP_MAX_BATCH_CUDA)
        return bool(on) and type(self.model.head) is MarkovHead

    def _markov_w2(self) -> torch.Tensor:
        """W2 [rank, V] contiguous (the head's nn.Linear weight is [V, rank]): a transposed copy,
        made once and remade (new graph key) when the weight changes."""
        w = self.model.head.w2.weight
        # inference tensors (made under torch.inference_mode) keep no version counter: for them
        # only a new tensor (data_ptr) is seen, not an in-place copy into the same one
        key = (w.data_ptr(), None if w.is_inference() else w._version, w.dtype, w.device)
        if self._w2t is None or self._w2t[0] != key:
            self._w2t = (key, w.detach().t().contiguous())
            self._buffers_changed()
        return self._w2t[1]

    def _propose_fused(self, state: SpecState, H: torch.Tensor) -> Proposal:
        """The sequential stage in one dspark.ops.markov_draft call (Markov head)."""
        m = self.model
        w1, w2 = m.head.w1.weight, self._markov_w2()
        U = m.head_logits(H)  # read as is by the op: bf16 logits are half the bytes of fp32
        if U.dtype not in (torch.float32, w1.dtype):
            U = U.float()
        conf = {}
        if m.confidence is not None:
            proj = m.confidence.proj
            conf = dict(hidden=H.to(w1.dtype).contiguous(),
                        conf_weight=proj.weight.reshape(-1).to(w1.dtype),
                        conf_bias=proj.bias.to(w1.dtype))
        anchor = state.anchor()
        out = ops.markov_draft(U.contiguous(), anchor, w1, w2, state.draft_params(),
                               state.draft_seeds(), state.anchor_pos(),
                               return_probs=not state.greedy, **conf)
        self.last_logits = None
        if self.keep_logits:  # the op's corrected logits, recomputed with its arithmetic
            prev = torch.cat([anchor[:, None], out.tokens[:, :-1]], 1)
            self.last_logits = reference.markov_logits(U, prev, w1, w2)
        self.last_conf_logits = out.conf_logits
        if self.recorder is not None:  # calibration data (graphs are off while recording)
            self._active = state.active.clone()
        return chain_proposal(anchor, out.tokens, out.probs)

    def propose(self, state: SpecState) -> Proposal:
        m = self.model
        H = self.draft_hidden(state)
        if self._markov_fused(state.batch):
            return self._propose_fused(state, H)
        U = m.base_logits(H)  # [B, g, V] fp32
        p = state.anchor_pos()
        seeds = state.draft_seeds()
        prev = state.anchor()
        hs = m.head.init_state(prev.shape, H) if m.head is not None else None
        toks, probs, logits, conf = [], [], [], []
        for k in range(self.gamma):
            z = U[:, k]
            if m.head is not None:
                bias, hs = m.head.step(prev, H[:, k], hs)
                z = z + bias
            if m.confidence is not None:
                conf.append(m.confidence(H[:, k], m.prev_embedding(prev)))
            tok, prob = ops.sample(z.contiguous(), state.draft_params(), seeds, p + k,
                                   return_probs=not state.greedy)
            toks.append(tok)
            probs.append(prob)
            if self.keep_logits:
                logits.append(z)
            prev = tok
        self.last_logits = torch.stack(logits, 1) if self.keep_logits else None
        self.last_conf_logits = torch.stack(conf, 1) if conf else None
        if self.recorder is not None:  # calibration data (graphs are off while recording)
            self._active = state.active.clone()
        return chain_proposal(state.anchor(), torch.stack(toks, 1),
                              None if state.greedy else torch.stack(probs, 1))

    def compile(self, mode: Optional[str] = None) -> None:
        """The backbone pass and the per-round context K/V write under torch.compile (inductor
        fuses their norms, rotary and elementwise ops; static shapes: one compile per batch
        size). The prompt's context write in :meth:`start` stays eager: its length is the
        prompt's, and a compile per prompt length would recompile for every new prompt. The
        engine captures the compiled code in its stage graphs, so no cudagraph mode here."""
        if getattr(self, "_compiled", False):
            return
        self.draft_hidden = torch.compile(self.draft_hidden, dynamic=False, mode=mode)
        self._commit_write = torch.compile(self._write_context, dynamic=False, mode=mode)
        self._compiled = True

    @property
    def graphable(self) -> bool:
        return self.recorder is None  # recording copies each round's data to the host

    @property
    def has_confidences(self) -> bool:
        return self.model.confidence is not None

    def confidences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the last proposal: STS-calibrated c_k = sigmoid(z_k / T_k) [B, gamma] and the prefix
        survival a_k = prod_{i<=k} c_i (what a confidence scheduler ranks)."""
        z = self.last_conf_logits
        if z is None:
            raise ValueError("this drafter has no confidence head (or has not proposed yet)")
        temps = self.spec.sts_temperatures
        key = (tuple(temps or ()), z.shape[-1], z.dtype, z.device)
        if self._sts is None or self._sts[0] != key:  # made once: a captured step copies nothing
            self._sts = (key, sts_tensor(temps, z.shape[-1], z.dtype, z.device) if temps else None)
        c = torch.sigmoid(sts_scale(z, self._sts[1]))
        return c, c.cumprod(-1)

    def _record(self, state, proposal, result) -> None:
        """Calibration data of the finished round (active requests): raw confidence logits,
        proposal length L (shortened at an accepted stop token) and accepted count."""
        if self.last_conf_logits is None:
            return
        B, g = self._active.shape[0], self.gamma
        drafts = proposal.draft_tokens.view(B, g + 1)[:, 1:]
        acc = result.accept_count.clamp(max=g)
        stop = (drafts[:, :, None] == state.stop_tokens[:, None, :]).any(-1)
        k = torch.arange(1, g + 1, device=drafts.device)
        stop_at = torch.where(stop & (k[None, :] <= acc[:, None]), k[None, :], g + 1).min(1).values
        L = torch.clamp(stop_at, max=g)
        acc = torch.minimum(acc, L)
        keep = self._active
        self.recorder.append((self.last_conf_logits[keep].float().cpu(), L[keep].cpu(),
                              acc[keep].cpu()))
