"""Continuous batching (SpeculativeEngine.serve, dspark/serve.py): more prompts than slots, a
finished request's slot refilled with the next prompt mid-run. Each request's output is what
plain decoding gives it alone (greedy), for every drafter that can refill a slot and for plain
decoding itself; the refill touches only its own rows. CPU, the shipped demo pair."""
import json
import os

import pytest
import torch

import dspark
from dspark.cli import main
from dspark.demo import DEMO_MODELS, DEMO_PROMPTS, load_demo_pair
from dspark.drafters import DrafterSpec, DraftModelDrafter, NgramDrafter
from dspark.drafters.io import build_draft_model, make_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import ModelRunner


@pytest.fixture(scope="module")
def demo():
    target, tok, drafter = load_demo_pair("cpu")
    words = " ".join(DEMO_PROMPTS).split()
    # seven prompts of different lengths (more requests than slots, refilled mid-run)
    prompts = [tok.encode(" ".join(words[i:i + 3 + 2 * i])).ids for i in range(7)]
    return target, tok, drafter, prompts


@pytest.fixture(scope="module")
def alone(demo):
    """Each prompt decoded plainly on its own (greedy), 4 + 3 i tokens."""
    target, _, _, prompts = demo
    eng = SpeculativeEngine(target)
    return [eng.generate_autoregressive([p], max_new_tokens=4 + 3 * i, stop_tokens=[]).tokens[0]
            for i, p in enumerate(prompts)]


def new_tokens(n):
    return [4 + 3 * i for i in range(n)]


def untrained(target, method):
    """An untrained drafter of ``method`` for the demo target (its drafts mostly rejected)."""
    spec = DrafterSpec.for_target(target.config, method, gamma=3,
                                  mask_token_id=target.config.vocab_size - 1, num_draft_layers=1)
    torch.manual_seed(0)
    return make_drafter(build_draft_model(spec, target))


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3", "ngram", "draft-model", "plain"])
@pytest.mark.parametrize("slots", [1, 3])
def test_greedy_serve_equals_each_request_alone(demo, alone, kind, slots):
    target, tok, drafter, prompts = demo
    if kind == "ngram":
        drafter = NgramDrafter(3)
    elif kind == "draft-model":  # the target itself as its own draft model: every draft accepted
        drafter = DraftModelDrafter(ModelRunner(target), gamma=3)
    elif kind in ("dflash", "eagle3"):
        drafter = untrained(target, kind)
    eng = SpeculativeEngine(target, None if kind == "plain" else drafter, tokenizer=tok)
    out = eng.serve(prompts, slots, speculative=kind != "plain",
                    max_new_tokens=new_tokens(len(prompts)), stop_tokens=[])
    assert out.tokens == alone
    m = out.metrics
    assert m.new_tokens == sum(new_tokens(len(prompts))) and m.tokens_per_s > 0
    assert m.tau >= 1.0 and (kind in ("dspark", "draft-model")) <= (m.tau > 1.0)
    assert kind != "plain" or m.tau == 1.0
    assert out.text == [tok.decode(t, skip_special_tokens=True) for t in alone]


def drafter_rows(d, row: int, T: int) -> list:
    """What a drafter keeps for request ``row`` about its first T context positions."""
    if isinstance(d, DraftModelDrafter):
        c = d.runner.cache
        return [c.k[:, row, :, :T], c.v[:, row, :, :T], d.draft_len[row:row + 1]]
    if d.k.dim() == 5:  # DSpark / DFlash: [layers, B, heads, slots, dim]
        return [d.k[:, row, :, :T], d.v[:, row, :, :T]]
    return [d.k[row, :, :T], d.v[row, :, :T], d.h_last[row]]  # EAGLE-3


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3", "draft-model"])
def test_refilled_row_starts_like_a_fresh_batch(demo, kind):
    """Drafter.start_rows: a row refilled with a prompt holds what a fresh batch start gives
    that prompt's row; the other rows keep theirs bit for bit."""
    target, _, trained, prompts = demo
    d = trained if kind == "dspark" else untrained(target, kind) if kind != "draft-model" \
        else DraftModelDrafter(ModelRunner(target), gamma=3)
    kw = dict(max_new_tokens=8, stop_tokens=[])
    with torch.inference_mode():  # as the engine runs (the buffers may be inference tensors)
        check_refill(target, d, prompts, kw)


