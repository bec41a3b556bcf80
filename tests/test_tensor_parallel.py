"""Tensor parallelism on CPU with gloo (dspark.models.tp, dspark.distributed), 2 and 4 ranks.

One ``torch.multiprocessing.spawn`` per world size runs every check on every rank
(tests/tp_worker.py; spawned processes importing torch dominate the time); the tests below read
what the ranks saved. The sharded model's logits equal the single-process model's in fp32 up to
the summation order of the reduces (the partial sums of a row-parallel projection are added
across ranks, not inside one matmul: allclose, not bitwise; with one rank they are bitwise
equal), its tokens equal the single process's, and everything every rank computes is
bit-identical across ranks (the logits rows ``verify`` reads above all), so ranks take identical
accept / reject decisions and commit identical tokens. The CLI tests launch ``torchrun``.
"""
import dataclasses
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import tp_worker
from safetensors.torch import load_file, save_file

from dspark.models import ModelConfig, load_model
from dspark.models.tp import check_tp_config

from helpers import make_checkpoint

WORLDS = [2, 4]
RTOL = ATOL = 2e-5  # fp32; the reduce adds the ranks' partial sums in another order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    p = {k: str(root / k) for k in ("llama", "qwen3", "draft", "bad_heads", "corrupt",
                                    "bad_shape")}
    # biases everywhere (q/k/v, o and MLP: the row-parallel biases are added once), vocab 97
    # (not divisible by 2 or 4: padded vocab slices), several safetensors files (an index)
    big = dict(vocab=97, hidden=64, layers=2, heads=8, kv_heads=4, inter=96, init=0.3, seed=1)
    make_checkpoint(p["llama"], "llama", attention_bias=True, mlp_bias=True, shard="40KB", **big)
    make_checkpoint(p["draft"], "llama", attention_bias=True, mlp_bias=True, perturb=0.05, **big)
    # QK-norm, tied embedding / LM head, head_dim 24
    make_checkpoint(p["qwen3"], "qwen3", vocab=97, hidden=96, layers=2, heads=4, kv_heads=4,
                    inter=64, init=0.3)
    make_checkpoint(p["bad_heads"], "llama", vocab=97, hidden=48, heads=6, kv_heads=3, inter=96)
    shutil.copytree(p["llama"], p["corrupt"])
    first = sorted(f for f in os.listdir(p["corrupt"]) if f.endswith(".safetensors"))[0]
    with open(os.path.join(p["corrupt"], first), "r+b") as f:
        f.truncate(100)  # a header that promises more than the file holds
    # q_proj of layer 0 with two extra rows: every rank's slice of it would look right
    shutil.copytree(p["llama"], p["bad_shape"])
    name = "model.layers.0.self_attn.q_proj.weight"
    for file in glob.glob(os.path.join(p["bad_shape"], "*.safetensors")):
        tensors = load_file(file)
        if name in tensors:
            tensors[name] = torch.cat([tensors[name], tensors[name][:2]])
            save_file(tensors, file, metadata={"format": "pt"})
    return p


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def ranks(request, paths, tmp_path_factory):
    """Every rank's results (rank order) of one spawned run over ``world`` gloo processes."""
    world = request.param
    out = str(tmp_path_factory.mktemp(f"tp{world}"))
    demo = world == 2  # the shipped pair has 2 KV heads: it splits over 2 ranks only
    try:
        mp.spawn(tp_worker.run, args=(world, free_port(), paths, out, demo), nprocs=world,
                 join=True)
    except mp.ProcessExitedException as exc:
        saved = sorted(f for f in os.listdir(out) if f.startswith("rank"))
        done_but_died = len(saved) == world  # the run finished; a rank died while exiting
        raise AssertionError(f"{exc}; results saved by {saved or 'no rank'} of {world} ranks "
                             f"(done_but_died={done_but_died})") from exc
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def single(paths):
    """The single-process model's forwards (the reference) per model and path."""
    out = {}
    for name in ("llama", "qwen3"):
        model = load_model(paths[name], dtype=torch.float32)
        for fused in (False, True):
            out[f"{name}:fused={fused}"] = tp_worker.forwards(model, fused)
    return out


