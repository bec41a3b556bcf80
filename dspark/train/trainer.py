"""The draft trainer: DSpark, DFlash and EAGLE-3 drafters against a frozen dspark target.

Per micro-batch: the frozen target computes tapped features and final hidden states online
(``features.py``); then the method's registered objective (drafters/registry.py): "block" (DSpark
/ DFlash) samples anchors and builds gamma-blocks (``losses.py``), "unroll" (EAGLE-3) runs the
training-time-test unroll over every position. Default loss weights are the registry's:
  dspark: 0.1 CE + 0.9 TV + 1.0 BCE(confidence), decay 4.0
  dflash: 1.0 CE (TV reported, not trained), decay 4.0
  eagle3: soft CE to the target distribution, step weight 0.8^j
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), linear warmup over 4% of the steps then cosine
to 0, global grad-norm clip 1.0, fp32 master weights with bf16 autocast on CUDA. Resumable:
``<out>/checkpoint/trainer.pt`` holds weights, optimizer and step as plain tensors and containers
only, and is read with ``torch.load(weights_only=True)`` (a checkpoint from someone else runs no
code); micro-batch order and anchor draws are functions of (seed, step), so a resumed run
continues the same stream (no RNG state to save).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..drafters.io import build_draft_model, save_drafter
from ..drafters.registry import get_method
from ..drafters.spec import DrafterSpec
from .data import Sample, collate
from .features import target_features, target_logits
from .losses import block_losses, cosine_lr, eagle_losses, eagle_valid, make_blocks, sample_anchors


@dataclass
class TrainConfig:
    epochs: float = 1.0
    steps: Optional[int] = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    max_length: int = 1024
    num_anchors: int = 512
    lr: float = 6e-4
    weight_decay: float = 0.0
    warmup_frac: float = 0.04
    grad_clip: float = 1.0
    loss_weights: Optional[tuple] = None  # (ce, tv, conf); None = the method's defaults
    ce_target: str = "label"  # "label" (the method) | "soft" (ablation: CE vs the target's dist.)
    decay: float = 4.0
    eagle_step_decay: float = 0.8
    seed: int = 42
    bf16: Optional[bool] = None  # None: on CUDA
    save_every: int = 500  # steps between resumable checkpoints (0 = only at the end)
    log_every: int = 10
    max_minutes: Optional[float] = None  # stop (and save) after this much training time
    stop_after: Optional[int] = None  # stop (and save) at this step; resume later
    progress: bool = True
    extra: dict = field(default_factory=dict)


class _Stream:
    """Sample index of the i-th sequence of the run: epoch-wise seeded permutations."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __call__(self, i: int) -> int:
        e, j = divmod(i, self.n)
        if e not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 7919 + e)
            self._perms = {e: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[e][j]


def _unroll_loss(model, target, spec, ids, loss_mask, tf, cfg, generator, amp):
    """EAGLE-3's training-time-test unroll: every position drafts gamma steps."""
    g = spec.gamma
    with amp:
        Z = model.forward_train(ids, tf.feats, g)  # [B, S-1, g, V]
    B, S = ids.shape
    rows = (torch.arange(S - 1, device=ids.device)[:, None]
            + torch.arange(1, g + 1, device=ids.device)).clamp(max=S - 1)  # t + j + 1
    final = tf.final[:, rows.view(-1)].view(B, S - 1, g, -1)
    return eagle_losses(Z, target_logits(target, final), eagle_valid(loss_mask, g),
                        cfg.eagle_step_decay)


def _block_loss(model, target, spec, ids, loss_mask, tf, cfg, generator, amp):
    """DSpark / DFlash: anchor-bounded gamma-blocks (docs/method.md, "Training")."""
    g = spec.gamma
    anchors, ok = sample_anchors(loss_mask, cfg.num_anchors, generator)
    blk = make_blocks(ids, loss_mask, anchors, ok, g)
    with amp:
        Z, conf = model.forward_train(ids, tf.feats, anchors, blk.labels)
    B, A = anchors.shape
    rows = anchors[..., None] + torch.arange(g, device=ids.device)  # a + k - 1
    final = tf.final.gather(1, rows.clamp(max=ids.shape[1] - 1).view(B, A * g, 1)
                            .expand(B, A * g, tf.final.shape[-1])).view(B, A, g, -1)
    ce_w, tv_w, conf_w = cfg.loss_weights or get_method(spec.method).loss_weights
    return block_losses(Z, conf, target_logits(target, final), blk.labels, blk.valid, ce_w, tv_w,
                        conf_w, cfg.decay, cfg.ce_target)


OBJECTIVES = {"block": _block_loss, "unroll": _unroll_loss}


def micro_batch_loss(model, target, spec: DrafterSpec, ids: torch.Tensor, loss_mask: torch.Tensor,
                     cfg: TrainConfig, generator: Optional[torch.Generator] = None, autocast=None):
    """Loss terms of one micro-batch (ids, loss_mask [B, S] on the target's device)."""
    tf = target_features(target, ids, spec.target_layer_ids)
    amp = autocast or contextlib.nullcontext()
    objective = OBJECTIVES[get_method(spec.method).objective]
    return objective(model, target, spec, ids, loss_mask, tf, cfg, generator, amp)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc="train-draft", dynamic_ncols=True)


