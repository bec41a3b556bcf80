"""Many generate calls in one process (issue 15): 300 calls that change the batch size, the
prompt lengths, max_new_tokens, greedy / sampled and the drafter kind (prompt lookup, a DSpark
drafter) leave memory flat. A first pass over the call mix allocates what the engines keep
(state buffers, KV caches, stage graphs); every later pass repeats the mix and must end with the
same live tensors, the same process RSS up to allocator noise (CPU) or the same CUDA memory
allocated and, once freed blocks are released, no more reserved (GPU: CUDA-graph pools
included), while each engine holds one set of state buffers and stage graphs at a time."""
import gc
import os

import pytest
import torch

from dspark.drafters import DrafterSpec, NgramDrafter, build_draft_model, make_drafter
from dspark.engine import SpeculativeEngine
from dspark.models.config import ModelConfig
from dspark.models.random import random_transformer

V = 128
PASSES, CALLS_PER_PASS = 10, 30  # 300 calls
BATCHES = (1, 3, 2, 5, 4)
MAX_NEW = (3, 9, 20)
# Allocator noise: the RSS moved by < 0.1 MiB over 8 passes here; the CUDA caching allocator
# may keep one more segment (20 MiB). A leaked graph pool or state per call would add hundreds.
RSS_SLACK = 4 << 20
RESERVED_SLACK = 20 << 20


def tiny_target(device):
    """One layer, hidden 32: 300 calls take seconds on a CPU."""
    cfg = ModelConfig.from_dict(dict(
        model_type="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=256))
    return random_transformer(cfg, seed=7).to(device)


def dspark_drafter(target):
    spec = DrafterSpec.for_target(target.config, "dspark", gamma=4, mask_token_id=V - 1,
                                  num_draft_layers=1, markov_rank=16)
    torch.manual_seed(3)
    return make_drafter(build_draft_model(spec, target).eval().requires_grad_(False))


def call_mix(i: int) -> tuple:
    """Call i of a pass: (drafter kind, prompts, generate kwargs); the cycles of 2, 5, 3 and 2
    (shifted) calls cover every kind x batch x max_new pairing in 30 calls."""
    kind = ("ngram", "dspark")[i % 2]
    B = BATCHES[i % len(BATCHES)]
    prompts = [[(7 * i + 3 * b + k) % (V - 2) + 1 for k in range(2 + (5 * b + i) % 11)]
               for b in range(B)]
    sampled = (i // 2) % 2 == 1
    kw = dict(max_new_tokens=MAX_NEW[i % len(MAX_NEW)], temperature=1.0 if sampled else 0.0,
              seed=list(range(i, i + B)))
    return kind, prompts, kw


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    # type(): isinstance would consult lazy module attributes of some objects (and warn)
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def memory(device: str) -> dict:
    """What must stay flat after the first pass."""
    out = {"tensors": live_tensors()}
    if device == "cuda":
        torch.cuda.synchronize()
        out["allocated"] = torch.cuda.memory_allocated()
        torch.cuda.empty_cache()  # free blocks (of destroyed graph pools too) back to the driver
        out["reserved"] = torch.cuda.memory_reserved()
    else:
        out["rss"] = rss_bytes()
    return out


def test_churn_memory_is_flat(device, one_thread):
    if device == "cpu" and not os.path.exists("/proc/self/statm"):
        pytest.skip("reads the RSS from /proc/self/statm (Linux)")
    target = tiny_target(device)
    engines = {"ngram": SpeculativeEngine(target, NgramDrafter(gamma=4)),
               "dspark": SpeculativeEngine(target, dspark_drafter(target))}
    stops = set(target.config.eos_token_ids)
    graphs = 1 if device == "cuda" else 0  # the step is one graph on GPU (stage_times off)
    seen = []
    for _ in range(PASSES):
        for i in range(CALLS_PER_PASS):
            kind, prompts, kw = call_mix(i)
            eng = engines[kind]
            out = eng.generate(prompts, **kw)
            for t in out.tokens:  # max_new_tokens, or fewer ending at a stop token
                assert len(t) == kw["max_new_tokens"] or t[-1] in stops, (t, kw)
            assert len(eng._states) == 1 and len(eng.graphs) <= graphs
            del out
        seen.append(memory(device))
    first, last = seen[1], seen[-1]  # pass 0 allocates; pass 1 is the steady state
    assert all(m["tensors"] == first["tensors"] for m in seen[1:]), [m["tensors"] for m in seen]
    if device == "cuda":
        assert all(m["allocated"] == first["allocated"] for m in seen[1:]), seen
        assert last["reserved"] <= first["reserved"] + RESERVED_SLACK, seen
    else:
        assert last["rss"] - first["rss"] <= RSS_SLACK, [m["rss"] >> 20 for m in seen]