@pytest.mark.parametrize("key", ["llama:fused=False", "llama:fused=True", "qwen3:fused=False",
                                 "qwen3:fused=True"])
def test_tp_logits_match_single_process(ranks, single, key):
    """Prefill, decode and chain + tree verify logits (and tapped hidden states) of the sharded
    model equal the single-process model's (unfused: F.linear + SDPA per shard; fused: the dspark
    kernels per shard)."""
    for r, res in enumerate(ranks):
        for part, want in single[key].items():
            torch.testing.assert_close(res[key][part], want, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {r} {key} {part}: {m}")


def test_tp_ranks_see_identical_logits(ranks):
    """The full logits rows (all-gathered vocab slices) and the replicated hidden states are
    bit-identical on every rank: what makes verify's decisions identical by construction."""
    for res in ranks[1:]:
        for key in ("llama:fused=False", "llama:fused=True", "qwen3:fused=True"):
            for part, t in res[key].items():
                assert torch.equal(t, ranks[0][key][part]), (key, part)


def test_tp_decode_rows_equal_verify_rows_bitwise(ranks):
    """On the dspark kernels with the rank-order reduce, the rows of a verified chain are
    bit-identical to decoding its tokens one step at a time (batch invariance survives the
    sharding: every shard's kernels and the reduce sum in an order fixed by the shapes)."""
    n = len(tp_worker.TREES[0][0])
    for res in ranks:
        for name in ("llama", "qwen3"):
            f = res[f"{name}:fused=True"]
            assert torch.equal(f["chain_decoded"], f["verify"][:n]), name


def test_tp_shards_hold_their_slices(ranks, paths):
    """Each rank holds 1/world of every sharded weight (vocab rows padded to a multiple of the
    world), the replicated ones whole, and allocates its KV heads only; the loader read every
    sharded tensor through get_slice (get_tensor raised in the workers)."""
    world = len(ranks)
    full = load_model(paths["llama"], dtype=torch.float32).state_dict()
    c = ModelConfig.from_dir(paths["llama"])
    for res in ranks:
        shapes = res["llama:shapes"]
        assert res["llama:cache_kv_heads"] == c.num_kv_heads // world
        assert shapes["embed.weight"] == (-(-c.vocab_size // world), c.hidden_size)
        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim // world
        assert shapes["layers.0.attn.qkv.weight"] == (qkv, c.hidden_size)
        o_cols = c.num_heads * c.head_dim // world
        assert shapes["layers.0.attn.o.weight"] == (c.hidden_size, o_cols)
        assert shapes["layers.0.attn.o.bias"] == full["layers.0.attn.o.bias"].shape
        assert shapes["layers.0.mlp.gate_up.weight"] == (2 * c.intermediate_size // world,
                                                         c.hidden_size)
        assert shapes["layers.0.mlp.down.weight"] == (c.hidden_size, c.intermediate_size // world)
        assert shapes["norm.weight"] == full["norm.weight"].shape
        # shard_model (an in-memory model cut the same way) holds the same tensors
        assert set(res["shard_model"]) == set(shapes) and all(res["shard_model"].values())


@pytest.mark.parametrize("mode", ["replicated", "broadcast"])
def test_tp_greedy_speculative_equals_autoregressive(ranks, mode):
    """Greedy speculative decoding under TP (n-gram, draft-model chain and tree drafters,
    replicated or broadcast from rank 0) commits exactly the autoregressive tokens of the same
    TP run, on every rank, and drafts were accepted."""
    for res in ranks:
        runs = res["engine:" + mode]
        for name in ("ngram", "draft-chain", "draft-tree"):
            assert runs[name] == runs["ar"], (mode, name)
            assert runs[name + ":accepted"] > 0, (mode, name)
        assert runs == ranks[0]["engine:" + mode]


def test_tp_sampled_outputs_identical_across_ranks(ranks):
    """Sampled (T = 1, top-p 0.9) speculative decoding with a replicated or broadcast draft
    model: every rank commits the same tokens (the same logits rows and seeds reach verify), and
    broadcasting the proposal changes nothing."""
    want = ranks[0]["engine:replicated"]["sampled"]
    assert len(want) == len(tp_worker.GEN_PROMPTS)
    for res in ranks:
        assert res["engine:replicated"]["sampled"] == want
        assert res["engine:broadcast"]["sampled"] == want


def test_tp_trained_drafter(ranks):
    """The shipped DSpark drafter under TP over 2 ranks: greedy speculative == autoregressive,
    replicated or broadcast; sampled tokens identical on every rank and in both modes (the
    broadcast carries the drafter's distributions)."""
    if "demo" not in ranks[0]:
        pytest.skip("the demo target's 2 KV heads do not split over 4 ranks")
    want = ranks[0]["demo"]
    assert want["replicated"] == want["broadcast"] == want["ar"]
    assert want["replicated:sampled"] == want["broadcast:sampled"]
    for res in ranks:
        assert res["demo"] == want


def test_tp_tokens_equal_single_process(ranks, paths):
    """Greedy and sampled tokens under TP are the single-process model's (fp32: the logits
    differ from it by rounding only, far from every decision here)."""
    from dspark.drafters import DraftModelDrafter
    from dspark.engine import SpeculativeEngine

    target = load_model(paths["llama"], dtype=torch.float32)
    draft = load_model(paths["draft"], dtype=torch.float32)
    kw = dict(max_new_tokens=tp_worker.NEW, stop_tokens=[])
    ar = SpeculativeEngine(target, batch_invariant=True).generate_autoregressive(
        tp_worker.GEN_PROMPTS, **kw).tokens
    eng = SpeculativeEngine(target, DraftModelDrafter(draft, 3), batch_invariant=True)
    sampled = eng.generate(tp_worker.GEN_PROMPTS, temperature=1.0, top_p=0.9, seed=[7, 8, 9],
                           **kw).tokens
    for res in ranks:
        assert res["engine:replicated"]["ar"] == ar
        assert res["engine:replicated"]["sampled"] == sampled


@pytest.mark.parametrize("case,match", [
    ("patched", r"rank 1: OSError: injected: rank 1 cannot read its shard"),
    ("corrupt", r"failed on 1 of \d ranks: rank 1: \w+"),
    ("bad_heads", r"failed on (\d) of \1 ranks: ranks 0, 1.*: ValueError: tensor parallel over "
                  r"\d ranks .* must be divisible by \d: .*num_key_value_heads 3"),
    ("bad_shape", r"failed on (\d) of \1 ranks: ranks 0, 1.*: CheckpointError: .*\.safetensors: "
                  r"weight layers\.0\.attn\.q_proj\.weight has shape \[66, 64\], the config "
                  r"implies \[64, 64\]"),
])
def test_tp_load_failure_raises_on_every_rank(ranks, case, match):
    """A shard that fails to load on one rank (a monkeypatched loader raising on rank 1; a
    corrupted file only rank 1 reads), a config the world cannot split and a wrongly shaped
    tensor give every rank the same clear error, promptly (not a collective timing out)."""
    for r, res in enumerate(ranks):
        err, seconds = res["failures"][case]
        assert err is not None and re.search(match, err), (r, err)
        assert seconds < tp_worker.WORKER_TIMEOUT_S / 2, (r, seconds)
        # the same failure report everywhere (the path in front is each rank's own)
        assert err.split(" failed on ")[1] == ranks[0]["failures"][case][0].split(" failed on ")[1]


def test_check_tp_config():
    c = ModelConfig.from_dict(dict(model_type="llama", vocab_size=50, hidden_size=48,
                                   intermediate_size=90, num_hidden_layers=1,
                                   num_attention_heads=6, num_key_value_heads=3))
    check_tp_config(c, 3)
    with pytest.raises(ValueError, match="num_key_value_heads 3, intermediate_size 90 are not"):
        check_tp_config(c, 4)
    with pytest.raises(ValueError, match="num_key_value_heads 3 are not"):
        check_tp_config(c, 2)
    with pytest.raises(ValueError, match="world size must be >= 1"):
        check_tp_config(c, 0)
    tiny_vocab = dataclasses.replace(c, vocab_size=4, intermediate_size=96)
    with pytest.raises(ValueError, match="a vocabulary of 4 leaves some of 3 ranks no rows"):
        check_tp_config(tiny_vocab, 3)


def test_tp_bad_setup_errors(monkeypatch):
    """Launch mistakes get one clear line each, before any collective can hang."""
    from dspark.distributed import TensorParallel, init_from_env, local_device
    from dspark.drafters import NgramDrafter
    from dspark.drafters.tp import place_drafter

    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        TensorParallel()
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE is set but .*MASTER_ADDR.* launch with "
                                         "torchrun"):
        init_from_env("cpu")
    with pytest.raises(ValueError, match="each rank runs on cuda:LOCAL_RANK: pass --device cuda"):
        local_device("cuda:1")
    with pytest.raises(ValueError, match="drafter mode must be one of"):
        place_drafter(NgramDrafter(3), None, "sharded")


def test_tp_world1_is_the_single_process_model(paths):
    """A world of one rank (gloo, in this process): every reduce and gather is the identity, so
    the TP model's logits and taps equal the plain model's bit for bit (unfused and fused)."""
    import torch.distributed as dist

    from dspark.distributed import TensorParallel, shutdown
    from dspark.models.tp_loader import load_model_tp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        tp = TensorParallel()
        with pytest.raises(ValueError, match="reduce must be one of"):
            TensorParallel(reduce="ring")
        shard = load_model_tp(paths["qwen3"], tp, dtype=torch.float32)
        full = load_model(paths["qwen3"], dtype=torch.float32)
        for fused in (False, True):
            got, want = tp_worker.forwards(shard, fused), tp_worker.forwards(full, fused)
            for part in want:
                assert torch.equal(got[part], want[part]), (fused, part)
        # ranks profiling their own SPS tables could disagree on a row bucket and deadlock
        from dspark.drafters import NgramDrafter
        from dspark.engine import SpeculativeEngine
        with pytest.raises(ValueError, match="not supported with a tensor-parallel target"):
            SpeculativeEngine(shard, NgramDrafter(3), schedule="threshold:0.5")
    finally:
        shutdown()


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node 2 -m dspark.cli ARGS`` (gloo, CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "dspark.cli", *args, "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DSPARK_DIST_TIMEOUT="60")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env,
                          cwd=os.path.dirname(__file__))


def test_tp_generate_cli_under_torchrun(paths):
    """`dspark generate` under `torchrun --nproc-per-node 2` (gloo): one report, printed by
    rank 0 only; greedy speculative text equals the autoregressive text of the same run."""
    out = torchrun("generate", "--target", paths["llama"], "--ngram", "3", "--prompt",
                   "w3 w5 w7 w3 w5", "--max-new-tokens", "6", "--compare", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count('"identical_text"') == 1, out.stdout
    assert '"identical_text": true' in out.stdout


def test_tp_bench_cli_under_torchrun(paths, tmp_path):
    """`dspark bench` under torchrun with the draft model broadcast from rank 0: one report
    (rank 0's), tagged with the tensor-parallel setup, greedy outputs identical."""
    data = tmp_path / "words.jsonl"
    data.write_text('{"turns": ["w3 w5 w7 w3 w5 w7"]}\n{"turns": ["w10 w11 w12"]}\n')
    out = torchrun("bench", "--target", paths["llama"], "--drafter", paths["draft"],
                   "--gamma", "3", "--dataset", str(data), "--prompts", "2",
                   "--max-new-tokens", "6", "--batch", "2", "--tp-drafter", "broadcast",
                   "--json", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["tensor_parallel"] == {"world": 2, "reduce": "gather", "drafter": "broadcast"}
    spec = [r for r in report["runs"] if r["method"] != "autoregressive"]
    assert spec and all(r["greedy_identical_fraction"] == 1.0 for r in spec)


def test_tp_cli_error_on_every_rank(paths):
    """A target the world cannot split: every rank prints the same one-line error and the run
    exits non-zero (no hang, no traceback from dspark: torchrun prints its own report)."""
    out = torchrun("generate", "--target", paths["bad_heads"], "--ngram", "3", "--prompt", "w3")
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("dspark generate: error")]
    assert len(lines) == 2, out.stderr[-2000:]
    for r in (0, 1):
        assert any(f"(rank {r} of 2)" in ln and "must be divisible by 2" in ln for ln in lines)
    assert not re.search(r'File ".*/dspark/', out.stderr), out.stderr[-2000:]