def check_refill(target, d, prompts, kw):
    def started(batch):
        eng = SpeculativeEngine(target, d)
        st, _, hidden = eng._start(batch, d.target_taps, kw, True, (len(prompts[6]), 8, 0))
        d.setup(st.batch, st.capacity)
        d.start(st, hidden)
        return eng, st
    T = len(prompts[5])
    started([prompts[0], prompts[5], prompts[2]])
    want = [t.clone() for t in drafter_rows(d, 1, T)]
    eng, st = started([prompts[0], prompts[1], prompts[2]])
    keep = [t.clone() for r in (0, 2) for t in drafter_rows(d, r, len(prompts[r]))]
    st.reset_rows([1], [prompts[5]], [8], [[]], dspark.ops.sampling_tensors(1, 0.0), [0])
    fwd = eng.target.prefill_rows([1], [prompts[5]], d.target_taps)
    first, _ = dspark.ops.sample(fwd.logits, dspark.ops.sampling_tensors(1, 0.0),
                                 torch.zeros(1, dtype=torch.long), st.n_tokens[1:2] - 1)
    st.commit_first_rows([1], first)
    d.start_rows(st, [1], fwd.hidden)
    for got, ref in zip(drafter_rows(d, 1, T), want):
        assert torch.allclose(got.float(), ref.float(), atol=1e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(
        [t for r in (0, 2) for t in drafter_rows(d, r, len(prompts[r]))], keep))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_scheduled_serve_equals_each_request_alone(demo, alone, mode):
    """Confidence-scheduled verification with slots refilled: the same greedy outputs."""
    target, _, drafter, prompts = demo
    sps = [1.0 / (0.01 + 0.002 * b) for b in range(1, 257)]
    eng = SpeculativeEngine(target, drafter, schedule=mode, sps=sps)
    out = eng.serve(prompts, 3, max_new_tokens=new_tokens(len(prompts)), stop_tokens=[])
    assert out.tokens == alone


def test_refill_touches_only_its_rows(demo):
    """prefill_rows writes the given cache rows and leaves the others bit for bit; the state's
    other rows keep their tokens."""
    target, _, _, prompts = demo
    r = ModelRunner(target)
    r.allocate(3, 64)
    r.prefill(prompts[:3])
    k, v = r.cache.k.clone(), r.cache.v.clone()
    fwd = r.prefill_rows([1], [prompts[5]])
    assert torch.equal(r.cache.k[:, [0, 2]], k[:, [0, 2]])
    assert torch.equal(r.cache.v[:, [0, 2]], v[:, [0, 2]])
    alone = ModelRunner(target)
    alone.allocate(1, 64)
    want = alone.prefill([prompts[5]])
    T = len(prompts[5])
    assert torch.allclose(fwd.logits, want.logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(r.cache.k[:, 1, :, :T], alone.cache.k[:, 0, :, :T], atol=1e-5)
    with pytest.raises(ValueError, match="distinct cache rows"):
        r.prefill_rows([1, 1], [prompts[0], prompts[1]])
    with pytest.raises(ValueError, match="distinct cache rows"):
        r.prefill_rows([3], [prompts[0]])


def test_sampled_serve_is_reproducible_and_stops(demo):
    """T = 1 with per-request seeds: the same tokens run after run; stop tokens end a request
    and free its slot (every request returns, the stop token last)."""
    target, _, drafter, prompts = demo
    eng = SpeculativeEngine(target, drafter)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=list(range(len(prompts))))
    a = eng.serve(prompts, 2, **kw).tokens
    b = eng.serve(prompts, 2, **kw).tokens
    assert a == b and all(0 < len(t) <= 12 for t in a)
    stop = a[0][1]  # a token the first request draws: it ends there, or earlier
    c = eng.serve(prompts, 2, **{**kw, "stop_tokens": [stop]}).tokens
    assert all(len(t) <= 12 and (stop not in t or t.index(stop) == len(t) - 1) for t in c)
    assert len(c[0]) <= 2


