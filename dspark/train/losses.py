"""Draft-training losses (docs/method.md, "Training").

Anchors: positions a with loss_mask[a] = loss_mask[a+1] = 1, sampled uniformly without replacement
(random keys, top-k) and sorted. Slot k (1..G) of anchor a is labelled with ids[a + k] and valid
while a + k < S and loss_mask[a + k] = 1 (cumulative product over k: only a supervised prefix).
Weights w_k = exp(-(k-1)/4) times validity. Every term is a weighted mean (sum w * term / sum w):
  L_ce   = -log p_d^k(y_k)
  L_tv   = ||p_d^k - p_t^k||_1               (full L1, fp32 softmaxes over the whole vocabulary)
  L_conf = BCE(z_k, c*_k), c*_k = clamp(1 - ||p_d^k - p_t^k||_1 / 2, 0, 1), detached
with p_d^k = softmax(Z_k) and p_t^k = softmax(target logits at row a + k - 1), both at T = 1.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

DECAY = 4.0  # loss_decay_gamma: the decay constant, not the block size


def position_weights(G: int, decay: float = DECAY, device=None) -> torch.Tensor:
    """w_k = exp(-(k-1)/decay), k = 1..G."""
    return torch.exp(-torch.arange(G, dtype=torch.float32, device=device) / decay)


class Blocks(NamedTuple):
    anchors: torch.Tensor  # [B, A] i64 anchor positions (ascending; invalid ones repeat 0)
    anchor_ok: torch.Tensor  # [B, A] bool
    labels: torch.Tensor  # [B, A, G] i64: ids[a + k], k = 1..G (clamped past the end)
    valid: torch.Tensor  # [B, A, G] bool: supervised prefix


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int,
                   generator: Optional[torch.Generator] = None):
    """loss_mask [B, S] bool -> anchors [B, A], anchor_ok [B, A] with A = min(num_anchors,
    max candidates in the batch); candidates a in [0, S-2] with loss_mask[a] & loss_mask[a+1]."""
    B, S = loss_mask.shape
    cand = torch.zeros_like(loss_mask)
    cand[:, :-1] = loss_mask[:, :-1] & loss_mask[:, 1:]
    n_cand = cand.sum(1)
    A = max(1, min(num_anchors, int(n_cand.max()) if B else 0))
    keys = torch.rand(B, S, generator=generator, device=loss_mask.device)
    keys = torch.where(cand, keys, -1.0)  # candidates first (keys in [0, 1))
    top = keys.topk(A, dim=1)
    ok = top.values >= 0
    anchors = torch.where(ok, top.indices, S)  # invalid ones sort last
    anchors, order = anchors.sort(1)
    ok = ok.gather(1, order)
    return torch.where(ok, anchors, 0), ok


def make_blocks(ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor,
                anchor_ok: torch.Tensor, G: int) -> Blocks:
    B, S = ids.shape
    k = torch.arange(1, G + 1, device=ids.device)
    pos = anchors[..., None] + k  # [B, A, G]
    inside = pos < S
    idx = pos.clamp(max=S - 1).view(B, -1)
    labels = ids.gather(1, idx).view(pos.shape)
    valid = inside & loss_mask.gather(1, idx).view(pos.shape) & anchor_ok[..., None]
    valid = valid.long().cumprod(-1).bool()
    return Blocks(anchors, anchor_ok, labels, valid)


class LossTerms(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    tv: torch.Tensor
    conf: torch.Tensor
    accept: torch.Tensor  # [G] mean c*_k over valid slots (expected per-position acceptance)
    tau: torch.Tensor  # probabilistic tau = 1 + sum_k prod_{i<=k} c*_i over fully valid blocks
    count: torch.Tensor  # number of valid slots


def _wmean(x, w, denom):
    return (x * w).sum() / denom


def block_losses(Z: torch.Tensor, conf: Optional[torch.Tensor], target_logits: torch.Tensor,
                 labels: torch.Tensor, valid: torch.Tensor, ce_w: float = 0.1, tv_w: float = 0.9,
                 conf_w: float = 1.0, decay: float = DECAY, ce_target: str = "label") -> LossTerms:
    """Z, target_logits [..., G, V]; conf [..., G] or None; labels, valid [..., G].
    ``ce_target``: "label" (the method: CE of the data token) or "soft" (an ablation: CE against
    the target's full T = 1 distribution, as EAGLE-3 trains)."""
    if ce_target not in ("label", "soft"):
        raise ValueError(f"ce_target must be 'label' or 'soft', got {ce_target!r}")
    G = Z.shape[-2]
    w = position_weights(G, decay, Z.device) * valid.float()
    denom = w.sum().clamp(min=1e-6)
    logp = F.log_softmax(Z.float(), -1)
    p_d = logp.exp()
    p_t = F.softmax(target_logits.float(), -1)
    if ce_target == "soft":
        ce = -(p_t * logp).sum(-1)
    else:
        ce = -logp.gather(-1, labels[..., None])[..., 0]
    l1 = (p_d - p_t).abs().sum(-1)
    cstar = (1 - 0.5 * l1).clamp(0, 1).detach()
    L_ce = _wmean(ce, w, denom)
    L_tv = _wmean(l1, w, denom)
    if conf is not None:
        bce = F.binary_cross_entropy_with_logits(conf.float(), cstar, reduction="none")
        L_conf = _wmean(bce, w, denom)
    else:
        L_conf = torch.zeros((), device=Z.device)
    total = ce_w * L_ce + tv_w * L_tv + (conf_w * L_conf if conf is not None else 0.0)
    with torch.no_grad():
        vf = valid.float()
        flat_c, flat_v = cstar.reshape(-1, G), vf.reshape(-1, G)
        accept = (flat_c * flat_v).sum(0) / flat_v.sum(0).clamp(min=1)
        full = flat_v[:, -1] > 0
        tau = (1 + flat_c[full].cumprod(-1).sum(-1)).mean() if full.any() else \
            torch.tensor(float("nan"), device=Z.device)
    return LossTerms(total, L_ce.detach(), L_tv.detach(), L_conf.detach(), accept, tau,
                     valid.sum())


def eagle_valid(loss_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, S-1, steps]: slot t / step j (anchor p = t + 1, label at t + j + 2) is supervised iff
    loss_mask[t + 1] and loss_mask[t + 2 .. t + j + 2] all hold inside the sequence."""
    B, S = loss_mask.shape
    T = S - 1
    t = torch.arange(T, device=loss_mask.device)
    anchor_ok = loss_mask[:, 1:]  # loss_mask[t + 1]
    cols = []
    for j in range(steps):
        pos = t + j + 2
        ok = (pos < S) & loss_mask.gather(1, pos.clamp(max=S - 1).expand(B, T))
        cols.append(ok & anchor_ok)
    return torch.stack(cols, -1).long().cumprod(-1).bool()


def eagle_losses(Z: torch.Tensor, target_logits: torch.Tensor, valid: torch.Tensor,
                 step_decay: float = 0.8) -> LossTerms:
    """EAGLE-3 loss: per step j soft cross-entropy to the target's T = 1 distribution, weight
    step_decay^j, averaged over valid slots. Z, target_logits [B, T, steps, V]; valid [B, T,
    steps]. The TV-based acceptance estimate is reported as for the other methods."""
    steps = Z.shape[-2]
    logp = F.log_softmax(Z.float(), -1)
    p_t = F.softmax(target_logits.float(), -1)
    soft_ce = -(p_t * logp).sum(-1)  # [B, T, steps]
    vf = valid.float()
    total = torch.zeros((), device=Z.device)
    for j in range(steps):
        n = vf[..., j].sum()
        if n > 0:
            total = total + step_decay ** j * (soft_ce[..., j] * vf[..., j]).sum() / n
    with torch.no_grad():
        l1 = (logp.exp() - p_t).abs().sum(-1)
        cstar = (1 - 0.5 * l1).clamp(0, 1)
        flat_c, flat_v = cstar.reshape(-1, steps), vf.reshape(-1, steps)
        accept = (flat_c * flat_v).sum(0) / flat_v.sum(0).clamp(min=1)
        full = flat_v[:, -1] > 0
        tau = (1 + flat_c[full].cumprod(-1).sum(-1)).mean() if full.any() else \
            torch.tensor(float("nan"), device=Z.device)
        w = position_weights(steps, DECAY, Z.device) * vf
        denom = w.sum().clamp(min=1e-6)
        ce = (soft_ce * w).sum() / denom
        tv = (l1 * w).sum() / denom
    return LossTerms(total, ce, tv, torch.zeros((), device=Z.device), accept, tau, valid.sum())


def cosine_lr(step: int, total: int, warmup_frac: float = 0.04) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine to 0 (a multiplier of lr)."""
    warm = max(1, int(round(total * warmup_frac)))
    if step < warm:
        return (step + 1) / warm
    prog = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1 + math.cos(math.pi * prog))
