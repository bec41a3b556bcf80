"""examples/: other engines calling dspark's ops, run as tests. hf_transformers_loop.py drives a
Hugging Face model: greedy output equals model.generate, sampled first tokens fit the model.
paged_kv_loop.py keeps a paged KV cache: greedy output equals plain decoding, and kv_commit's
freed pages leave each request exactly the pages it needs."""
import importlib.util
import os

import pytest
import torch

import dspark
from dspark.demo import DEMO_MODELS, DEMO_PROMPTS
from dspark.models import load_tokenizer

from helpers import chi2_pvalue

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
TARGET = os.path.join(DEMO_MODELS, "target")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
    return load_example("hf_transformers_loop"), model, load_tokenizer(TARGET)


@pytest.mark.parametrize("gamma", [1, 4, 7])
def test_hf_loop_greedy_equals_generate(hf, gamma, one_thread):
    example, model, tok = hf
    for prompt in DEMO_PROMPTS:
        ids = tok.encode(prompt).ids
        want = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40)
        got = example.generate(model, ids, 40, gamma=gamma)
        assert got == want[0, len(ids):].tolist(), prompt


def test_hf_loop_sampled_first_token_fits_the_model(hf, one_thread):
    """T = 1: the first generated token's distribution is the model's (chi-square), through both
    verify outcomes: the prompt-lookup draft for this prompt has p ~ 0.17, so it is accepted in
    some calls and rejected (a residual draw) in the others."""
    example, model, tok = hf
    ids = tok.encode(DEMO_PROMPTS[0]).ids
    with torch.inference_mode():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    draft = int(dspark.ops.ngram_propose(torch.tensor([ids]), torch.tensor([len(ids)]), 4)[0, 1])
    n = 1200
    counts = torch.zeros_like(probs)
    for seed in range(n):
        counts[example.generate(model, ids, 1, gamma=4, temperature=1.0, seed=seed)[0]] += 1
    assert chi2_pvalue(counts, probs) > 1e-3
    assert (probs > 0.02).sum() >= 3  # the test has something to fit: a spread distribution
    # the drafts are deterministic (draft_probs=None): a rejected draft has no residual mass, so
    # the first token is the draft exactly when verify accepted it
    assert 0 < counts[draft] < n


# ---- paged_kv_loop.py: a paged KV cache, tree drafts, verify + kv_commit -----------------------
PAGED_PROMPTS = [[1, 2, 3, 1, 2], [5, 6, 7, 8, 5, 6], [9, 9, 4], [7, 3]]


@pytest.mark.parametrize("gamma,page_size", [(1, 1), (3, 4), (4, 3)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_paged_loop(temperature, gamma, page_size):
    """Greedy output is the toy model's plain greedy decoding; in every run each request ends
    holding exactly the pages its cached tokens need (kv_commit named every page only rejected
    nodes used), no page twice, the rest back in the pool."""
    example = load_example("paged_kv_loop")
    model = example.ToyLM()
    out, cache, moved = example.generate(model, PAGED_PROMPTS, 30, gamma, page_size,
                                         temperature, seed=5)
    if temperature == 0.0:
        assert out == [model.greedy(p, 30) for p in PAGED_PROMPTS]
        assert moved > 0  # some accepted paths ran through the second chain: rows were moved
    assert all(len(o) == 30 for o in out)
    held = [cache.table[b][cache.table[b] >= 0].tolist() for b in range(len(PAGED_PROMPTS))]
    for b, pages in enumerate(held):
        assert len(pages) == -(-cache.length[b] // page_size), (b, pages, cache.length[b])
    everything = sum(held, []) + cache.free
    assert sorted(everything) == list(range(cache.k.shape[1]))
