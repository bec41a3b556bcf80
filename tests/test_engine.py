"""The speculative engine end to end on tiny random models (CPU, fp32): greedy equality with
autoregressive decoding, sampled-distribution equality (chi-square), KV rollback, bad input."""
import contextlib
import io
import json

import pytest
import torch

from dspark.drafters import DraftModelDrafter, NgramDrafter
from dspark.drafters.testing import AlwaysWrongDrafter, perfect_drafter
from dspark.engine import SpeculativeEngine
from dspark.metrics import Metrics
from dspark.models import ModelRunner, load_model

from helpers import (
    NSAMP,
    PROMPT,
    SV,
    assert_first_three_tokens_fit,
    chi2_pvalue,
    histogram,
    joint_first_two,
    make_checkpoint,
    round_accepts,
    spec_state,
    two_sample_pvalue,
)

V = 128
PROMPTS = [[1, 5, 7, 9, 5, 7], [3, 4], [10, 11, 12, 13, 14, 10, 11, 12], [42],
           [7, 7, 7, 7, 7, 7, 7], [99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89], [64, 65, 64, 65],
           [120, 3, 17]]
NEW = 20


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tgt, dft = str(tmp_path_factory.mktemp("target")), str(tmp_path_factory.mktemp("draft"))
    make_checkpoint(tgt, "llama", vocab=V, layers=2, init=0.3, seed=1)
    make_checkpoint(dft, "llama", vocab=V, layers=2, init=0.3, seed=1, perturb=0.05)
    return tgt, dft


@pytest.fixture(scope="module")
def models(ckpts):
    return load_model(ckpts[0], dtype=torch.float32), load_model(ckpts[1], dtype=torch.float32)


@pytest.fixture(scope="module")
def ar_reference(models):
    engine = SpeculativeEngine(models[0])
    return {b: engine.generate_autoregressive(PROMPTS[:b], max_new_tokens=NEW,
                                              stop_tokens=[]).tokens for b in (1, 3, 8)}


DRAFTERS = {
    "draft-chain": lambda t, d, g: DraftModelDrafter(d, g),
    "draft-tree": lambda t, d, g: DraftModelDrafter(d, g, tree_topk=3),
    "ngram": lambda t, d, g: NgramDrafter(g),
    "perfect": lambda t, d, g: perfect_drafter(t, g),
    "perfect-tree": lambda t, d, g: perfect_drafter(t, g, tree_topk=2),
    "always-wrong": lambda t, d, g: AlwaysWrongDrafter(t, g),
}