def test_serve_with_ar_fallback(demo, alone):
    """ar_fallback: the first serve() at a load probes (tokens counted step by step, so slots
    refilled between steps do not confuse it) and speculates to its end; a slowed drafter makes
    the next call at that load decode plainly; the tokens are each request's alone."""
    import time
    target, _, _, prompts = demo
    _, _, slow = load_demo_pair("cpu")
    propose = slow.propose
    slow.propose = lambda st: (time.sleep(0.05), propose(st))[1]
    eng = SpeculativeEngine(target, slow, ar_fallback=True)
    kw = dict(max_new_tokens=new_tokens(len(prompts)), stop_tokens=[])
    first = eng.serve(prompts, 3, **kw)
    (key, choice), = eng.fallback.choices.items()
    assert key[0] == 3 and choice.plain and choice.plain_tok_s > choice.speculative_tok_s > 0
    assert first.tokens == alone and first.metrics.tau > 1.0  # the probing call speculated
    second = eng.serve(prompts, 3, **kw)
    assert second.tokens == alone and second.metrics.gamma == 0  # plain decoding


def test_requests_that_end_at_their_first_token(demo, alone):
    """max_new_tokens 1: every request, refilled ones too, ends with the token its prefill
    sampled (commit_tokens decides it, the slot frees at the next step)."""
    target, _, drafter, prompts = demo
    out = SpeculativeEngine(target, drafter).serve(prompts, 2, max_new_tokens=1, stop_tokens=[])
    assert out.tokens == [t[:1] for t in alone]
    assert out.metrics.request_rounds == 0 and out.metrics.tau == 1.0


def test_serve_bad_inputs(demo):
    target, _, drafter, prompts = demo
    eng = SpeculativeEngine(target, drafter)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="slots must be an integer"):
            eng.serve(prompts, bad)
    with pytest.raises(TypeError, match=r"unknown generate\(\) arguments \[.max_tokens.\]"):
        eng.serve(prompts, 2, max_tokens=3)
    with pytest.raises(ValueError, match="no prompts"):
        eng.serve([], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.serve(prompts, 2, max_new_tokens=[3] * 6 + [0])
    with pytest.raises(ValueError, match="no drafter"):
        SpeculativeEngine(target).serve(prompts, 2)


def test_drafter_without_row_start_cannot_refill(demo):
    """A drafter without a per-row start gets a named error before any work."""
    target, _, drafter, prompts = demo

    class Frozen(NgramDrafter):
        start_rows = dspark.drafters.Drafter.start_rows
    with pytest.raises(ValueError, match="cannot refill single requests"):
        SpeculativeEngine(target, Frozen(3)).serve(prompts, 2)
    assert not Frozen(3).refillable and NgramDrafter(3).refillable and drafter.refillable


@pytest.mark.cuda
def test_cuda_serve_graphs():
    """On the GPU (step graphs; each refill's prefill graphed per rows and bucket), bf16 with
    the batch-invariant kernels: speculative serving gives plain serving's greedy tokens. One
    slot, so that both sides prefill every prompt alone (a cuBLAS prefill's bits may depend on
    how many prompts share it)."""
    if not dspark.cuda_available():
        pytest.skip("needs a GPU")
    target, tok, drafter = load_demo_pair("cuda")
    prompts = [tok.encode(p).ids for p in DEMO_PROMPTS] * 3
    eng = SpeculativeEngine(ModelRunner(target, batch_invariant=True), drafter)
    kw = dict(max_new_tokens=[24] * len(prompts), stop_tokens=[])
    plain = eng.serve(prompts, 1, speculative=False, **kw)
    spec = eng.serve(prompts, 1, **kw)
    assert spec.tokens == plain.tokens and spec.metrics.tau > 1.0
    assert plain.metrics.new_tokens == 24 * len(prompts)


def test_generate_cli_continuous(capsys):
    """`dspark generate --continuous --batch 2`: every prompt once, two in flight; the text is
    plain decoding's."""
    args = ["generate", "--target", os.path.join(DEMO_MODELS, "target"), "--drafter",
            os.path.join(DEMO_MODELS, "dspark"), "--device", "cpu", "--dtype", "float32",
            "--max-new-tokens", "8", "--batch", "2", "--continuous", "--compare", "--json",
            "--no-progress"] + [a for p in DEMO_PROMPTS[:3] for a in ("--prompt", p)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identical_text"] and len(report["speculative"]["text"]) == 3
    assert report["speculative"]["metrics"][0]["new_tokens"] == 24
