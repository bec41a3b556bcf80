"""dspark.models against transformers on tiny random checkpoints (fp32, CPU)."""
import json
import os

import pytest
import torch

import dspark  # noqa: F401
from dspark.models import (
    FUSED_MAX_ROWS,
    ModelConfig,
    ModelRunner,
    load_model,
    load_tokenizer,
    resolve_dtype,
)

from helpers import ARCHS, make_checkpoint

transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    hf = make_checkpoint(path, request.param, shard="40KB" if request.param == "qwen2" else None)
    return hf, load_model(path, dtype=torch.float32), path


def hf_logits(hf, seq):
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


PROMPTS = [[3, 14, 15, 92, 65, 35, 89], [7, 9], [11, 12, 13, 14]]
ATOL = 1e-4


def test_loader_reads_config_and_shards(pair):
    hf, model, path = pair
    assert model.config.num_layers == hf.config.num_hidden_layers
    assert model.config.eos_token_ids == (hf.config.vocab_size - 1,)
    if model.config.model_type == "qwen2":
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert load_tokenizer(path).encode("w3 w5").ids == [3, 5]


@pytest.mark.parametrize("pad", [False, True])
def test_prefill_and_decode_match_transformers(pair, pad):
    """pad: the prompt block padded to its CUDA-graph bucket (16 rows here), as a GPU prefill
    is: padding rows change neither the logits nor what decoding reads from the cache."""
    hf, model, _ = pair
    runner = ModelRunner(model)
    runner.pad_prefill = pad
    runner.allocate(len(PROMPTS), 32)
    out = runner.prefill(PROMPTS)
    for b, p in enumerate(PROMPTS):
        torch.testing.assert_close(out.logits[b], hf_logits(hf, p)[-1], atol=ATOL, rtol=0)
    nxt = torch.tensor([5, 6, 7])
    start = torch.tensor([len(p) for p in PROMPTS])
    for step in range(3):  # several decode steps
        logits = runner.decode(nxt + step, start + step)
        for b, p in enumerate(PROMPTS):
            seq = p + [int(nxt[b]) + s for s in range(step + 1)]
            torch.testing.assert_close(logits[b], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)


# request 0: chain of 4 drafts; request 1: a tree; request 2: root only (no drafts)
TREES = [([40, 41, 42, 43, 44], [-1, 0, 1, 2, 3]),
         ([50, 51, 52, 53, 54, 55, 56], [-1, 0, 0, 1, 2, 2, 4]),
         ([60], [-1])]


def paths(parents):
    out = []
    for j in range(len(parents)):
        path, cur = [], j
        while cur >= 0:
            path.append(cur)
            cur = parents[cur]
        out.append(path[::-1])
    return out


def verify_block(runner, taps=()):
    toks = torch.tensor([t for ts, _ in TREES for t in ts])
    pars = torch.tensor([p for _, ps in TREES for p in ps])
    offs = torch.tensor([0] + list(torch.cumsum(torch.tensor([len(t) for t, _ in TREES]), 0)))
    start = torch.tensor([len(p) for p in PROMPTS])
    return runner.forward_tree(toks, pars, offs, start, max_nodes=8, taps=taps), offs, start


def test_verify_chain_and_tree_match_transformers(pair):
    hf, model, _ = pair
    runner = ModelRunner(model)
    runner.allocate(len(PROMPTS), 32)
    runner.prefill(PROMPTS)
    taps = (-1, 0, 1)
    (logits, hidden), offs, _ = verify_block(runner, taps)
    assert logits.shape == (int(offs[-1]), model.config.vocab_size)
    assert hidden.shape == (3, int(offs[-1]), model.config.hidden_size)
    for r, (toks, pars) in enumerate(TREES):
        for j, path in enumerate(paths(pars)):
            seq = PROMPTS[r] + [toks[i] for i in path]
            with torch.no_grad():
                ref = hf(torch.tensor([seq]), output_hidden_states=True)
            row = int(offs[r]) + j
            torch.testing.assert_close(logits[row], ref.logits[0, -1], atol=ATOL, rtol=0)
            for t, layer in enumerate(taps):
                torch.testing.assert_close(hidden[t, row], ref.hidden_states[layer + 1][0, -1],
                                           atol=ATOL, rtol=0)