@pytest.mark.parametrize("gamma", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_greedy_equals_autoregressive(models, ar_reference, kind, batch, gamma):
    target, draft = models
    engine = SpeculativeEngine(target, DRAFTERS[kind](target, draft, gamma))
    out = engine.generate(PROMPTS[:batch], max_new_tokens=NEW, stop_tokens=[])
    assert out.tokens == ar_reference[batch]
    m = out.metrics
    assert sum(m.accept_hist) == m.request_rounds > 0
    if kind.startswith("perfect"):  # every round full but the last, cut at max_new_tokens
        full, rest = divmod(NEW - 1, gamma + 1)  # the first token comes from the prefill
        want = [0] * (gamma + 1)
        want[gamma] = batch * full
        if rest:
            want[rest - 1] += batch
        assert m.accept_hist == want and m.tau == pytest.approx((NEW - 1) / (full + (rest > 0)))
    if kind == "always-wrong":
        assert m.acceptance_rate == 0.0 and m.tau == 1.0


def test_draft_model_accepts_some_and_rejects_some(models):
    target, draft = models
    for k in (1, 3):
        m = SpeculativeEngine(target, DraftModelDrafter(draft, 4, k)).generate(
            PROMPTS, max_new_tokens=NEW, stop_tokens=[]).metrics
        assert m.accept_hist[0] > 0 and sum(m.accept_hist[1:]) > 0, m.accept_hist


def test_stop_tokens_and_per_request_limits(models):
    target, draft = models
    free = SpeculativeEngine(target).generate_autoregressive(PROMPTS[:3], max_new_tokens=NEW,
                                                              stop_tokens=[])
    stop = free.tokens[1][6]
    kw = dict(max_new_tokens=[5, NEW, 13], stop_tokens=[stop, 126])
    ar = SpeculativeEngine(target).generate_autoregressive(PROMPTS[:3], **kw)
    assert ar.tokens[1] == free.tokens[1][:free.tokens[1].index(stop) + 1]
    assert len(ar.tokens[0]) <= 5 and len(ar.tokens[2]) <= 13
    for drafter in (DraftModelDrafter(draft, 4), DraftModelDrafter(draft, 4, 3), NgramDrafter(8)):
        assert SpeculativeEngine(target, drafter).generate(PROMPTS[:3], **kw).tokens == ar.tokens


def test_qwen3_target(tmp_path):
    make_checkpoint(str(tmp_path / "t"), "qwen3", vocab=V, layers=2, init=0.3, seed=3)
    make_checkpoint(str(tmp_path / "d"), "qwen3", vocab=V, layers=2, init=0.3, seed=3, perturb=0.05)
    target, draft = load_model(str(tmp_path / "t")), load_model(str(tmp_path / "d"))
    ar = SpeculativeEngine(target).generate_autoregressive(PROMPTS[:3], max_new_tokens=NEW,
                                                           stop_tokens=[])
    for k in (1, 2):
        spec = SpeculativeEngine(target, DraftModelDrafter(draft, 4, k)).generate(
            PROMPTS[:3], max_new_tokens=NEW, stop_tokens=[])
        assert spec.tokens == ar.tokens


# ---- sampling: the speculative sampler's output distribution is the target's ------------------


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    tgt, dft = str(tmp_path_factory.mktemp("st")), str(tmp_path_factory.mktemp("sd"))
    make_checkpoint(tgt, "llama", vocab=SV, hidden=32, layers=2, init=0.1, seed=5, inter=64)
    make_checkpoint(dft, "llama", vocab=SV, hidden=32, layers=2, init=0.1, seed=5, inter=64,
                    perturb=0.6)
    return load_model(tgt), load_model(dft)


SAMPLING = {
    "draft-chain": (lambda t, d: DraftModelDrafter(d, 3), (1.0, 0, 1.0)),
    "draft-chain-topk-topp": (lambda t, d: DraftModelDrafter(d, 3), (0.8, 6, 0.9)),
    "draft-tree": (lambda t, d: DraftModelDrafter(d, 3, tree_topk=3), (1.0, 0, 1.0)),
    "ngram": (lambda t, d: NgramDrafter(3), (1.0, 0, 1.0)),
    "always-wrong": (lambda t, d: AlwaysWrongDrafter(t, 2), (1.0, 0, 1.0)),
}


@pytest.mark.parametrize("kind", list(SAMPLING))
def test_sampled_distribution_matches_autoregressive(small_models, kind):
    pytest.importorskip("scipy")
    target, draft = small_models
    make, (temp, top_k, top_p) = SAMPLING[kind]
    kw = dict(max_new_tokens=2, temperature=temp, top_k=top_k, top_p=top_p, stop_tokens=[])
    engine = SpeculativeEngine(target, make(target, draft))
    spec = engine.generate([PROMPT] * NSAMP, seed=list(range(NSAMP)), **kw)
    ar = SpeculativeEngine(target).generate_autoregressive(
        [PROMPT] * NSAMP, seed=list(range(NSAMP, 2 * NSAMP)), **kw)
    hs, ha = histogram(spec.tokens), histogram(ar.tokens)
    exact = joint_first_two(target, (temp, top_k, top_p))
    assert two_sample_pvalue(hs, ha) > 1e-3
    assert chi2_pvalue(hs, exact) > 1e-3
    assert chi2_pvalue(ha, exact) > 1e-3
    # the test has power: the draft model's distribution is rejected
    assert chi2_pvalue(hs, joint_first_two(draft, (temp, top_k, top_p))) < 1e-6
    if kind != "always-wrong":  # the drafter was useful in some rounds, useless in others
        # (the round log: the metrics count the one token each request kept of its round)
        accepts = round_accepts(engine)
        assert 0 < accepts.float().mean() < engine.drafter.gamma


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_draft_temperature_scale_keeps_the_target_distribution(small_models, scale):
    """Drafts sampled at half (or twice) the request's temperature: the emitted tokens still
    follow the target's joint exactly (verify reads the distribution each draft came from)."""
    pytest.importorskip("scipy")
    target, draft = small_models
    kw = dict(max_new_tokens=2, temperature=1.0, stop_tokens=[])
    engine = SpeculativeEngine(target, DraftModelDrafter(draft, 3), draft_temperature_scale=scale)
    spec = engine.generate([PROMPT] * NSAMP, seed=list(range(NSAMP)), **kw)
    hs = histogram(spec.tokens)
    assert chi2_pvalue(hs, joint_first_two(target, (1.0, 0, 1.0))) > 1e-3
    assert chi2_pvalue(hs, joint_first_two(draft, (1.0, 0, 1.0))) < 1e-6


def test_draft_temperature_scale_sharpens_the_drafts(small_models):
    """The drafter samples at temperature x scale: its proposal's distributions are sharper at
    0.5 than at 1; greedy requests stay greedy; a bad scale is a named error."""
    target, draft = small_models
    peak = {}
    for scale in (1.0, 0.5):
        engine = SpeculativeEngine(target, DraftModelDrafter(draft, 3),
                                   draft_temperature_scale=scale)
        with torch.inference_mode():
            kw = dict(temperature=1.0, seed=[0, 1, 2, 3])
            st, _, hidden = engine._start([PROMPT] * 4, (), kw, True)
            engine.drafter.setup(st.batch, st.capacity)
            engine.drafter.start(st, hidden)
            assert torch.equal(st.draft_temperature, torch.full((4,), scale))
            prop = engine.drafter.propose(st)
        peak[scale] = prop.draft_probs.max(-1).values.mean().item()
    assert peak[0.5] > peak[1.0]
    greedy = SpeculativeEngine(target, DraftModelDrafter(draft, 3), draft_temperature_scale=0.5)
    out = greedy.generate([PROMPT], max_new_tokens=6, stop_tokens=[])
    assert out.tokens == SpeculativeEngine(target).generate_autoregressive(
        [PROMPT], max_new_tokens=6, stop_tokens=[]).tokens
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="draft_temperature_scale must be"):
            SpeculativeEngine(target, DraftModelDrafter(draft, 3), draft_temperature_scale=bad)


