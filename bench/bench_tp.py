"""Tensor-parallel target on the GPUs of one host (NCCL): correctness, then decode speed of a
Qwen3-32B-shaped random target with and without DSpark speculation.

    torchrun --nproc-per-node 2 bench/bench_tp.py [--out tp2.json]   # and 4
    python bench/bench_tp.py                 # one GPU: the same code over a world of one rank
    torchrun --nproc-per-node 2 bench/bench_tp.py --device cpu --shape small   # gloo smoke run

NVLink multicast stays off (dspark.distributed sets NCCL_NVLS_ENABLE=0 before NCCL starts).

check (a small random Qwen3 model built identically on every rank and cut into shards by
dspark.models.tp.shard_model): fp32 prefill / decode / verify logits against the plain model's
on the same device; logits rows bit-identical on every rank; bf16 greedy speculative ==
autoregressive (draft-model chain and tree, drafter replicated and broadcast, batch-invariant
kernels); sampled tokens identical on every rank and in both drafter modes; a failure on one
rank raised on every rank. Exit code 1 when a check fails.

speed (Qwen3-32B shape, random bf16 weights made shard by shard on each GPU: no checkpoint), per
reduce mode and batch size:
- ``decode``: the engine's autoregressive step (graph-replayed), against the per-GPU weight-read
  floor (this rank's weight bytes, one embedding row, at the copy bandwidth measured here);
- ``dspark:<mode>``: rounds with a random-weight DSpark drafter (the target's layer shape,
  Markov head) replicated on every rank or run on rank 0 and broadcast: random drafts are
  rejected, but every stage costs what a trained drafter's does; round time (a step = one CUDA
  graph) and with ``--stage-times`` its split (``dspark:<mode>/stages``);
- ``comm``: the runner's decode (B rows) and verify (B (gamma + 1) rows) forwards replayed
  from CUDA graphs as they are and with every collective replaced by a local copy of the same
  size: their difference is the communication's share of the step.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from dspark import distributed
from dspark.distributed import DistributedError, TensorParallel
from dspark.drafters import DraftModelDrafter, make_drafter
from dspark.drafters.dspark_drafter import ParallelDraftModel
from dspark.drafters.spec import DrafterSpec
from dspark.drafters.tp import place_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import ModelConfig, ModelRunner
from dspark.models.random import random_transformer
from dspark.models.tp import TPTransformer, shard_model
from dspark.timing import graph_replay_seconds

SHAPES = {  # 8 KV heads and vocabularies no world divides: padded vocab slices
    "32b": dict(vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, head_dim=128),
    "small": dict(vocab_size=4099, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=32),
}
DRAFTER_MODES = ("replicated", "broadcast")


def config(shape: str, layers=None) -> ModelConfig:
    d = dict(SHAPES[shape], model_type="qwen3", max_position_embeddings=4096, rope_theta=1e6,
             eos_token_id=None)
    if layers:
        d["num_hidden_layers"] = layers
    return ModelConfig.from_dict(d)


def start(device: str) -> TensorParallel:
    """The tensor-parallel group: torchrun's, or a world of one rank without torchrun."""
    tp = distributed.init_from_env(device)
    if tp is not None:
        return tp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kw = dict(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if device.startswith("cuda"):
        os.environ.update(distributed.NO_MULTICAST)
        gpu = torch.device(device if ":" in device else "cuda:0")
        torch.cuda.set_device(gpu)
        dist.init_process_group("nccl", device_id=gpu, **kw)
    else:
        dist.init_process_group("gloo", **kw)
    return TensorParallel(reduce=os.environ.get("DSPARK_TP_REDUCE", "gather"))


def same_on_every_rank(tp: TensorParallel, value) -> bool:
    values = [None] * tp.world
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


# ---- check ---------------------------------------------------------------------------------
def logits_of(model, fused: bool, dev) -> dict:
    """Prefill, one decode step and one chain verify of 3 requests: every logits row."""
    runner = ModelRunner(model, use_cuda_graphs=False, fused=fused)
    prompts = [[3, 14, 15, 92, 65], [7, 9], [11, 12, 13, 14, 15, 16, 17]]
    runner.allocate(3, 64)
    start_pos = torch.tensor([len(p) for p in prompts], device=dev)
    out = {"prefill": runner.prefill(prompts).logits.clone()}
    out["decode"] = runner.decode(torch.tensor([5, 6, 7], device=dev), start_pos).clone()
    runner.prefill(prompts)
    toks = torch.arange(40, 52, device=dev)
    parents = torch.tensor([-1, 0, 1, 2] * 3, device=dev)
    offsets = torch.arange(0, 13, 4, device=dev)
    out["verify"] = runner.forward_tree(toks, parents, offsets, start_pos, 4).logits.clone()
    return out


def check(tp: TensorParallel, dev: str) -> dict:
    res = {}
    c = config("small")
    full = random_transformer(c, seed=0).to(dev)  # the same weights on every rank
    shard = shard_model(full, tp)
    diffs, rows = {}, []
    for fused in (False, True):
        got, want = logits_of(shard, fused, dev), logits_of(full, fused, dev)
        for k in want:
            diffs[f"{k}:fused={fused}"] = float((got[k] - want[k]).abs().max())
            rows.append(got[k])
    res["fp32_max_abs_diff"] = diffs
    res["fp32_close"] = max(diffs.values()) < 1e-3  # |logits| ~ 10; reduces reassociate sums
    res["ranks_identical_logits"] = same_on_every_rank(tp, [r.cpu().tolist() for r in rows])

    target = shard_model(full.to(torch.bfloat16), tp)
    draft = random_transformer(c, seed=0, noise=0.05).to(dev, torch.bfloat16)
    for m in (target, draft):  # rotary frequencies stay fp32 (Module.to converted them)
        m.inv_freq = c.inv_freq().to(dev)
    prompts = [[1, 5, 7, 9, 5, 7], [3, 4, 3, 4, 3], [10, 11, 12, 13, 10, 11]]
    kw = dict(max_new_tokens=24, stop_tokens=[])
    ar = SpeculativeEngine(target, batch_invariant=True).generate_autoregressive(prompts, **kw)
    greedy, sampled = {}, {}
    for mode in DRAFTER_MODES:
        for name, d in (("chain", DraftModelDrafter(draft, 3)),
                        ("tree", DraftModelDrafter(draft, 2, tree_topk=2))):
            eng = SpeculativeEngine(target, place_drafter(d, tp, mode), batch_invariant=True)
            greedy[f"{name}:{mode}"] = eng.generate(prompts, **kw).tokens == ar.tokens
        eng = SpeculativeEngine(target, place_drafter(DraftModelDrafter(draft, 3), tp, mode),
                                batch_invariant=True)
        sampled[mode] = eng.generate(prompts, temperature=1.0, seed=[1, 2, 3], **kw).tokens
    res["bf16_greedy_speculative_eq_autoregressive"] = greedy
    res["sampled_same_in_both_modes"] = sampled["replicated"] == sampled["broadcast"]
    res["sampled_identical_across_ranks"] = same_on_every_rank(tp, sampled)

    t0 = time.perf_counter()
    try:
        tp.agree(lambda: 1 / (tp.rank != tp.world - 1), "an injected failure on the last rank")
        res["failure_raised_everywhere"] = False
    except DistributedError:
        res["failure_raised_everywhere"] = True
    res["failure_seconds"] = round(time.perf_counter() - t0, 3)
    flags = [res["fp32_close"], res["ranks_identical_logits"], res["sampled_same_in_both_modes"],
             res["sampled_identical_across_ranks"], res["failure_raised_everywhere"],
             *greedy.values()]
    res["ok"] = same_on_every_rank(tp, True) and all(flags)
    return res


# ---- speed ---------------------------------------------------------------------------------
def random_shard(c: ModelConfig, tp: TensorParallel, dev: str) -> TPTransformer:
    """This rank's shard with random bf16 weights made on the device (no full model anywhere)."""
    torch.manual_seed(1 + tp.rank)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev), torch.no_grad():
        model = TPTransformer(c, tp).eval().requires_grad_(False)
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    torch.set_default_dtype(torch.float32)
    model.inv_freq = c.inv_freq().to(dev)
    return model


