"""Batch invariance end to end (docs/DESIGN.md property 6): on the dspark kernels (the runner's
fused path; ``batch_invariant=True`` forces it) a token's logits are bit-identical whether the
runner decodes it alone or verifies it inside a chain or a tree block, at any batch size and
cache capacity — fp32, bf16 and fp16, on CPU (CI) and CUDA — so greedy speculative output equals
greedy autoregressive output in bf16 (engine tests at the end, DSpark and n-gram drafters)."""
import os

import pytest
import torch

import dspark  # noqa: F401
from dspark.demo import DEMO_MODELS
from dspark.drafters import DraftModelDrafter, NgramDrafter, load_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import ModelConfig, ModelRunner, load_model
from dspark.models.random import random_transformer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_model(dtype, device, arch="qwen3", seed=0, noise=0.0, vocab=301):
    """A small random model with odd sizes (qkv 384 x 192, down 192 x 320, vocab 301; mistral:
    sliding window 6)."""
    extra = dict(sliding_window=6) if arch == "mistral" else {}
    cfg = ModelConfig.from_dict(dict(
        model_type=arch, vocab_size=vocab, hidden_size=192, intermediate_size=320,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=48,
        max_position_embeddings=1024, **extra))
    return random_transformer(cfg, seed, noise, weight_std=0.15).to(device=device, dtype=dtype)