def test_sampled_three_tokens_match_target(small_models):
    """Deeper draft positions: the joint of the first three tokens fits the exact target joint."""
    pytest.importorskip("scipy")
    target, draft = small_models
    for drafter in (DraftModelDrafter(draft, 3), DraftModelDrafter(draft, 3, tree_topk=2)):
        assert_first_three_tokens_fit(target, drafter, seed0=7)


@pytest.mark.parametrize("kind", ["draft-chain", "ngram"])
def test_prefill_padded_to_its_graph_bucket_changes_no_token(models, ar_reference, kind):
    """A GPU runner pads a prefill to its CUDA-graph bucket (ModelRunner.prefill): the same
    tokens, speculative and autoregressive, as the unpadded prefill (the draft model's runner
    padded too)."""
    target, draft = models
    runner = ModelRunner(target)
    runner.pad_prefill = True
    drafter = DRAFTERS[kind](target, draft, 4)
    if kind == "draft-chain":
        drafter.runner.pad_prefill = True
    engine = SpeculativeEngine(runner, drafter)
    out = engine.generate(PROMPTS[:3], max_new_tokens=NEW, stop_tokens=[])
    assert out.tokens == ar_reference[3]
    assert engine.generate_autoregressive(PROMPTS[:3], max_new_tokens=NEW,
                                          stop_tokens=[]).tokens == ar_reference[3]


# ---- rollback: after accepts and rejects the caches equal a fresh prefill ----------------------
@pytest.mark.parametrize("topk", [1, 3])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_rollback_equals_fresh_prefill(models, topk, temperature):
    target, draft = models
    drafter = DraftModelDrafter(draft, 4, topk)
    engine = SpeculativeEngine(target, drafter)
    out = engine.generate(PROMPTS[:4], max_new_tokens=[NEW, 9, NEW, 14], temperature=temperature,
                          seed=[1, 2, 3, 4], stop_tokens=[])
    h = out.metrics.accept_hist
    assert h[0] > 0 and sum(h[1:]) > 0
    st = engine.state
    for runner, lens in ((engine.target, st.n_tokens - 1), (drafter.runner, drafter.draft_len)):
        fresh = ModelRunner(runner.model)
        fresh.allocate(1, runner.cache.max_len)
        for b in range(4):
            n = int(lens[b])
            fresh.prefill([st.tokens[b, :n].tolist()])
            for mine, ref in ((runner.cache.k, fresh.cache.k), (runner.cache.v, fresh.cache.v)):
                torch.testing.assert_close(mine[:, b, :, :n], ref[:, 0, :, :n], atol=1e-5,
                                           rtol=1e-5)
    assert (drafter.draft_len >= st.prompt_lens).all()


