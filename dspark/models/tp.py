"""Megatron-style tensor parallelism for the runner's :class:`Transformer`.

Every rank holds a :class:`TPTransformer`, a Transformer whose layers are this rank's shards:

- attention: column-parallel QKV sharded by heads (rank r owns q heads r*H/w .. (r+1)*H/w - 1
  and the KV heads they read, r*Hkv/w ..; the fused [q | k | v] weight is built per shard), the
  KV cache holds those KV heads only, and the output projection is row-parallel (its input
  columns of those heads) followed by a reduce of the partial sums (the bias, and the residual
  on the fused path, folded into rank 0's partial: added once);
- MLP: column-parallel gate/up (the intermediate dim split; the fused [gate | up] weight holds
  this rank's gate rows then its up rows, the layout ``MLP`` splits), row-parallel down + reduce;
- vocab-parallel embedding (rank r owns rows r*V'/w .., V' = V rounded up to the world: a
  masked lookup, zeros elsewhere, then the reduce) and LM head (each rank computes its vocab
  slice; the slices are all-gathered in rank order into full logits rows);
- replicated: the norms, QK-norms, rotary tables and every activation between the reduces.

The fused decode kernels (``fused_linear``, ``decode_attention``) run per shard unchanged. The
heads, KV heads and intermediate size must be divisible by the world size (checked with a
clear error; replicating KV heads when the world exceeds them is not implemented).

Identical decisions on every rank, by construction: every reduce and gather returns the same
bits on every rank (``dspark.distributed``), so the full logits rows ``dspark.ops.verify`` reads,
the sampling parameters and the seeds are identical everywhere, and so are the tokens.
The single-process model is untouched: with tensor parallelism off nothing here runs.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import TensorParallel
from ..ops import fused_linear
from .config import ModelConfig
from .transformer import Block, Transformer

VOCAB_TENSORS = ("embed.weight", "lm_head.weight")


def check_tp_config(c: ModelConfig, world: int) -> None:
    """ValueError unless ``c`` can be split over ``world`` ranks."""
    if world < 1:
        raise ValueError(f"tensor-parallel world size must be >= 1, got {world}")
    bad = [f"{name} {n}" for name, n in (("num_attention_heads", c.num_heads),
                                         ("num_key_value_heads", c.num_kv_heads),
                                         ("intermediate_size", c.intermediate_size))
           if n % world]
    if bad:
        raise ValueError(f"tensor parallel over {world} ranks shards attention by heads and the "
                         f"MLP by its intermediate size, which must be divisible by {world}: "
                         f"{', '.join(bad)} are not")
    if vocab_per_rank(c.vocab_size, world) * (world - 1) >= c.vocab_size:
        raise ValueError(f"a vocabulary of {c.vocab_size} leaves some of {world} ranks no rows "
                         "of the embedding")


def vocab_per_rank(vocab: int, world: int) -> int:
    """Rows of the embedding / LM head per rank (the last rank's are zero-padded)."""
    return -(-vocab // world)


def local_config(c: ModelConfig, world: int) -> ModelConfig:
    """The shapes of one rank's shard (heads, KV heads, intermediate size, vocab rows)."""
    check_tp_config(c, world)
    return dataclasses.replace(c, num_heads=c.num_heads // world,
                               num_kv_heads=c.num_kv_heads // world,
                               intermediate_size=c.intermediate_size // world,
                               vocab_size=vocab_per_rank(c.vocab_size, world))


@dataclasses.dataclass(frozen=True)
class ShardRanges:
    """This rank's [start, end) of the sharded dims: q rows (heads x head_dim), KV rows, the
    intermediate dim and the vocab (``vocab_end`` may exceed V: rows past V are zeros)."""
    q: tuple
    kv: tuple
    inter: tuple
    vocab: tuple
    vocab_size: int

    @classmethod
    def of(cls, c: ModelConfig, tp: TensorParallel) -> "ShardRanges":
        check_tp_config(c, tp.world)
        d, r, w = c.head_dim, tp.rank, tp.world
        hq, hkv, i = c.num_heads // w * d, c.num_kv_heads // w * d, c.intermediate_size // w
        nv = vocab_per_rank(c.vocab_size, w)
        return cls((r * hq, (r + 1) * hq), (r * hkv, (r + 1) * hkv), (r * i, (r + 1) * i),
                   (r * nv, (r + 1) * nv), c.vocab_size)

    def rule(self, name: str):
        """How the (renamed, unfused: models/loader.py) tensor ``name`` is cut: (axis, range)
        or None (replicated). Biases of column-parallel projections are cut like their rows;
        those of row-parallel ones (o, down) are replicated."""
        for part, axis, rng in (("attn.q_proj.", 0, self.q), ("attn.k_proj.", 0, self.kv),
                                ("attn.v_proj.", 0, self.kv), ("attn.o.weight", 1, self.q),
                                ("mlp.gate_proj.", 0, self.inter), ("mlp.up_proj.", 0, self.inter),
                                ("mlp.down.weight", 1, self.inter)):
            if part in name:
                return axis, rng
        if name in VOCAB_TENSORS:
            return 0, self.vocab
        return None

    def take(self, name: str, t) -> torch.Tensor:
        """This rank's part of tensor ``name``: ``t`` is a tensor or a safetensors slice (then
        only the part's bytes are read)."""
        rule = self.rule(name)
        if rule is None:
            return t if isinstance(t, torch.Tensor) else t[:]
        axis, (a, b) = rule
        if name in VOCAB_TENSORS:
            part = t[a:min(b, self.vocab_size)]
            pad = (b - a) - part.shape[0]
            if pad > 0:  # the last rank's slice runs past the vocabulary: zero rows
                part = torch.cat([part, part.new_zeros((pad,) + tuple(part.shape[1:]))])
            return part
        return (t[a:b] if axis == 0 else t[:, a:b]).contiguous()


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding table; a token owned by another rank looks up zeros,
    and the reduce adds the one rank's row to exact zeros (so the result is exact)."""

    def __init__(self, tp: TensorParallel, rows: int, hidden: int):
        super().__init__(rows, hidden)
        self.tp = tp
        self.offset = tp.rank * rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.offset
        mine = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.tp.reduce(x.masked_fill(~mine[..., None], 0))


class RowParallelLinear(nn.Linear):
    """A row-parallel projection: this rank's input columns, the partial sums reduced over the
    ranks. The (replicated) bias, and in the fused form the residual, enter rank 0's partial
    only, so they are added once and the reduce is a plain sum."""

    def __init__(self, tp: TensorParallel, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.reduce(F.linear(x, self.weight, self.bias if self.tp.is_main else None))

    def fused(self, x: torch.Tensor, residual: torch.Tensor, silu_gate: bool = False):
        """``residual + W x + bias`` with W x summed over the ranks, on dspark::fused_linear."""
        main = self.tp.is_main
        return self.tp.reduce(fused_linear(x, self.weight, self.bias if main else None,
                                           residual=residual if main else None,
                                           silu_gate=silu_gate))


class TPBlock(Block):
    """A decoder block over this rank's heads and intermediate slice (``c`` = the local config)."""

    def __init__(self, c: ModelConfig, tp: TensorParallel):
        super().__init__(c)
        a, m = self.attn, self.mlp
        a.o = RowParallelLinear(tp, a.h * a.d, c.hidden_size, c.o_bias)
        m.down = RowParallelLinear(tp, m.inter, c.hidden_size, c.mlp_bias)

    def _fused(self, x, attend):
        """Block._fused per shard: the QKV and gate/up kernels as they are, the o and down
        kernels row-parallel (see RowParallelLinear.fused)."""
        a, m = self.attn, self.mlp
        qkv = fused_linear(x, a.qkv.weight, a.qkv.bias, norm_weight=self.attn_norm.weight,
                           eps=self.attn_norm.eps)
        h = a.o.fused(attend(qkv), x)
        gate_up = fused_linear(h, m.gate_up.weight, m.gate_up.bias,
                               norm_weight=self.mlp_norm.weight, eps=self.mlp_norm.eps)
        return m.down.fused(gate_up, h, silu_gate=True)


class TPTransformer(Transformer):
    """One rank's shard of a Transformer. ``config`` is the full model's (what callers see:
    vocabulary, layers, hidden size); ``local_config`` the shard's shapes."""

    def __init__(self, config: ModelConfig, tp: TensorParallel):
        local = local_config(config, tp.world)
        self.tp = tp  # (a plain attribute, read by _block during Transformer.__init__)
        super().__init__(local)
        self.local_config = local
        self.config = config
        self.embed = VocabParallelEmbedding(tp, local.vocab_size, config.hidden_size)

    def _block(self, c: ModelConfig) -> Block:
        return TPBlock(c, self.tp)

    @property
    def cache_kv_heads(self) -> int:
        return self.local_config.num_kv_heads

    def logits(self, h: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Final norm + this rank's vocab slice of the LM head, all-gathered in rank order:
        the full float32 logits rows, identical on every rank."""
        if fused:
            part = fused_linear(h, self.lm_head.weight, norm_weight=self.norm.weight,
                                eps=self.norm.eps)
        else:
            part = self.lm_head(self.norm(h))
        return self.tp.gather_last(part, self.config.vocab_size).float()

    def replicated_parts(self) -> SimpleNamespace:
        """The full embedding table and LM head (all-gathered: a collective, every rank must
        call it) with the config, device and dtype: what a trained drafter attaches to (a
        replicated drafter needs the whole vocabulary; it costs 2 V x hidden per rank, 1 if
        tied)."""
        V = self.config.vocab_size

        def full(w):
            return self.tp.gather(w).reshape(-1, w.shape[1])[:V]
        embed = full(self.embed.weight)
        tied = self.lm_head.weight.data_ptr() == self.embed.weight.data_ptr()
        head = embed if tied else full(self.lm_head.weight)
        return SimpleNamespace(config=self.config, device=self.device, dtype=self.dtype,
                               embed=SimpleNamespace(weight=embed),
                               lm_head=SimpleNamespace(weight=head))


def unfuse(sd: dict, c: ModelConfig) -> dict:
    """Our fused qkv / gate_up tensors back into q/k/v_proj and gate/up_proj (renamed HF names)."""
    out = {}
    for name, t in sd.items():
        if ".attn.qkv." in name:
            sizes = [c.num_heads * c.head_dim] + [c.num_kv_heads * c.head_dim] * 2
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split(sizes, 0)):
                out[name.replace("qkv", part)] = piece
        elif ".mlp.gate_up." in name:
            for part, piece in zip(("gate_proj", "up_proj"), t.chunk(2, 0)):
                out[name.replace("gate_up", part)] = piece
        else:
            out[name] = t
    return out


def full_shapes(c: ModelConfig) -> dict:
    """Name -> shape of every tensor of the full model, q/k/v and gate/up apart: what a
    checkpoint holds (after renaming: models/loader.py)."""
    with torch.device("meta"):
        sd = unfuse(Transformer(c).state_dict(), c)
    return {k: tuple(v.shape) for k, v in sd.items()}


def shard_model(model: Transformer, tp: TensorParallel) -> TPTransformer:
    """This rank's shard of an in-memory (full, single-process) model: its slices copied."""
    from .loader import fuse_projections

    c = model.config
    ranges = ShardRanges.of(c, tp)
    tied = model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    sd = unfuse(model.state_dict(), c)
    sd = {k: ranges.take(k, v).clone() for k, v in sd.items()}
    sd = fuse_projections(sd, "the in-memory model", dict.fromkeys(sd, "the in-memory model"))
    with torch.device("meta"):
        shard = TPTransformer(c, tp)
    if tied:
        sd["lm_head.weight"] = sd["embed.weight"]
    shard.load_state_dict(sd, assign=True, strict=True)
    shard.inv_freq = model.inv_freq.clone()
    return shard.eval().requires_grad_(False)