PROMPTS = [[3, 14, 15, 92, 65, 35, 89], [7, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
STEPS = 6


def autoregressive(model, prompts, capacity):
    """Greedy decode STEPS tokens per request: tokens [B, STEPS] (the first from the prefill)
    and the decode logits of each step [STEPS - 1, B, V] (after tokens[:, s], s < STEPS - 1)."""
    runner = ModelRunner(model, batch_invariant=True)
    runner.allocate(len(prompts), capacity)
    tok = runner.prefill(prompts).logits.argmax(-1)
    start = torch.tensor([len(p) for p in prompts], device=tok.device)
    tokens, logits = [tok], []
    for s in range(STEPS - 1):
        lg = runner.decode(tok, start + s).clone()
        logits.append(lg)
        tok = lg.argmax(-1)
        tokens.append(tok)
    return torch.stack(tokens, 1), torch.stack(logits)


def verify_rows(model, prompts, blocks, capacity):
    """One packed verify of blocks[r] = (tokens, parents) after prefilling the prompts: logits of
    every node [N, V] and the node offsets."""
    runner = ModelRunner(model, batch_invariant=True)
    runner.allocate(len(prompts), capacity)
    runner.prefill(prompts)
    dev = model.device
    toks = torch.tensor([t for ts, _ in blocks for t in ts], device=dev)
    pars = torch.tensor([p for _, ps in blocks for p in ps], device=dev)
    offs = torch.tensor([0] + torch.cumsum(torch.tensor([len(t) for t, _ in blocks]), 0).tolist(),
                        device=dev)
    start = torch.tensor([len(p) for p in prompts], device=dev)
    W = max(len(t) for t, _ in blocks)
    return runner.forward_tree(toks, pars, offs, start, max_nodes=W).logits.clone(), offs.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_decode_logits_equal_verify_rows(device, dtype, arch):
    """runner.decode's logits == the matching rows of one packed verify (chains and trees with
    off-path siblings, 3 requests or one alone, other cache capacities), bit for bit. (The
    prefill, shared by both runs, stays on cuBLAS / MKL: each case prefills the same batch.)"""
    model = random_model(dtype, device, arch)
    for prompts, ar_cap, verify_cap in ((PROMPTS, 64, 200), (PROMPTS[1:2], 64, 37)):
        tokens, ar_logits = autoregressive(model, prompts, ar_cap)
        # Request r verifies its AR tokens as a chain, or (odd r) as a tree: the path 0-1-..-5
        # with siblings hanging off nodes 0, 2 and 3 (other tokens, their own positions).
        chain = list(range(-1, STEPS - 1))
        blocks = []
        for r, t in enumerate(tokens.tolist()):
            if (r + len(prompts)) % 2 == 0:
                blocks.append((t, chain + [0, 2, 3]))
                blocks[-1][0].extend([(t[1] + 1) % 301, (t[3] + 5) % 301, 17])
            else:
                blocks.append((t, chain))
        logits, offs = verify_rows(model, prompts, blocks, verify_cap)
        for r in range(len(prompts)):
            for s in range(STEPS - 1):  # node s's logits predict token s + 1
                got, want = logits[offs[r] + s], ar_logits[s, r]
                assert torch.equal(got, want), (
                    f"B={len(prompts)} request {r} step {s}: "
                    f"max diff {(got - want).abs().max():.3g}")


def test_tree_commit_then_decode_equals_autoregressive(device):
    """bf16: verify a tree whose accepted path is not its first branch, compact the path
    (runner.commit), keep decoding: the logits equal the autoregressive run's, bit for bit."""
    model = random_model(torch.bfloat16, device, seed=3)
    prompts = PROMPTS[:2]
    tokens, ar_logits = autoregressive(model, prompts, capacity=64)
    runner = ModelRunner(model, batch_invariant=True)
    runner.allocate(len(prompts), 96)
    runner.prefill(prompts)
    dev = model.device
    t = tokens.tolist()
    # request r: root t0, a wrong child, then the true path t1, t2 under the root's second child
    blocks = [[t[r][0], (t[r][1] + 7) % 301, t[r][1], t[r][2]] for r in range(2)]
    parents = [-1, 0, 0, 2]
    toks = torch.tensor(blocks, device=dev).view(-1)
    pars = torch.tensor(parents * 2, device=dev)
    start = torch.tensor([len(p) for p in prompts], device=dev)
    fwd = runner.forward_tree(toks, pars, torch.tensor([0, 4, 8], device=dev), start, max_nodes=4)
    for r in range(2):
        assert torch.equal(fwd.logits[4 * r + 2], ar_logits[1, r])  # node 2 = token t1
        assert torch.equal(fwd.logits[4 * r + 3], ar_logits[2, r])
    nodes = torch.tensor([[0, 2, 3, -1]] * 2, device=dev)
    runner.commit(start, nodes, torch.tensor([2, 2], device=dev))
    tok = tokens[:, 3]
    for s in range(3, STEPS - 1):
        lg = runner.decode(tok, start + s)
        assert torch.equal(lg, ar_logits[s])
        tok = tokens[:, s + 1]


def test_batch_invariant_option():
    model = random_model(torch.float32, "cpu")
    runner = ModelRunner(model, batch_invariant=True)
    assert runner.fused and runner._fuse(10_000, 64)
    with pytest.raises(ValueError, match="blocks of 65 tokens"):
        runner._fuse(65, 65)
    with pytest.raises(ValueError, match="batch_invariant needs"):
        ModelRunner(model, fused=False, batch_invariant=True)
    gelu = random_model(torch.float32, "cpu")
    gelu.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="batch_invariant needs"):
        ModelRunner(gelu, batch_invariant=True)


def test_fused_max_rows_option():
    """fused_max_rows moves the fused / cuBLAS crossover per model; the SPS table key names it;
    bad values are refused by name."""
    from dspark.scheduler import sps_key
    model = random_model(torch.float32, "cpu")
    default = ModelRunner(model, fused=True)
    assert default._fuse(64, 8) and not default._fuse(65, 8)
    eight = ModelRunner(model, fused=True, fused_max_rows=8)
    assert eight._fuse(8, 8) and not eight._fuse(9, 8) and not eight._fuse(16, 8)
    assert ModelRunner(model, fused=True, batch_invariant=True, fused_max_rows=8)._fuse(64, 8)
    assert sps_key(eight)["variant"] == "fused-max8"
    assert sps_key(default)["variant"] == "fused"
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="fused_max_rows"):
            ModelRunner(model, fused=True, fused_max_rows=bad)