# ---- drafters in isolation ---------------------------------------------------------------------
def test_ngram_drafter_proposals():
    st = spec_state([[5, 6, 7, 8, 5, 6], [1, 2, 3], [4, 9, 4, 9, 4]])
    prop = NgramDrafter(gamma=5, max_ngram=2).propose(st)
    toks = prop.draft_tokens.view(3, 6)
    assert toks[0].tolist() == [6, 7, 8, 5, 6, 7]  # "5 6" seen at 0 -> 7 8 5 6, then periodic
    assert toks[1].tolist() == [3, 3, 3, 3, 3, 3]  # no match: repeat the anchor
    assert toks[2].tolist() == [4, 9, 4, 9, 4, 9]  # "9 4" seen at 1 -> 9 4 (periodic)
    assert prop.draft_probs is None and prop.node_offsets.tolist() == [0, 6, 12, 18]
    assert prop.parents.view(3, 6)[0].tolist() == [-1, 0, 1, 2, 3, 4]


def test_tree_drafter_layout(models):
    d = DraftModelDrafter(models[1], gamma=3, tree_topk=2)
    d.setup(2, 32)
    st = spec_state([[1, 2, 3], [4, 5]])
    st.prompt_lens -= 1  # the last token is the anchor
    st.prompts = [p[:-1] for p in st.prompts]
    d.start(st, None)
    prop = d.propose(st)
    assert d.max_nodes == 7 and not d.is_chain
    assert prop.parents.view(2, 7)[0].tolist() == [-1, 0, 0, 1, 1, 3, 3]
    assert prop.draft_tokens.view(2, 7)[:, 0].tolist() == [3, 5]
    assert prop.draft_probs is None