def test_fused_runner_matches_transformers(pair):
    """fused=True (the CUDA default): decode of 3 requests, an extend block and the packed
    chain + tree verify run entirely on dspark::fused_linear + dspark::decode_attention (every
    architecture, sliding windows included) and still give transformers' logits and taps."""
    hf, model, _ = pair
    runner = ModelRunner(model, fused=True)
    assert runner.fused and model.can_fuse(FUSED_MAX_ROWS)
    assert not model.can_fuse(FUSED_MAX_ROWS + 1)
    runner.allocate(len(PROMPTS), 32)
    runner.prefill(PROMPTS)
    start = torch.tensor([len(p) for p in PROMPTS])
    logits = runner.decode(torch.tensor([5, 6, 7]), start)
    for b, p in enumerate(PROMPTS):
        torch.testing.assert_close(logits[b], hf_logits(hf, p + [5 + b])[-1], atol=ATOL, rtol=0)
    block = torch.tensor([[5, 8, 9], [6, 8, 9], [7, 8, 9]])
    logits = runner.extend(block, start, last=torch.tensor([2, 1, 0])).logits
    for b, p in enumerate(PROMPTS):
        seq = p + block[b].tolist()[:3 - b]
        torch.testing.assert_close(logits[b], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)
    runner.prefill(PROMPTS)
    taps = (-1, 1)
    (logits, hidden), offs, _ = verify_block(runner, taps)
    for r, (toks, pars) in enumerate(TREES):
        for j, path in enumerate(paths(pars)):
            seq = PROMPTS[r] + [toks[i] for i in path]
            with torch.no_grad():
                ref = hf(torch.tensor([seq]), output_hidden_states=True)
            row = int(offs[r]) + j
            torch.testing.assert_close(logits[row], ref.logits[0, -1], atol=ATOL, rtol=0)
            for t, layer in enumerate(taps):
                torch.testing.assert_close(hidden[t, row], ref.hidden_states[layer + 1][0, -1],
                                           atol=ATOL, rtol=0)


