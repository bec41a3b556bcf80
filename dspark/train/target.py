"""Train a small Qwen3-architecture target and a byte-level BPE tokenizer on an offline corpus.

Corpus (``collect_corpus``): the Python sources installed on the machine (the standard library
and site-packages by default) plus the English prose found next to them (*.rst, *.txt, *.md:
package docs, READMEs, license texts); any files/dirs can be given instead. Files are read in a
seeded random order up to a byte budget; 1% of the documents are held out for validation.

Output: a Hugging Face-format checkpoint dir that ``dspark.models.load_model`` (and transformers'
Qwen3ForCausalLM) loads: config.json (architectures Qwen3ForCausalLM, tied embeddings),
generation_config.json, model.safetensors (HF parameter names), tokenizer.json, plus
train_target.json (the run's settings and losses). The embedding has padding rows past the
tokenizer's vocabulary (rounded up to a multiple of 64, at least one row): the first of them is
the drafters' default MASK token (the Qwen3 convention).
"""
from __future__ import annotations

import json
import math
import os
import random
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import MLP, RMSNorm, apply_rope, rope

EOS = "<|endoftext|>"
CODE_EXTS = (".py",)
PROSE_EXTS = (".rst", ".txt", ".md")


def default_corpus_paths() -> list[str]:
    paths = []
    for key in ("stdlib", "purelib"):
        p = sysconfig.get_paths().get(key)
        if p and os.path.isdir(p) and p not in paths:
            paths.append(p)
    return paths


def collect_corpus(paths: Optional[Sequence[str]] = None, max_bytes: int = 64 << 20,
                   prose_frac: float = 0.25, seed: int = 0, max_file_bytes: int = 1 << 20):
    """Documents (file contents) from ``paths``: code (*.py) and prose (*.rst, *.txt, *.md),
    prose capped at ``prose_frac`` of the byte budget. Returns (docs, stats)."""
    paths = list(paths) if paths else default_corpus_paths()
    code, prose = [], []
    for p in paths:
        if os.path.isfile(p):
            (code if p.endswith(CODE_EXTS) else prose).append(p)
            continue
        if not os.path.isdir(p):
            raise ValueError(f"corpus path {p!r} does not exist")
        for root, dirs, names in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git"))
            for n in sorted(names):
                f = os.path.join(root, n)
                if n.endswith(CODE_EXTS):
                    code.append(f)
                elif n.endswith(PROSE_EXTS):
                    prose.append(f)
    rng = random.Random(seed)
    rng.shuffle(code)
    rng.shuffle(prose)
    docs, stats = [], {"code_files": 0, "prose_files": 0, "code_bytes": 0, "prose_bytes": 0}

    def take(files, budget, kind):
        used = 0
        for f in files:
            if used >= budget:
                break
            try:
                if os.path.getsize(f) > max_file_bytes:
                    continue
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
            except (UnicodeDecodeError, OSError):
                continue
            if len(text.strip()) < 64:
                continue
            docs.append(text)
            used += len(text)
            stats[f"{kind}_files"] += 1
            stats[f"{kind}_bytes"] += len(text)
        return used

    used = take(prose, int(max_bytes * prose_frac), "prose")
    take(code, max_bytes - used, "code")
    if not docs:
        raise ValueError(f"no usable text files under {paths}")
    rng.shuffle(docs)
    return docs, stats