def test_metrics_from_rounds():
    accept = torch.tensor([[2, 0], [1, 4], [0, 3]])
    active = torch.tensor([[True, True], [True, True], [False, True]])
    times = {"draft": 1.0, "target forward": 1.5, "accept": 0.25, "commit": 0.25}
    m = Metrics.from_rounds(4, accept, active, new_tokens=12, times=times, total_s=4.0)
    assert m.accept_hist == [1, 1, 1, 1, 1] and m.request_rounds == 5 and m.rounds == 3
    assert m.tau == pytest.approx(3.0) and m.acceptance_rate == pytest.approx(0.5)
    assert m.position_acceptance == pytest.approx([4 / 5, 3 / 4, 2 / 3, 1 / 2])
    assert m.other_s == pytest.approx(1.0) and m.tokens_per_s == pytest.approx(3.0)
    assert m.target_forward_s == 1.5 and m.accept_s == m.commit_s == 0.25 and m.speculative
    assert "tau 3.00" in m.summary() and "target forward 1.500s" in m.summary()
    assert m.tail == pytest.approx(3 / 2.5)  # 3 rounds; the requests were active 2 and 3
    ar = Metrics.from_rounds(0, torch.zeros(3, 2, dtype=torch.long), active, 6,
                             {"target forward": 2.0}, total_s=2.5)
    assert not ar.speculative and "autoregressive: 3 decode steps" in ar.summary()
    assert "tau" not in ar.summary() and "per-position" not in ar.summary()


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input(models, tmp_path):
    target, draft = models
    engine = SpeculativeEngine(target, NgramDrafter(4), max_len=64)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[1, 2], []])
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([])
    with pytest.raises(ValueError, match="exceeds the cache"):
        engine.generate([list(range(1, 70))], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the cache"):
        engine.generate([[1, 2]], max_new_tokens=60)
    with pytest.raises(ValueError, match="unknown token ids"):
        engine.generate([[1, V]])
    with pytest.raises(ValueError, match="unknown token ids"):
        engine.generate_autoregressive([[-1, 3]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate_autoregressive([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate("hello")
    with pytest.raises(ValueError, match="entries for 2 prompts"):
        engine.generate([[1], [2]], seed=[1, 2, 3])
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1]], temperature=-1.0)
    with pytest.raises(TypeError, match="unknown generate"):
        engine.generate([[1]], max_tokens=3)
    with pytest.raises(ValueError, match="no drafter"):
        SpeculativeEngine(target).generate([[1]])
    make_checkpoint(str(tmp_path), "llama", vocab=V - 32, hidden=32, layers=1)
    with pytest.raises(ValueError, match="vocab size"):
        SpeculativeEngine(target, DraftModelDrafter(load_model(str(tmp_path)), 4))
    with pytest.raises(ValueError, match="gamma"):
        DraftModelDrafter(draft, 0)


# ---- text and the CLI --------------------------------------------------------------------------
def test_text_generation_and_cli(ckpts):
    from dspark.cli import main
    target, draft = ckpts
    engine = SpeculativeEngine.from_pretrained(target, ngram=3, gamma=3)
    spec = engine.generate(["w5 w6 w7 w5 w6", "w9"], max_new_tokens=12)
    ar = engine.generate_autoregressive(["w5 w6 w7 w5 w6", "w9"], max_new_tokens=12)
    assert spec.text == ar.text and all(isinstance(t, str) and t for t in spec.text)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["generate", "--target", target, "--drafter", draft, "--prompt", "w5 w6 w7",
                   "--prompt", "w9", "--batch", "2", "--max-new-tokens", "8", "--gamma", "3",
                   "--tree-topk", "2", "--compare", "--json", "--device", "cpu"])
    assert rc == 0
    report = json.loads(buf.getvalue())
    assert report["identical_text"] and len(report["speculative"]["text"]) == 2
    assert report["speculative"]["metrics"][0]["tau"] >= 1.0
    buf = io.StringIO()  # --fused on CPU (and the old --draft spelling of --drafter)
    with contextlib.redirect_stdout(buf):
        rc = main(["generate", "--target", target, "--draft", draft, "--prompt", "w5 w6 w7",
                   "--prompt", "w9", "--batch", "2", "--max-new-tokens", "8", "--gamma", "3",
                   "--compare", "--json", "--device", "cpu", "--fused"])
    assert rc == 0 and json.loads(buf.getvalue())["identical_text"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["generate", "--target", target, "--ngram", "2", "--prompt", "w1",
                     "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens" in err.getvalue()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["generate", "--target", target, "--ngram", "2", "--prompt", "w1",
                     "--compile", "reduce-overhead"]) == 2
    assert "compile mode" in err.getvalue()


@pytest.mark.parametrize("kind", ["draft-chain", "dspark"])
def test_greedy_rounds_carry_no_draft_distributions(models, kind, monkeypatch):
    """Greedy requests accept a draft iff it is the target's argmax, so q is never read: an
    all-greedy state says so, the drafters make no q rows and the engine passes none to verify
    (same tokens as plain decoding); one sampled request brings q back."""
    from dspark import ops
    from dspark.demo import load_demo_pair

    if kind == "dspark":
        target, tok, drafter = load_demo_pair("cpu")
        prompts = [tok.encode(t).ids for t in ("def add(a, b):", "The cat")]
    else:
        target, drafter = models[0], DraftModelDrafter(models[1], 3)
        prompts = PROMPTS[:2]
    seen = []
    verify = ops.verify

    def spy(logits, offsets, tokens, parents, draft_probs, *a, **kw):
        seen.append(draft_probs is not None)
        return verify(logits, offsets, tokens, parents, draft_probs, *a, **kw)
    monkeypatch.setattr(ops, "verify", spy)
    engine = SpeculativeEngine(target, drafter)
    got = engine.generate(prompts, max_new_tokens=12, stop_tokens=[])
    assert engine.state.greedy and seen and not any(seen)
    assert got.tokens == engine.generate_autoregressive(prompts, max_new_tokens=12,
                                                        stop_tokens=[]).tokens
    seen.clear()
    engine.generate(prompts, max_new_tokens=12, stop_tokens=[], temperature=[0.0, 0.8], seed=[1, 2])
    assert not engine.state.greedy and seen and all(seen)


def test_greedy_flag_follows_reset_and_refills():
    from dspark.ops import sampling_tensors
    from dspark.state import SpecState

    st = SpecState.allocate(2, 16, 4, "cpu")
    st.reset([[1, 2], [3]], [4, 4], [[], []], sampling_tensors(2, 0.0), [0, 0])
    assert st.greedy
    st.reset_rows([1], [[5, 6]], [4], [[]], sampling_tensors(1, 1e-6), [3])
    assert st.greedy  # below the kernels' greedy threshold
    st.reset_rows([0], [[7]], [4], [[]], sampling_tensors(1, 0.7), [3])
    assert not st.greedy
    st.reset_rows([0], [[7]], [4], [[]], sampling_tensors(1, 0.0), [3])
    assert not st.greedy  # off until the next reset (the sampled row may still run)
    st.reset([[1, 2], [3]], [4, 4], [[], []], sampling_tensors(2, [0.0, 0.0]), [0, 0])
    assert st.greedy