def random_dspark(target: TPTransformer, gamma: int, layers: int, dev: str):
    """A DSpark drafter with random weights, the same on every rank (a replicated drafter must
    propose what the others do), attached to the all-gathered embedding and LM head."""
    c = target.config
    spec = DrafterSpec.for_target(c, "dspark", gamma=gamma, mask_token_id=c.vocab_size - 1,
                                  num_draft_layers=layers)
    parts = target.replicated_parts()
    torch.manual_seed(1234)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev), torch.no_grad():
        model = ParallelDraftModel(spec).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    model.inv_freq = spec.draft_config().inv_freq().to(dev)
    model.attach_target(parts)
    return make_drafter(model, gamma)


class LocalOnly(TensorParallel):
    """``tp``'s calls with every collective replaced by a local copy of the same size: the
    step without its communication (its numbers are wrong; only for timing)."""

    def __init__(self, tp: TensorParallel):
        self.__dict__.update(tp.__dict__)

    def gather(self, x):
        return x.unsqueeze(0).expand(self.world, *x.shape).contiguous()

    def reduce(self, partial):
        return partial.clone() if self.reduce_mode == "allreduce" else super().reduce(partial)


@contextmanager
def without_collectives(model: TPTransformer):
    tp = model.tp
    mods = [m for m in model.modules() if getattr(m, "tp", None) is tp]
    for m in mods:
        m.tp = LocalOnly(tp)
    try:
        yield
    finally:
        for m in mods:
            m.tp = tp