def _load_checkpoint(path: str, device) -> dict:
    """trainer.pt without unpickling objects: anything but tensors and plain containers (what
    save_checkpoint writes) is refused, with one line naming the file."""
    import pickle
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a dspark trainer checkpoint of plain tensors ({first})") \
            from None
    keys = {"model", "optim", "step", "total", "spec"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise ValueError(f"{path}: not a dspark trainer checkpoint (needs {sorted(keys)})")
    return state


def train_drafter(target, spec: DrafterSpec, samples: Sequence[Sample], cfg: TrainConfig,
                  out_dir: Optional[str] = None, model=None, resume: bool = False,
                  log: Callable[[str], None] = print):
    """Train a drafter for ``target`` (a dspark Transformer, frozen) on token ``samples``.

    Returns (model, history). With ``out_dir``: resumable checkpoints in out_dir/checkpoint/,
    the log in out_dir/train_log.jsonl and the final drafter (drafter_config.json +
    model.safetensors) in out_dir. ``resume`` continues from out_dir/checkpoint/trainer.pt."""
    if not samples:
        raise ValueError("no training samples")
    dev = target.device
    target.requires_grad_(False)
    bf16 = cfg.bf16 if cfg.bf16 is not None else dev.type == "cuda"
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else \
        (lambda: contextlib.nullcontext())
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.steps or max(1, math.ceil(cfg.epochs * len(samples) / per_step))
    ckpt_path = os.path.join(out_dir, "checkpoint", "trainer.pt") if out_dir else None
    state = None
    if resume:
        if not ckpt_path or not os.path.isfile(ckpt_path):
            raise ValueError(f"nothing to resume: no {ckpt_path}")
        state = _load_checkpoint(ckpt_path, dev)
        spec = DrafterSpec.from_json(state["spec"])
        total = state["total"]
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_draft_model(spec, target)
    model.to(device=dev, dtype=torch.float32).train()
    model.attach_target(target)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step, history = state["step"], state.get("history", [])
        log(f"resumed at step {step}/{total}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    stream = _Stream(len(samples), cfg.seed)
    gen = torch.Generator(device=dev)
    bar = _progress(total, step, cfg.progress)
    logf = open(os.path.join(out_dir, "train_log.jsonl"), "a") if out_dir else None
    ema, t0, last_save = None, time.time(), step

    def save_checkpoint():
        os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step,
                    "total": total, "spec": spec.to_json(), "cfg": asdict(cfg),
                    "history": history}, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    try:
        while step < total:
            lr = cfg.lr * cosine_lr(step, total, cfg.warmup_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            agg = {"loss": 0.0, "ce": 0.0, "tv": 0.0, "conf": 0.0}
            taus, accepts = [], []
            for micro in range(cfg.grad_accum):
                mb = step * cfg.grad_accum + micro
                batch = [samples[stream(mb * cfg.batch_size + i)] for i in range(cfg.batch_size)]
                ids, lm = collate(batch, cfg.max_length, dev)
                gen.manual_seed(cfg.seed * 1000003 + mb)
                terms = micro_batch_loss(model, target, spec, ids, lm, cfg, gen, autocast())
                (terms.total / cfg.grad_accum).backward()
                for k, v in (("loss", terms.total), ("ce", terms.ce), ("tv", terms.tv),
                             ("conf", terms.conf)):
                    agg[k] += float(v.detach()) / cfg.grad_accum
                if not math.isnan(float(terms.tau)):
                    taus.append(float(terms.tau))
                accepts.append(terms.accept.float().cpu())
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            tau = sum(taus) / len(taus) if taus else float("nan")
            ema = tau if ema is None or math.isnan(ema) else 0.95 * ema + 0.05 * tau
            rec = {"step": step, "lr": lr, "grad_norm": float(gnorm), "tau_est": tau,
                   "accept": torch.stack(accepts).mean(0).tolist(), **agg}
            if step % cfg.log_every == 0 or step == total or step == 1:
                history.append(rec)
                if logf:
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{agg['loss']:.3f}", ce=f"{agg['ce']:.3f}",
                                tv=f"{agg['tv']:.3f}", tau=f"{ema:.2f}", lr=f"{lr:.1e}")
            elif step % cfg.log_every == 0 or step == total:
                log(f"step {step}/{total} loss {agg['loss']:.4f} ce {agg['ce']:.4f} tv "
                    f"{agg['tv']:.4f} conf {agg['conf']:.4f} tau~{ema:.2f} lr {lr:.2e}")
            if ckpt_path and cfg.save_every and step - last_save >= cfg.save_every:
                save_checkpoint()
                last_save = step
            if cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes:
                log(f"time limit of {cfg.max_minutes} min reached at step {step}/{total}")
                break
            if cfg.stop_after is not None and step >= cfg.stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
        if logf:
            logf.close()
    model.eval()
    spec.training = {**spec.training, "steps": step, "total_steps": total,
                     "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
                     **cfg.extra}
    if out_dir:
        save_checkpoint()
        save_drafter(model, out_dir)
    return model, history