def train_tokenizer(docs: Sequence[str], vocab_size: int = 8192):
    """Byte-level BPE (``tokenizers``); id 0 is the end-of-text special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


@dataclass
class TargetConfig:
    vocab_size: int = 8192  # tokenizer vocabulary (the embedding adds padding rows)
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 1536
    max_position_embeddings: int = 2048
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    seq_len: int = 512
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    max_minutes: Optional[float] = None
    save_dtype: Optional[str] = None  # None: bfloat16 when trained on CUDA, else float32


class _Layer(nn.Module):
    """A Qwen3 decoder layer with HF parameter names (q/k/v/o projections; the MLP is the shared
    gated one, whose fused ``gate_up`` is split into gate_proj / up_proj on save)."""

    def __init__(self, c: TargetConfig):
        super().__init__()
        d, h, kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.h, self.kv, self.hd = h, kv, hd
        self.input_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.self_attn = nn.ModuleDict(dict(
            q_proj=nn.Linear(d, h * hd, bias=False), k_proj=nn.Linear(d, kv * hd, bias=False),
            v_proj=nn.Linear(d, kv * hd, bias=False), o_proj=nn.Linear(h * hd, d, bias=False),
            q_norm=RMSNorm(hd, c.rms_norm_eps), k_norm=RMSNorm(hd, c.rms_norm_eps)))
        self.mlp = MLP(d, c.intermediate_size)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a = self.self_attn
        y = self.input_layernorm(x)
        q = a["q_norm"](a["q_proj"](y).view(B, T, self.h, self.hd)).transpose(1, 2)
        k = a["k_norm"](a["k_proj"](y).view(B, T, self.kv, self.hd)).transpose(1, 2)
        v = a["v_proj"](y).view(B, T, self.kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.h != self.kv)
        x = x + a["o_proj"](o.transpose(1, 2).reshape(B, T, self.h * self.hd))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyQwen3(nn.Module):
    """Qwen3 decoder (QK-norm, GQA, SwiGLU, RoPE, tied embeddings) with HF parameter names."""

    def __init__(self, c: TargetConfig, padded_vocab: int):
        super().__init__()
        self.c = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(padded_vocab, c.hidden_size)
        self.model.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        done = set()  # gate_up is drawn as gate rows, then up rows (HF's separate projections)
        for mod in self.modules():
            if isinstance(mod, MLP):
                for part in mod.gate_up.weight.split(mod.inter):
                    nn.init.normal_(part, 0.0, 0.02)
                done.add(mod.gate_up)
            elif isinstance(mod, (nn.Linear, nn.Embedding)) and mod not in done:
                nn.init.normal_(mod.weight, 0.0, 0.02)
        for layer in self.model.layers:  # scaled residual projections
            for w in (layer.self_attn["o_proj"].weight, layer.mlp.down.weight):
                nn.init.normal_(w, 0.0, 0.02 / math.sqrt(2 * c.num_layers))

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        cos, sin = rope(torch.arange(ids.shape[1], device=ids.device)[None], self.inv_freq,
                        x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return F.linear(self.model.norm(x), self.model.embed_tokens.weight)


def hf_config(c: TargetConfig, padded_vocab: int, eos_id: int, dtype: str) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": padded_vocab, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "hidden_act": "silu",
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "rope_scaling": None, "tie_word_embeddings": True,
            "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": c.num_layers,
            "layer_types": ["full_attention"] * c.num_layers, "initializer_range": 0.02,
            "use_cache": True, "bos_token_id": eos_id, "eos_token_id": eos_id,
            "torch_dtype": dtype, "dtype": dtype}


def save_target(model: TinyQwen3, tokenizer, path: str, dtype: str, eos_id: int,
                extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().to(tdt).cpu()
        if k.endswith("mlp.gate_up.weight"):  # HF names: separate gate and up projections
            gate, up = v.split(model.c.intermediate_size)
            sd[k.replace("gate_up", "gate_proj")] = gate.contiguous()
            sd[k.replace("gate_up", "up_proj")] = up.contiguous()
        else:
            sd[k.replace("mlp.down.", "mlp.down_proj.")] = v.contiguous()
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    padded = model.model.embed_tokens.weight.shape[0]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(model.c, padded, eos_id, dtype), f, indent=1)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": eos_id, "eos_token_id": eos_id, "do_sample": False}, f,
                  indent=1)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    if extra is not None:
        with open(os.path.join(path, "train_target.json"), "w") as f:
            json.dump(extra, f, indent=1)


def load_shared_tokenizer(path: str):
    """The tokenizer of checkpoint dir ``path``, for a model that must share another's
    vocabulary: a draft LM for a target."""
    from ..models.loader import load_tokenizer
    tok = load_tokenizer(path)
    if tok is None:
        raise FileNotFoundError(f"no tokenizer.json in {path!r}")
    if tok.token_to_id(EOS) is None:
        raise ValueError(f"{path!r}: its tokenizer has no {EOS} token (not one of `dspark "
                         f"train-target`)")
    return tok


def train_target(out: str, cfg: TargetConfig, corpus: Optional[Sequence[str]] = None,
                 max_bytes: int = 64 << 20, device: Optional[str] = None,
                 log: Callable[[str], None] = print, progress: bool = True,
                 tokenizer: Optional[str] = None) -> dict:
    """Corpus -> tokenizer -> model -> ``out`` (HF checkpoint dir). Returns the run summary.
    ``tokenizer``: a checkpoint dir whose tokenizer is reused instead of training one (same
    vocabulary and embedding rows: a draft LM for that target)."""
    t_start = time.time()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    docs, stats = collect_corpus(corpus, max_bytes, seed=cfg.seed)
    log(f"corpus: {stats['code_files']} code files ({stats['code_bytes'] / 1e6:.1f} MB), "
        f"{stats['prose_files']} prose files ({stats['prose_bytes'] / 1e6:.1f} MB)")
    n_val = max(1, len(docs) // 100) if len(docs) > 1 else 0
    val_docs, train_docs = docs[:n_val], docs[n_val:] or docs
    tok = train_tokenizer(train_docs, cfg.vocab_size) if tokenizer is None else \
        load_shared_tokenizer(tokenizer)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    cfg = replace(cfg, vocab_size=n_tok)  # as trained, or as reused
    eos_id = tok.token_to_id(EOS)
    padded = (n_tok + 1 + 63) // 64 * 64  # >= 1 padding row: the drafters' mask token
    log(f"tokenizer: {n_tok} tokens (embedding {padded} rows; mask token {n_tok})")

    def stream(texts):
        ids = []
        for enc in tok.encode_batch(list(texts)):
            ids.extend(enc.ids)
            ids.append(eos_id)
        return torch.tensor(ids, dtype=torch.int64)

    train_ids = stream(train_docs)
    val_ids = stream(val_docs) if val_docs else train_ids[-cfg.seq_len * 8:]
    log(f"tokens: train {len(train_ids):,}, validation {len(val_ids):,}")
    if len(train_ids) < cfg.seq_len + 2:
        raise ValueError(f"corpus too small: {len(train_ids)} tokens for seq_len {cfg.seq_len}")
    model = TinyQwen3(cfg, padded).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, {cfg.num_layers} layers, d={cfg.hidden_size}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.95), eps=1e-8)
    bf16 = dev.type == "cuda"
    gen = torch.Generator().manual_seed(cfg.seed)

    def batch(ids, B):
        starts = torch.randint(0, len(ids) - cfg.seq_len - 1, (B,), generator=gen)
        x = torch.stack([ids[s:s + cfg.seq_len + 1] for s in starts.tolist()]).to(dev)
        return x[:, :-1], x[:, 1:]

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        prog = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        cos = 0.5 * (1 + math.cos(math.pi * prog))
        return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cos)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, desc="train-target", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    losses, t0, step = [], time.time(), 0
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batch(train_ids, cfg.batch_size)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        elif (step + 1) % 50 == 0:
            log(f"step {step + 1}/{cfg.steps} loss {losses[-1]:.4f}")
        if cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes:
            log(f"time limit reached at step {step + 1}")
            break
    if bar is not None:
        bar.close()
    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        vl = []
        for _ in range(4):
            x, y = batch(val_ids, min(cfg.batch_size, 8)) if len(val_ids) > cfg.seq_len + 2 \
                else batch(train_ids, min(cfg.batch_size, 8))
            lg = model(x)
            vl.append(float(F.cross_entropy(lg.float().view(-1, lg.shape[-1]), y.reshape(-1))))
    dtype = cfg.save_dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    summary = {"config": asdict(cfg), "corpus": stats, "tokenizer_vocab": n_tok,
               "tokenizer_from": tokenizer,
               "padded_vocab": padded, "mask_token_id": n_tok, "eos_token_id": eos_id,
               "parameters": n_params, "steps": step + 1,
               "train_loss_last": sum(losses[-20:]) / len(losses[-20:]),
               "val_loss": sum(vl) / len(vl), "minutes": (time.time() - t_start) / 60,
               "device": str(dev), "saved_dtype": dtype}
    save_target(model, tok, out, dtype, eos_id, summary)
    log(f"saved {out}: train loss {summary['train_loss_last']:.3f}, validation loss "
        f"{summary['val_loss']:.3f}")
    return summary
