"""Autoregressive decode speed of the runner (CUDA graphs) against the weight-read floor.

A Qwen3-8B-shaped model with random bf16 weights, batch 1, greedy; the engine's autoregressive
path (graph-replayed decode + dspark::sample + one host sync per token). Floor = bytes of the
weights read per token (every parameter except the embedding table, of which one row is read)
at the device copy bandwidth measured in the same run (read + write counted).

    python bench/bench_decode.py [--layers 36] [--new 256]
"""
import argparse
import json

import torch

from bench_ops import copy_bandwidth
from dspark.engine import SpeculativeEngine
from dspark.models import ModelConfig, Transformer


def qwen3_8b(layers: int) -> ModelConfig:
    return ModelConfig.from_dict(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=4096, rope_theta=1e6, eos_token_id=None))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"), torch.no_grad():
        model = Transformer(qwen3_8b(a.layers)).eval().requires_grad_(False)
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    torch.set_default_dtype(torch.float32)
    embed = model.embed.weight.numel()
    read_bytes = sum(p.numel() for p in model.parameters()) * 2 - embed * 2 + model.config.hidden_size * 2
    bw = copy_bandwidth()
    floor_ms = read_bytes / bw * 1e3
    engine = SpeculativeEngine(model, max_len=1024)
    prompt = [list(range(1, 17))]
    engine.generate_autoregressive(prompt, max_new_tokens=8, temperature=0.0)  # capture graphs
    gen = engine.generate_autoregressive(prompt, max_new_tokens=a.new, temperature=0.0)
    ms = 1e3 / gen.metrics.decode_tokens_per_s
    row = dict(params_B=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
               weight_read_GB=round(read_bytes / 1e9, 2), copy_GBps=round(bw / 1e9),
               floor_ms=round(floor_ms, 3), decode_ms_per_token=round(ms, 3),
               ratio_to_floor=round(ms / floor_ms, 3), tokens=gen.metrics.new_tokens)
    print(json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(row, f)


if __name__ == "__main__":
    main()