@pytest.mark.parametrize("pad", [False, True])
def test_prefill_taps_match_transformers(pair, pad):
    hf, model, _ = pair
    runner = ModelRunner(model)
    runner.pad_prefill = pad
    runner.allocate(1, 16)
    out = runner.prefill(PROMPTS[:1], taps=(1, -1))
    assert out.hidden.shape[2] == len(PROMPTS[0])  # the prompt's rows, not the bucket's
    with torch.no_grad():
        ref = hf(torch.tensor(PROMPTS[:1]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.hidden[0, 0], ref[2][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden[1, 0], ref[0][0], atol=ATOL, rtol=0)


def test_commit_tree_equals_fresh_prefill(pair):
    """Accept path root -> node 2 -> node 5 of the tree: the compacted cache equals a prefill."""
    _, model, _ = pair
    runner = ModelRunner(model)
    runner.allocate(len(PROMPTS), 32)
    runner.prefill(PROMPTS)
    _, offs, start = verify_block(runner)
    nodes = torch.tensor([[0, 1, 2, 3, -1], [0, 2, 5, -1, -1], [0, -1, -1, -1, -1]])
    count = torch.tensor([3, 2, 0])
    flat = torch.nn.functional.pad(nodes + offs[:-1, None], (0, 3), value=-1)  # verify's [R, 8]
    runner.commit(start, flat, count, offs)
    fresh = ModelRunner(model)
    fresh.allocate(1, 32)
    for r, (toks, _) in enumerate(TREES):
        seq = PROMPTS[r] + [toks[int(i)] for i in nodes[r, :int(count[r]) + 1]]
        fresh.prefill([seq])
        n = len(seq)
        torch.testing.assert_close(runner.cache.k[:, r, :, :n], fresh.cache.k[:, 0, :, :n],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(runner.cache.v[:, r, :, :n], fresh.cache.v[:, 0, :, :n],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_loads_and_runs(tmp_path, dtype):
    hf = make_checkpoint(str(tmp_path), "qwen3")
    model = load_model(str(tmp_path), dtype=dtype)
    assert model.dtype == dtype
    runner = ModelRunner(model)
    runner.allocate(1, 16)
    logits = runner.prefill(PROMPTS[:1]).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], hf_logits(hf, PROMPTS[0])[-1], atol=0.1, rtol=0.05)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gpt2"}, f)
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_dir(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float8")


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_runner_matches_transformers(tmp_path, fused):
    """runner(compile=True): the torch.compile'd decode and tree verify give the eager logits
    (fused: with dspark::fused_linear inside the compiled graph, as on CUDA)."""
    hf = make_checkpoint(str(tmp_path), "qwen3")
    model = load_model(str(tmp_path), dtype=torch.float32)
    runner = ModelRunner(model, compile=True, fused=fused)
    runner.allocate(len(PROMPTS), 32)
    runner.prefill(PROMPTS)
    start = torch.tensor([len(p) for p in PROMPTS])
    logits = runner.decode(torch.tensor([5, 6, 7]), start)
    for b, p in enumerate(PROMPTS):
        torch.testing.assert_close(logits[b], hf_logits(hf, p + [5 + b])[-1], atol=ATOL, rtol=0)
    runner.prefill(PROMPTS)  # overwrite the decoded slots again
    (logits, _), offs, _ = verify_block(runner)
    for r, (toks, pars) in enumerate(TREES):
        for j, path in enumerate(paths(pars)):
            seq = PROMPTS[r] + [toks[i] for i in path]
            torch.testing.assert_close(logits[int(offs[r]) + j], hf_logits(hf, seq)[-1],
                                       atol=ATOL, rtol=0)


def test_compiled_fused_decode_matches_transformers(tmp_path):
    """compile=True + fused (the CUDA configuration): the compiled decode that runs on
    fused_linear + decode_attention (mutating the cache inside the graph) gives transformers'
    logits, step after step."""
    hf = make_checkpoint(str(tmp_path), "qwen3")
    model = load_model(str(tmp_path), dtype=torch.float32)
    runner = ModelRunner(model, compile=True, fused=True)
    prompts = PROMPTS[:2]
    runner.allocate(len(prompts), 32)
    runner.prefill(prompts)
    start = torch.tensor([len(p) for p in prompts])
    for step in range(3):
        logits = runner.decode(torch.tensor([5, 6]) + step, start + step)
        for b, p in enumerate(prompts):
            seq = p + [5 + b + s for s in range(step + 1)]
            torch.testing.assert_close(logits[b], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)


def test_compile_mode_with_its_own_cuda_graphs_is_refused(tmp_path):
    make_checkpoint(str(tmp_path), "llama")
    model = load_model(str(tmp_path), dtype=torch.float32)
    with pytest.raises(ValueError, match="compile mode"):
        ModelRunner(model, compile="reduce-overhead")


@pytest.mark.cuda
def test_cuda_graphed_prefill_equals_eager():
    """On a GPU the prefill replays a graph per (batch, row bucket): new prompts of the same
    bucket (copied into the graph's inputs) give the eager prefill's logits and taps (the eager
    GPU runner pads the same way: the same bits), and the outputs handed back are copies (the
    next replay does not change them)."""
    from dspark.demo import _random_qwen3
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model = _random_qwen3(97, seed=5, device="cuda")
    graphed, eager = ModelRunner(model), ModelRunner(model, use_cuda_graphs=False)
    assert graphed.use_cuda_graphs
    first = None
    for prompts in ([[3, 4, 5, 6, 7], [8, 9]], [[10] * 12, [11, 12, 13]], [[1] * 9, [2] * 16]):
        for r in (graphed, eager):
            r.allocate(len(prompts), 64)
        got, want = graphed.prefill(prompts, taps=(0, 1)), eager.prefill(prompts, taps=(0, 1))
        assert torch.equal(got.logits, want.logits) and torch.equal(got.hidden, want.hidden)
        if first is None:
            first = (got.logits, got.logits.clone())
    assert len(graphed._graphs) == 1  # all three in the 16-row bucket: one graph, replayed
    assert torch.equal(*first)  # an earlier result is not overwritten by later replays