def test_fused_max_rows_greedy_fp32():
    """A verify above fused_max_rows leaves the fused kernels (cuBLAS / SDPA path): fp32 greedy
    speculative output is still the autoregressive text."""
    target = random_model(torch.float32, "cpu", seed=1, vocab=128)
    eng = SpeculativeEngine(target, NgramDrafter(4), fused=True, fused_max_rows=2)
    assert eng.target.fused_max_rows == 2
    spec = eng.generate(ENGINE_PROMPTS, max_new_tokens=16, stop_tokens=[])
    ar = eng.generate_autoregressive(ENGINE_PROMPTS, max_new_tokens=16, stop_tokens=[])
    assert spec.tokens == ar.tokens


ENGINE_PROMPTS = [[1, 5, 7, 9, 5, 7], [3, 4], [10, 11, 12, 13, 14, 10, 11, 12], [42, 42, 42]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["ngram", "draft-chain", "draft-tree"])
def test_greedy_speculative_equals_autoregressive(device, dtype, batch, kind):
    """Greedy speculative == greedy autoregressive in 16-bit precision (different verify block
    sizes, batch sizes and cache capacities than the autoregressive run)."""
    target = random_model(dtype, device, seed=1, vocab=128)
    if kind == "ngram":
        drafter = NgramDrafter(4)
    else:
        draft = random_model(dtype, device, seed=1, noise=0.05, vocab=128)
        drafter = DraftModelDrafter(draft, 4, tree_topk=2 if kind == "draft-tree" else 1)
    eng = SpeculativeEngine(target, drafter, batch_invariant=True)
    spec = eng.generate(ENGINE_PROMPTS[:batch], max_new_tokens=24, stop_tokens=[])
    ar = eng.generate_autoregressive(ENGINE_PROMPTS[:batch], max_new_tokens=24, stop_tokens=[])
    assert spec.tokens == ar.tokens
    assert spec.metrics.tau > 1.0 or kind == "ngram"


@pytest.mark.parametrize("batch", [1, 4])
def test_dspark_drafter_greedy_equals_autoregressive_bf16(device, batch):
    """The shipped trained pair with the target in bf16: DSpark drafts verified on the batch-
    invariant runner give exactly the autoregressive text."""
    target_dir = os.path.join(DEMO_MODELS, "target")
    target = load_model(target_dir, device, torch.bfloat16)
    drafter = load_drafter(os.path.join(DEMO_MODELS, "dspark"), target)
    prompts = [[5, 80, 17, 301, 44, 9], [12, 13, 14], [700, 31, 2, 2, 2, 8, 1000], [3]][:batch]
    eng = SpeculativeEngine(target, drafter, batch_invariant=True)
    spec = eng.generate(prompts, max_new_tokens=40, stop_tokens=[])
    ar = eng.generate_autoregressive(prompts, max_new_tokens=40, stop_tokens=[])
    assert spec.tokens == ar.tokens
    assert spec.metrics.tau > 1.0


def test_cli_batch_invariant_bf16(tmp_path):
    """dspark generate --batch-invariant --dtype bfloat16 --compare: identical greedy text."""
    import contextlib
    import io
    import json

    from dspark.cli import main

    from helpers import make_checkpoint
    tgt, dft = str(tmp_path / "t"), str(tmp_path / "d")
    make_checkpoint(tgt, "qwen3", vocab=128, layers=2, init=0.3, seed=1)
    make_checkpoint(dft, "qwen3", vocab=128, layers=2, init=0.3, seed=1, perturb=0.05)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["generate", "--target", tgt, "--drafter", dft, "--prompt", "w5 w6 w7",
                   "--prompt", "w9", "--batch", "2", "--max-new-tokens", "12", "--gamma", "3",
                   "--tree-topk", "2", "--compare", "--json", "--device", "cpu", "--dtype",
                   "bfloat16", "--batch-invariant"])
    assert rc == 0 and json.loads(buf.getvalue())["identical_text"]
