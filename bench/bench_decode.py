"""Autoregressive decode speed of the runner (CUDA graphs) against the weight-read floor.

A Qwen3-8B-shaped model with random bf16 weights, batch 1, greedy; the engine's autoregressive
path (graph-replayed decode + dspark::sample + bookkeeping, one host sync per 8 tokens), and
``runner_decode_ms``: the runner's graph-replayed decode alone, back to back. Floor = bytes of the
weights read per token (every parameter except the embedding table, of which one row is read)
at the device copy bandwidth measured in the same run (read + write counted).

Variants: ``graph`` (eager kernels captured in a CUDA graph), ``compile`` (torch.compile'd
forward captured in a CUDA graph) and ``compile:MODE`` (e.g. ``compile:max-autotune-no-cudagraphs``,
inductor also benchmarks GEMM kernels); a ``-unfused`` suffix turns off the runner's
dspark::fused_linear projections (cuBLAS + separate norm/gate/residual ops). ``--profile`` prints,
per variant, the kernels of one graph-replayed decode step (count, summed GPU time, span, the
largest): span minus the sum is the gaps between kernels, the sum above the floor is kernel
inefficiency.

    python bench/bench_decode.py [--layers 36] [--new 256] [--variants graph,compile] [--profile]
"""
import argparse
import json
from collections import defaultdict

import torch
from bench_ops import copy_bandwidth

from dspark.engine import SpeculativeEngine
from dspark.models import ModelConfig, ModelRunner, Transformer


def qwen3_8b(layers: int) -> ModelConfig:
    return ModelConfig.from_dict(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=4096, rope_theta=1e6, eos_token_id=None))


def random_qwen3_8b(layers: int):
    """The Qwen3-8B-shaped model with random bf16 weights on the GPU, and the bytes a decode step
    reads: every parameter except the embedding table, of which one row is read."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"), torch.no_grad():
        model = Transformer(qwen3_8b(layers)).eval().requires_grad_(False)
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    torch.set_default_dtype(torch.float32)
    read_bytes = (sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
                  + model.config.hidden_size) * 2
    return model, read_bytes


def graph_kernels(fn) -> list:
    """The kernels (CUPTI events, copies excluded) of one call of ``fn``, in start order, after
    a warm-up call (a graphed call replays: CUPTI reports graph kernels)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith("Memcpy")), key=lambda e: e.time_range.start)


def profile_step(runner: ModelRunner, top: int = 8) -> dict:
    """Kernels inside one graph-replayed decode step (CUPTI reports graph kernels): count,
    summed GPU µs and the ``top`` largest by name; ``span_us`` = first start to last end."""
    tok, pos = torch.tensor([5], device="cuda"), torch.tensor([16], device="cuda")
    # (same bucket as the engine's decode: replays the captured graph)
    kernels = graph_kernels(lambda: runner.decode(tok, pos))
    per_name, first, last = defaultdict(float), float("inf"), 0.0
    for e in kernels:
        per_name[e.name[:70]] += e.device_time
        first = min(first, e.time_range.start)
        last = max(last, e.time_range.end)
    biggest = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    # Critical path: with programmatic dependent launch a kernel starts before its predecessor
    # ends, so durations overlap; what each kernel adds to the step is how far its end moves
    # past the latest end before it. Summed per position j = (i - 1) mod (kernels per layer)
    # over kernels i = 1 .. layers * per_layer, keyed with the kernel's name (a position that
    # holds two kinds, e.g. the embedding lookup and every later layer's last kernel, shows as
    # two entries); kernel 0 and the ones after (final norm, lm_head) count as "rest".
    layers = runner.config.num_layers
    per_layer = (len(kernels) - 2) // layers if kernels else 0
    added, latest = defaultdict(float), first
    for i, e in enumerate(kernels):
        j = (i - 1) % per_layer if per_layer and 1 <= i <= per_layer * layers else -1
        key = f"{j}:{e.name[:40]}" if j >= 0 else "rest"
        added[key] += max(0.0, e.time_range.end - latest)
        latest = max(latest, e.time_range.end)
    return dict(kernels=len(kernels), kernel_us=round(sum(per_name.values()), 1),
                span_us=round(last - first, 1) if kernels else None,
                top=[(n, round(us, 1)) for n, us in biggest],
                first_layer=[(e.name[:60], round(e.device_time, 1))
                             for e in kernels[1:per_layer + 1]],
                critical_us={k: round(v, 1) for k, v in sorted(added.items())})


def runner_decode_ms(runner: ModelRunner, steps: int = 64, position: int = 112) -> float:
    """The runner's CUDA-graphed decode alone: ``steps`` back-to-back decode calls (input copies
    + graph replay; no sampling, no host sync in between), GPU ms per token. The engine's
    per-token time adds sampling, bookkeeping and the host loop on top."""
    tok, pos = torch.tensor([5], device="cuda"), torch.tensor([position], device="cuda")
    runner.decode(tok, pos)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.decode(tok, pos)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--variants", default="graph,compile")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, read_bytes = random_qwen3_8b(a.layers)
    bw = copy_bandwidth()
    floor_ms = read_bytes / bw * 1e3
    rows = []
    for variant in a.variants.split(","):
        # "graph" | "compile" | "compile:<torch.compile mode>", each optionally "-unfused"
        base, fused = variant.removesuffix("-unfused"), not variant.endswith("-unfused")
        compile = base.split(":", 1)[1] if ":" in base else base == "compile"
        engine = SpeculativeEngine(ModelRunner(model, compile=compile, fused=fused), max_len=1024)
        prompt = [list(range(1, 17))]
        # warm-up with the same length: the cache size (so the graph/compile bucket) follows
        # prompt + max_new_tokens, and a re-capture/re-compile must not land in the timing
        engine.generate_autoregressive(prompt, max_new_tokens=a.new, temperature=0.0)
        gen = engine.generate_autoregressive(prompt, max_new_tokens=a.new, temperature=0.0)
        ms = 1e3 / gen.metrics.decode_tokens_per_s
        row = dict(variant=variant,
                   params_B=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                   weight_read_GB=round(read_bytes / 1e9, 2), copy_GBps=round(bw / 1e9),
                   floor_ms=round(floor_ms, 3), decode_ms_per_token=round(ms, 3),
                   ratio_to_floor=round(ms / floor_ms, 3), tokens=gen.metrics.new_tokens,
                   runner_decode_ms=round(runner_decode_ms(engine.target), 3),
                   tokens_head=gen.tokens[0][:8])
        row["runner_ratio_to_floor"] = round(row["runner_decode_ms"] / floor_ms, 3)
        if a.profile:
            row["profile"] = profile_step(engine.target)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del engine
        torch.cuda.empty_cache()
    if len({tuple(r["tokens_head"]) for r in rows}) > 1:
        print("note: variants generated different greedy tokens (bf16 rounding differs)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