def seconds(fn, cuda: bool, reps: int = 50) -> float:
    """Median seconds of ``fn()``: CUDA-graph replays on GPU, wall clock on CPU."""
    if cuda:
        return graph_replay_seconds(fn, reps)
    fn()
    times = []
    for _ in range(max(3, reps // 10)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def comm_share(model: TPTransformer, B: int, gamma: int, context: int, dev: str) -> dict:
    """Decode and verify forwards at ``context`` cached tokens, with and without collectives."""
    W = gamma + 1
    runner = ModelRunner(model, use_cuda_graphs=False)  # our graphs capture its eager calls
    runner.allocate(B, context + W + 1)
    runner.prefill([[7] * context] * B)
    pos = torch.full((B,), context, device=dev)
    tok = torch.full((B,), 5, device=dev)
    tree = (torch.full((B * W,), 5, device=dev), (torch.arange(W, device=dev) - 1).repeat(B),
            torch.arange(B + 1, device=dev) * W)
    calls = {"decode": lambda: runner.decode(tok, pos),
             "verify": lambda: runner.forward_tree(*tree, pos, W)}
    out = {}
    cuda = model.device.type == "cuda"
    for name, fn in calls.items():
        full = seconds(fn, cuda)
        with without_collectives(model):
            local = seconds(fn, cuda)
        out[name] = dict(ms=round(full * 1e3, 3), without_comm_ms=round(local * 1e3, 3),
                         comm_share=round(1 - local / full, 3))
    return out


def timed(engine, fn: str, prompts, new: int) -> tuple:
    """One warm-up call (graph capture), then the timed one: per-step (round) milliseconds and
    the tokens."""
    getattr(engine, fn)(prompts, max_new_tokens=new, stop_tokens=[])
    g = getattr(engine, fn)(prompts, max_new_tokens=new, stop_tokens=[])
    m = g.metrics
    step = 1e3 * (m.total_s - m.prefill_s) / m.rounds
    row = dict(step_ms=round(step, 3), rounds=m.rounds, tokens_per_s=round(m.decode_tokens_per_s))
    if m.speculative:
        row["tau"] = round(m.tau, 3)
    if m.draft_s:  # stage_times: a graph per stage, timed apart
        row["stages_ms"] = {k: round(1e3 * getattr(m, k + "_s") / m.rounds, 3)
                            for k in ("draft", "target_forward", "accept", "commit", "other")}
    return row, g.tokens


def speed(tp: TensorParallel, dev: str, a) -> dict:
    c = config(a.shape, a.layers)
    model = random_shard(c, tp, dev)
    read = sum(p.numel() * p.element_size() for p in model.parameters()) - \
        model.embed.weight.numel() * 2 + c.hidden_size * 2
    drafter = random_dspark(model, a.gamma, a.draft_layers, dev)
    # the drafter's own weights and the (shared, full) LM head it applies to every draft slot
    draft_read = sum(p.numel() * p.element_size() for p in drafter.model.parameters()) + \
        drafter.model.head_weight.numel() * 2
    out = dict(config=dict(shape=a.shape, layers=c.num_layers, world=tp.world, gamma=a.gamma,
                           draft_layers=a.draft_layers, new=a.new, prompt_len=a.prompt_len),
               weight_read_GB_per_gpu=round(read / 1e9, 3),
               drafter_read_GB_per_gpu=round(draft_read / 1e9, 3), runs=[])
    if dev.startswith("cuda"):
        sys.path.insert(0, os.path.dirname(__file__))
        from bench_ops import copy_bandwidth
        bw = copy_bandwidth()
        out.update(copy_GBps=round(bw / 1e9), floor_ms=round(read / bw * 1e3, 3),
                   round_floor_ms=round((read + draft_read) / bw * 1e3, 3))
    gen = torch.Generator().manual_seed(0)
    for reduce in a.reduce.split(","):
        tp.reduce_mode = reduce
        for B in map(int, a.batch.split(",")):
            prompts = torch.randint(0, c.vocab_size, (B, a.prompt_len), generator=gen).tolist()
            runner = ModelRunner(model)
            row = dict(reduce=reduce, batch=B)
            row["decode"], ar = timed(SpeculativeEngine(runner), "generate_autoregressive",
                                      prompts, a.new)
            if "floor_ms" in out:
                row["decode"]["ratio_to_floor"] = round(row["decode"]["step_ms"] / out["floor_ms"],
                                                        3)
            for mode in a.drafter_modes.split(","):
                # a step = one CUDA graph (how the engine runs); then, with --stage-times, a
                # graph per stage timed apart (the split, at the cost of the extra launches)
                for split in (False, True) if a.stage_times else (False,):
                    name = f"dspark:{mode}" + ("/stages" if split else "")
                    eng = SpeculativeEngine(runner, place_drafter(drafter, tp, mode),
                                            stage_times=split)
                    row[name], spec = timed(eng, "generate", prompts, a.new)
                    row[name]["round_over_decode"] = round(
                        row[name]["step_ms"] / row["decode"]["step_ms"], 3)
                    row[name]["greedy_identical"] = spec == ar
                    del eng
            row["tokens_identical_across_ranks"] = same_on_every_rank(tp, ar)
            row["comm"] = comm_share(model, B, a.gamma, a.prompt_len, dev)
            del runner
            out["runs"].append(row)
            if tp.is_main:
                print(json.dumps(row), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="32b")
    ap.add_argument("--layers", type=int, default=None, help="fewer target layers")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--new", type=int, default=128, help="tokens per timed generate call")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--draft-layers", type=int, default=5)
    ap.add_argument("--reduce", default="gather,allreduce")
    ap.add_argument("--drafter-modes", default=",".join(DRAFTER_MODES))
    ap.add_argument("--stage-times", action="store_true", help="also each DSpark run with its "
                    "stages graphed and timed apart (draft / target forward / accept / commit)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = distributed.local_device(a.device)
    tp = start(dev)
    report = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
              "world": tp.world, "torch": torch.__version__}
    ok = True
    with torch.no_grad():  # not inference_mode: the DSpark drafter reads its weights' versions
        if not a.skip_check:
            report["check"] = check(tp, dev)
            ok = report["check"]["ok"]
            if tp.is_main:
                print(json.dumps({"check": report["check"]}), flush=True)
        if not a.skip_speed:
            report["speed"] = speed(tp, dev, a)
    if tp.is_main and a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    distributed.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
