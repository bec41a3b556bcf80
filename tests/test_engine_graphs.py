"""The engine's step stages replayed from CUDA graphs (GPU only): graph replay gives exactly the
tokens of eager execution (greedy and sampled, every drafter kind, repeated calls that reuse or
recapture the graphs), and replays never synchronise with the host."""
import pytest
import torch

import dspark
from dspark.demo import _random_qwen3
from dspark.drafters import (
    DrafterSpec,
    DraftModelDrafter,
    NgramDrafter,
    build_draft_model,
    make_drafter,
)
from dspark.engine import SpeculativeEngine
from dspark.models import ModelRunner

pytestmark = pytest.mark.cuda
V = 256
PROMPTS = [[1, 2, 3, 4, 1, 2, 3, 4], [10, 20, 30], [5, 6, 5, 6, 5, 6], [9] * 12]


@pytest.fixture(scope="module")
def target():
    if not dspark.cuda_available():
        pytest.skip("needs a CUDA build of dspark and a visible GPU")
    return _random_qwen3(V, seed=7, device="cuda")


def trained(target, method):
    spec = DrafterSpec.for_target(target.config, method, gamma=4, mask_token_id=V - 1,
                                  num_draft_layers=1, markov_rank=16)
    torch.manual_seed(3)
    return make_drafter(build_draft_model(spec, target).eval().requires_grad_(False))


DRAFTERS = {
    "draft-chain": lambda t: DraftModelDrafter(_random_qwen3(V, 7, 0.05, "cuda"), gamma=4),
    "draft-tree": lambda t: DraftModelDrafter(_random_qwen3(V, 7, 0.05, "cuda"), gamma=3,
                                              tree_topk=2),
    "ngram": lambda t: NgramDrafter(gamma=4),
    "dspark": lambda t: trained(t, "dspark"),
    "dflash": lambda t: trained(t, "dflash"),
    "eagle3": lambda t: trained(t, "eagle3"),
}


@pytest.mark.parametrize("stage_times", [False, True])
@pytest.mark.parametrize("kind", list(DRAFTERS))
@pytest.mark.parametrize("batch", [1, 4])
def test_graph_replay_equals_eager(target, kind, batch, stage_times):
    prompts = PROMPTS[:batch]
    kw = dict(max_new_tokens=40, temperature=1.0, seed=list(range(batch)))
    eager = SpeculativeEngine(ModelRunner(target, use_cuda_graphs=False),
                              DRAFTERS[kind](target))
    graphed = SpeculativeEngine(target, DRAFTERS[kind](target), stage_times=stage_times)
    assert graphed.graphs.enabled and not eager.graphs.enabled
    want = eager.generate(prompts, **kw)
    for _ in range(3):  # call 1 captures at its second step, calls 2-3 replay the same graphs
        got = graphed.generate(prompts, **kw)
        assert got.tokens == want.tokens
        assert got.metrics.accept_hist == want.metrics.accept_hist
    # one graph per step, or draft, target forward, accept, commit
    assert len(graphed.graphs) == (4 if stage_times else 1)
    m = got.metrics
    assert (m.draft_s > 0 and m.commit_s > 0) if stage_times else (m.step_s > 0 and m.draft_s == 0)
    greedy = graphed.generate(prompts, max_new_tokens=40)
    assert greedy.tokens == graphed.generate_autoregressive(prompts, max_new_tokens=40).tokens
    # new shapes: buffers are reallocated and the graphs recaptured
    longer = graphed.generate(prompts, max_new_tokens=100, temperature=1.0, seed=list(range(batch)))
    assert longer.tokens == eager.generate(prompts, max_new_tokens=100, temperature=1.0,
                                           seed=list(range(batch))).tokens


@pytest.mark.parametrize("kind", ["draft-tree", "dspark", "ngram"])
def test_replayed_steps_never_sync(target, kind):
    eng = SpeculativeEngine(target, DRAFTERS[kind](target))
    kw = dict(max_new_tokens=32, temperature=1.0, seed=[1, 2])
    eng.generate(PROMPTS[:2], **kw)  # captures
    step = eng._step

    def checked(st, timer):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(st, timer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    eng._step = checked
    eng.generate(PROMPTS[:2], **kw)  # same shapes: replays only, any host sync raises


def test_autoregressive_graph_equals_eager(target):
    kw = dict(max_new_tokens=50, temperature=0.8, top_k=20, seed=[4, 5, 6])
    eager = SpeculativeEngine(ModelRunner(target, use_cuda_graphs=False))
    graphed = SpeculativeEngine(target)
    want = eager.generate_autoregressive(PROMPTS[:3], **kw).tokens
    assert graphed.generate_autoregressive(PROMPTS[:3], **kw).tokens == want
    assert graphed.generate_autoregressive(PROMPTS[:3], **kw).tokens == want
    assert len(graphed.graphs) == 1
