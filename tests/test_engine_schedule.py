"""Confidence-scheduled verification in the engine (dspark/schedule_step.py), on CPU: greedy
output equals autoregressive decoding in every mode (exact and bucketed row counts, unfused and
fused runners), the sampled output distribution is the target's (chi-square at T = 1), verify
lengths follow the load (synthetic SPS tables), the packed verify forward equals the padded one,
metrics, the CLI and bad input. GPU-only at the end: CUDA-graph buckets and host syncs."""
import contextlib
import io
import json
import os
import warnings

import pytest
import torch

import dspark
from dspark.cli import main
from dspark.demo import DEMO_MODELS, DEMO_PROMPTS, _random_qwen3, load_demo_pair
from dspark.drafters import (
    DrafterSpec,
    DraftModelDrafter,
    NgramDrafter,
    build_draft_model,
    make_drafter,
)
from dspark.engine import SpeculativeEngine
from dspark.metrics import Metrics
from dspark.models import ModelRunner, load_model
from dspark.schedule_step import VerifyScheduler, bucket_rows

from helpers import SV, assert_first_three_tokens_fit, make_checkpoint

MODES = ["sync", "async", "threshold:0.4", "fixed"]
NEW = 24


def affine_sps(per_token: float, n: int = 2048) -> list:
    """SPS(B) of a step costing 1 + per_token * B time units: each verify token costs more as
    the load grows, so the scheduler should verify less."""
    return [1.0 / (1.0 + per_token * b) for b in range(1, n + 1)]


@pytest.fixture(scope="module")
def demo():
    """The shipped trained pair: a DSpark drafter with an STS-calibrated confidence head."""
    target, tok, drafter = load_demo_pair("cpu")
    return target, drafter, [tok.encode(p).ids for p in DEMO_PROMPTS]


@pytest.fixture(scope="module")
def ar_reference(demo):
    target, _, prompts = demo
    return SpeculativeEngine(target).generate_autoregressive(
        prompts, max_new_tokens=[NEW, 9, 17], stop_tokens=[]).tokens


# ---- greedy: scheduled == autoregressive -------------------------------------------------------
@pytest.mark.parametrize("buckets", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_scheduled_equals_autoregressive(demo, ar_reference, mode, buckets):
    target, drafter, prompts = demo
    engine = SpeculativeEngine(target, drafter, schedule=mode, sps=affine_sps(0.08),
                               bucket_rows=buckets)
    out = engine.generate(prompts, max_new_tokens=[NEW, 9, 17], stop_tokens=[])
    assert out.tokens == ar_reference  # requests 1 and 2 finish early: they verify nothing then
    m, g = out.metrics, drafter.gamma
    assert sum(m.verified_hist) == m.request_rounds and m.schedule == mode
    assert m.wasted_tokens == sum(v * n for v, n in enumerate(m.verified_hist)) - sum(
        a * n for a, n in enumerate(m.accept_hist))
    if mode == "fixed":
        assert m.verified_hist[g] == m.request_rounds and m.theta_predicted is None
        return
    # the prefixes were cut (short and full ones); the forward ran on every anchor, the verified
    # drafts and one scratch row (async: up to its budget; buckets: up to R * W + 1 rows a round)
    # -- but a sync / threshold round that admitted every draft verifies the proposal as it is,
    # without the scratch row
    assert m.verified_hist[g] < m.request_rounds and sum(m.verified_hist[:g]) > 0
    rows = m.rounds * (len(prompts) + 1) + sum(v * n for v, n in enumerate(m.verified_hist))
    if mode != "async":
        rows -= int((engine.state.round_verified[:m.rounds] == g).all(1).sum())
    if buckets:
        assert rows <= m.forward_rows <= m.rounds * (len(prompts) * (g + 1) + 1)
    else:
        assert m.forward_rows >= rows if mode == "async" else m.forward_rows == rows
        assert m.forward_rows < m.rounds * len(prompts) * (g + 1)  # fewer than fixed gamma


@pytest.mark.parametrize("buckets", [False, True])
def test_all_admitted_round_verifies_the_proposal_as_is(demo, ar_reference, buckets):
    """sync with a flat table admits every draft: each round verifies the drafter's proposal as
    fixed gamma does (R * W rows, no scratch row, no bucket above it), with the same output."""
    target, drafter, prompts = demo
    engine = SpeculativeEngine(target, drafter, schedule="sync", sps=[1.0] * 64,
                               bucket_rows=buckets)
    out = engine.generate(prompts[:1], max_new_tokens=NEW, stop_tokens=[])
    assert out.tokens == ar_reference[:1]
    W = drafter.max_nodes
    assert engine.scheduler.rows_log and set(engine.scheduler.rows_log) == {W}
    assert out.metrics.forward_rows == out.metrics.rounds * W
    fixed = SpeculativeEngine(target, drafter).generate(prompts[:1], max_new_tokens=NEW,
                                                        stop_tokens=[])
    assert out.metrics.accept_hist == fixed.metrics.accept_hist


@pytest.mark.parametrize("ragged", ["pad", "gather"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_greedy_scheduled_fused_runner(demo, ar_reference, mode, ragged):
    """The packed layout through the dspark kernels (fused_linear + decode_attention), the
    ragged block padded through every layer or gathered around attention."""
    target, drafter, prompts = demo
    runner = ModelRunner(target, fused=True)
    runner.ragged_fused = ragged
    engine = SpeculativeEngine(runner, drafter, schedule=mode, sps=affine_sps(0.08),
                               bucket_rows=True)
    out = engine.generate(prompts, max_new_tokens=[NEW, 9, 17], stop_tokens=[])
    assert out.tokens == ar_reference
    assert 0 < sum(out.metrics.verified_hist[:drafter.gamma])


# ---- load-aware budgets --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_higher_concurrency_verifies_less(demo, mode):
    """The same request at batch 1, 4, 16 (identical confidences; only the load changes)."""
    target, drafter, prompts = demo
    engine = SpeculativeEngine(target, drafter, schedule=mode, sps=affine_sps(0.05))
    mean = []
    for batch in (1, 4, 16):
        out = engine.generate([prompts[0]] * batch, max_new_tokens=16, stop_tokens=[])
        mean.append(out.metrics.verified_per_request)
    assert mean[0] > mean[1] > mean[2], mean
    assert mean[0] > 3.0 and mean[2] < 2.0, mean  # long prefixes alone, short ones under load
    # a flat table (a verify costs the same at any size): every draft of every request
    flat = SpeculativeEngine(target, drafter, schedule=mode, sps=[1.0] * 64)
    m = flat.generate((prompts * 4)[:12], max_new_tokens=16, stop_tokens=[]).metrics
    assert m.verified_hist[drafter.gamma] == m.request_rounds > 0
    assert m.verified_per_request == drafter.gamma


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_step_overhead_verifies_more(demo, mode):
    """A step's fixed cost (draft, accept, commit) makes one more verify token relatively cheaper:
    with it the scheduler admits longer prefixes under the same load; greedy output unchanged."""
    target, drafter, prompts = demo
    batch = [prompts[0]] * 4
    mean, tokens = [], []
    for overhead in (0.0, 2.0, 100.0):  # in the affine table's time units (a step = 1 + 0.05 B)
        eng = SpeculativeEngine(target, drafter, schedule=mode, sps=affine_sps(0.05),
                                step_overhead=overhead)
        out = eng.generate(batch, max_new_tokens=16, stop_tokens=[])
        mean.append(out.metrics.verified_per_request)
        tokens.append(out.tokens)
    assert mean[0] < mean[1] < mean[2], mean
    assert mean[2] > 3.0, mean
    assert tokens[0] == tokens[1] == tokens[2]
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="step overhead must be"):
            SpeculativeEngine(target, drafter, schedule=mode, sps=affine_sps(0.05),
                              step_overhead=bad)


def test_threshold_follows_confidence(demo):
    """threshold:0 verifies every draft, threshold:1 none (plain decoding, one token a round)."""
    target, drafter, prompts = demo
    g = drafter.gamma
    m0 = SpeculativeEngine(target, drafter, schedule="threshold:0").generate(
        prompts, max_new_tokens=12, stop_tokens=[]).metrics
    m1 = SpeculativeEngine(target, drafter, schedule="threshold:1").generate(
        prompts, max_new_tokens=12, stop_tokens=[]).metrics
    assert m0.verified_hist[g] == m0.request_rounds
    assert m1.verified_hist[0] == m1.request_rounds and m1.tau == 1.0
    assert m1.rounds == 11  # 12 tokens: one from the prefill, then one per round


# ---- sampling: the output distribution is the target's -----------------------------------------
@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("schedsmall"))
    make_checkpoint(path, "qwen3", vocab=SV, hidden=32, layers=3, init=0.1, seed=5, inter=64,
                    head_dim=8)
    target = load_model(path)
    spec = DrafterSpec.for_target(target.config, "dspark", gamma=3, mask_token_id=SV - 1,
                                  num_draft_layers=1, markov_rank=8, head_type="rnn")
    torch.manual_seed(1)
    m = build_draft_model(spec, target)
    with torch.no_grad():
        m.head.w1.weight.normal_(0, 1.0)  # strong Markov bias: drafts depend on the previous one
        m.head.w2.weight.normal_(0, 1.0)
        m.fc.weight.mul_(10)
        for p in m.confidence.parameters():  # confidences that vary with x_{k-1} and the context
            p.normal_(0, 1.0)
    return target, m.eval().requires_grad_(False)


@pytest.mark.parametrize("mode", ["sync", "async", "threshold:0.5"])
def test_sampled_three_tokens_match_target(small_pair, mode):
    """T = 1: the joint of the first three tokens fits the target's exact joint with scheduling
    on (each scheduled round admits a different mix of prefix lengths). The first three tokens
    take at most two rounds: async admits the current top 1200 there (a budget fixed before
    the drafts, as one from two steps back is)."""
    pytest.importorskip("scipy")
    target, model = small_pair
    sched = VerifyScheduler(mode, affine_sps(1 / 1000, 4 * 1200), first_budget=1200)
    metrics = assert_first_three_tokens_fit(target, make_drafter(model), seed0=3, n=6000,
                                            batch=1200, schedule=sched)
    hist = torch.tensor([m.verified_hist for m in metrics]).sum(0)
    assert (hist > 0).all(), hist  # every prefix length 0..gamma was verified in some rounds


# ---- the packed verify forward ------------------------------------------------------------------
@pytest.mark.parametrize("fused, ragged", [(False, "auto"), (True, "pad"), (True, "gather")])
def test_packed_forward_equals_padded(tmp_path, fused, ragged):
    """A ragged proposal (anchor + l_r drafts) forwarded packed, with bucket padding rows, gives
    the logits and KV-cache rows of the same nodes inside the full [R, W] verify; the padding
    rows change nothing (same cache, same logits as without them). Fused: bit for bit, whether
    the runner computes the padded block and packs once ("pad") or gathers around attention in
    every layer ("gather")."""
    make_checkpoint(str(tmp_path), "qwen3", vocab=96, hidden=64, layers=2, init=0.2, seed=4)
    model = load_model(str(tmp_path), dtype=torch.float32)
    R, W, ctx = 4, 5, [7, 3, 11, 5]
    ells = [4, 0, 2, 3]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in ctx]
    drafts = torch.randint(0, 96, (R, W), generator=gen)
    start = torch.tensor(ctx) - 1

    def run(tokens, offsets, parents, padded=False):
        r = ModelRunner(model, fused=fused)
        r.ragged_fused = ragged
        r.allocate(R, 32)
        r.prefill([p[:-1] for p in prompts])
        fwd = r.forward_tree(tokens, parents, offsets, start, W, (0,), padded)
        return fwd, r.cache

    full_off, full_par = dspark.ops.chain_layout([W - 1] * R)
    full, full_cache = run(drafts.view(-1), full_off, full_par)
    off, par = dspark.ops.chain_layout(ells)
    rows = torch.cat([torch.arange(r * W, r * W + n + 1) for r, n in enumerate(ells)])
    packed, cache = run(drafts.view(-1)[rows], off, par)
    assert packed.logits.shape == (len(rows), 96) and packed.hidden.shape[1] == len(rows)
    same = torch.equal if fused else lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert same(packed.logits, full.logits[rows]) and same(packed.hidden, full.hidden[:, rows])
    assert torch.equal(packed.logits.argmax(-1), full.logits[rows].argmax(-1))
    for b, n in enumerate(ells):  # the verified nodes' K/V, in slots start .. start + l_r
        s = slice(int(start[b]), int(start[b]) + n + 1)
        assert same(cache.k[:, b, :, s], full_cache.k[:, b, :, s])
        assert same(cache.v[:, b, :, s], full_cache.v[:, b, :, s])
    # 7 padding rows (a bucket): the same outputs for the real rows, not one cache entry changed
    pad = torch.cat([drafts.view(-1)[rows], torch.randint(0, 96, (7,), generator=gen)])
    padded, pcache = run(pad, off, torch.cat([par, torch.zeros(7, dtype=torch.int64)]), True)
    assert same(padded.logits[:len(rows)], packed.logits) and torch.isfinite(padded.logits).all()
    assert same(pcache.k, cache.k) and same(pcache.v, cache.v)


@pytest.mark.parametrize("buckets", [False, True])
def test_pack_builds_the_forward_layout(demo, buckets, monkeypatch):
    """The packed verify's layout, built once while packing, is the one the runner would derive
    from the forward's node_offsets (rows past them: padding)."""
    from dspark.models.transformer import PackedLayout
    target, drafter, prompts = demo
    eng = SpeculativeEngine(target, drafter, schedule="sync", sps=affine_sps(0.05),
                            bucket_rows=buckets)
    real, seen = eng.target.forward_tree, []

    def spy(tokens, parents, offsets, start, max_nodes, taps=(), padded=False, layout=None):
        want = PackedLayout.from_offsets(offsets, tokens.shape[0], max_nodes)
        seen.append(layout is not None and torch.equal(layout.dest, want.dest)
                    and torch.equal(layout.src, want.src) and torch.equal(layout.fill, want.fill))
        return real(tokens, parents, offsets, start, max_nodes, taps, padded, layout)

    monkeypatch.setattr(eng.target, "forward_tree", spy)
    eng.generate(prompts, max_new_tokens=NEW, stop_tokens=[])
    assert seen and all(seen)


def test_packed_layout_pad_is_one_gather():
    """pad: each packed row at its block position, a real row's copy where none sits (never a
    bucket-padding row), pack inverts it."""
    from dspark.models.transformer import PackedLayout
    offsets = torch.tensor([0, 2, 2, 5])  # request 1 verifies nothing; rows 5, 6: padding
    layout = PackedLayout.from_offsets(offsets, 7, 4)
    assert layout.dest.tolist() == [0, 1, 8, 9, 10, 12, 12]
    assert layout.fill.tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 2, 3, 4, 0]
    x = torch.arange(7, dtype=torch.float32)[:, None].expand(7, 3) + 1
    padded = layout.pad(x)
    assert padded.shape == (3, 4, 3)
    assert padded[0, :2, 0].tolist() == [1, 2] and padded[2, :3, 0].tolist() == [3, 4, 5]
    assert set(padded[..., 0].flatten().tolist()) <= {1, 2, 3, 4, 5}  # never rows 6, 7
    assert torch.equal(layout.pack(padded)[:5], x[:5])


def test_bucket_rows():
    assert [bucket_rows(n, 10**6) for n in (1, 8, 9, 33, 64, 65, 81, 129, 1000)] == \
        [8, 8, 16, 64, 64, 80, 96, 160, 1024]
    assert bucket_rows(100, 90) == 100 and bucket_rows(70, 75) == 75  # the cap, never below n
    prev = 0
    for n in range(1, 3000):
        b = bucket_rows(n, 10**6)
        assert b >= max(n, prev) and (n <= 64 or (b - n) / b < 0.2)
        prev = b


@pytest.mark.parametrize("mode", ["sync", "threshold:0.5"])
@pytest.mark.parametrize("R, G", [(1, 7), (6, 4), (64, 7), (128, 7)])
def test_shapes_hold_every_bucket_rows_picks(mode, R, G):
    """The shapes a scheduled engine captures up front (VerifyScheduler.shapes) are exactly
    those rows() picks for some admitted count: none missing (a capture mid-generation), none
    unused."""
    import types
    s = VerifyScheduler(mode, [1.0] * 4096, True)
    s.step, s.rows_log = 0, []  # what start() sets for a call
    st, d = types.SimpleNamespace(batch=R), types.SimpleNamespace(max_nodes=G + 1, gamma=G)
    picked = {s.rows(st, d, torch.tensor(n)) for n in range(R * G + 1)}
    assert picked == set(s.shapes(R, G + 1, G)) and None in picked
    assert len(picked) <= 2 + 4 * (R * (G + 1)).bit_length()  # a few per octave


# ---- metrics ---------------------------------------------------------------------------------
def test_scheduled_metrics():
    accept = torch.tensor([[1, 0], [2, 0], [0, 0]])
    active = torch.tensor([[True, True], [True, True], [True, False]])
    verified = torch.tensor([[2, 1], [3, 0], [1, 0]])
    expected = torch.tensor([3.5, 3.0, 1.5], dtype=torch.float64)
    sps = [10.0, 9.0, 8.0, 7.0, 6.0]
    m = Metrics.from_rounds(3, accept, active, 9, {"schedule": 0.5, "target forward": 1.0}, 4.0,
                            verified=verified, expected=expected, sps=sps, rows=[6, 6, 4],
                            user_tokens=[6, 3], schedule="sync")
    assert m.verified_hist == [1, 2, 1, 1] and m.verified_per_request == pytest.approx(7 / 5)
    assert m.wasted_tokens == 7 - 3 and m.wasted_fraction == pytest.approx(4 / 7)
    assert m.forward_rows == 16 and m.schedule == "sync" and m.schedule_s == 0.5
    # rounds verify B = 5, 5, 3 rows: SPS 6, 6, 8; committed 3, 4, 1 tokens
    assert m.theta_predicted == pytest.approx((3.5 * 6 + 3.0 * 6 + 1.5 * 8) / 3)
    assert m.theta_achieved == pytest.approx((3 * 6 + 4 * 6 + 1 * 8) / 3)
    assert m.per_round == dict(verified=[1.5, 1.5, 1.0], wasted=[2, 1, 1],
                               theta_predicted=[21.0, 18.0, 12.0],
                               theta_achieved=[18.0, 24.0, 8.0], rows=[6, 6, 4])
    # 4 s of decoding over 3 rounds; request 0 active 3 rounds (6 tokens), request 1 two (3)
    assert m.user_tokens_per_s == pytest.approx((6 / 4.0 + 3 / (2 * 4 / 3)) / 2)
    s = m.summary()
    assert "schedule sync: verified 1.40" in s and "wasted 4 (57%)" in s and "theta" in s


# ---- the CLI -------------------------------------------------------------------------------------
def test_generate_and_bench_cli(tmp_path, capsys):
    target = os.path.join(DEMO_MODELS, "target")
    table = {"format": 1, "sps": affine_sps(0.05, 64), "grid": [64], "grid_seconds": [1.0],
             "key": {}, "config": {}}
    (tmp_path / "sps.json").write_text(json.dumps(table))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["generate", "--target", target, "--drafter", os.path.join(DEMO_MODELS, "dspark"),
                   "--prompt", DEMO_PROMPTS[0], "--prompt", DEMO_PROMPTS[1], "--batch", "2",
                   "--max-new-tokens", "10", "--schedule", "sync", "--sps",
                   str(tmp_path / "sps.json"), "--compare", "--json", "--device", "cpu"])
    assert rc == 0
    report = json.loads(buf.getvalue())
    m = report["speculative"]["metrics"][0]
    assert report["identical_text"] and m["schedule"] == "sync" and m["theta_predicted"] > 0
    assert m["user_tokens_per_s"] > 0 and 0 < m["verified_per_request"] < 4
    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps({"turns": [DEMO_PROMPTS[0]]}) + "\n")
    rc = main(["bench", "--target", target, "--drafter", os.path.join(DEMO_MODELS, "dspark"),
               "--ngram", "3", "--dataset", str(data), "--prompts", "1", "--max-new-tokens", "6",
               "--batch", "2", "--schedule", "fixed", "async", "--sps",
               str(tmp_path / "sps.json"), "--device", "cpu", "--dtype", "float32",
               "--out", str(tmp_path / "bench"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "dspark[async]" in out and "skipped ngram[async]" in out
    runs = json.loads((tmp_path / "bench" / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["autoregressive", "dspark", "dspark[async]", "ngram"]
    for r in runs:  # the one prompt is cycled to fill the batch of 2
        assert r["new_tokens"] == 12 and r["user_tokens_per_s"] > 0
        assert r.get("greedy_identical_fraction", 1.0) == 1.0
    assert (tmp_path / "bench" / "throughput_vs_user.png").read_bytes()[:4] == b"\x89PNG"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["generate", "--target", target, "--ngram", "2", "--prompt", "w",
                     "--schedule", "sync", "--device", "cpu"]) == 2
    assert "confidence head" in capsys.readouterr().err
    assert main(["generate", "--target", target, "--ngram", "2", "--prompt", "w",
                 "--schedule", "eager", "--device", "cpu"]) == 2
    assert "schedule must be" in capsys.readouterr().err


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input(demo, tmp_path):
    target, drafter, prompts = demo
    with pytest.raises(ValueError, match="schedule must be sync, async, fixed or threshold"):
        SpeculativeEngine(target, drafter, schedule="greedy")
    for bad in ("threshold:1.5", "threshold:-0.1", "threshold:x", "threshold"):
        with pytest.raises(ValueError, match=r"threshold schedule needs a value in \[0, 1\]"):
            SpeculativeEngine(target, drafter, schedule=bad)
    with pytest.raises(ValueError, match="NgramDrafter has no confidence head"):
        SpeculativeEngine(target, NgramDrafter(4), schedule="sync")
    SpeculativeEngine(target, NgramDrafter(4), schedule="fixed")  # fixed: any drafter
    draft_lm = DraftModelDrafter(target, 3)
    with pytest.raises(ValueError, match="DraftModelDrafter has no confidence head"):
        SpeculativeEngine(target, draft_lm, schedule="async")
    with pytest.raises(ValueError, match="needs chain proposals: DraftModelDrafter proposes "
                                         "token trees"):
        SpeculativeEngine(target, DraftModelDrafter(target, 3, tree_topk=2), schedule="sync")
    spec = DrafterSpec.for_target(target.config, "dflash", gamma=4, mask_token_id=2111,
                                  num_draft_layers=1)
    dflash = make_drafter(build_draft_model(spec, target).eval())
    with pytest.raises(ValueError, match="ParallelDrafter has no confidence head"):
        SpeculativeEngine(target, dflash, schedule="threshold:0.5")
    engine = SpeculativeEngine(target, drafter, schedule="sync", sps=[1.0] * 10)
    with pytest.raises(ValueError, match="covers B <= 10 verify tokens; batch 3 x 5 needs 15"):
        engine.generate(prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match="entries must be > 0"):
        SpeculativeEngine(target, drafter, schedule="async", sps=[1.0, 0.0] * 10).generate(
            prompts, max_new_tokens=4)
    with pytest.raises(FileNotFoundError):
        SpeculativeEngine(target, drafter, schedule="sync", sps=str(tmp_path / "no.json")).generate(
            prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match="async scheduling supports batch \\* gamma < 4096"):
        SpeculativeEngine(target, drafter, schedule="async", sps=[1.0] * 8192).generate(
            [[1]] * 1024, max_new_tokens=1)


# ---- GPU: CUDA-graph buckets -----------------------------------------------------------------
V = 256
CUDA_PROMPTS = [[1, 2, 3, 4, 1, 2, 3, 4], [10, 20, 30], [5, 6, 5, 6, 5, 6], [9] * 12, [7, 8],
                [100, 101, 102]]


@pytest.fixture(scope="module")
def cuda_pair():
    if not dspark.cuda_available():
        pytest.skip("needs a CUDA build of dspark and a visible GPU")
    target = _random_qwen3(V, seed=7, device="cuda")
    spec = DrafterSpec.for_target(target.config, "dspark", gamma=4, mask_token_id=V - 1,
                                  num_draft_layers=1, markov_rank=16)
    torch.manual_seed(3)
    m = build_draft_model(spec, target)
    with torch.no_grad():
        for p in m.confidence.parameters():
            p.normal_(0, 0.5)
    return target, m.eval().requires_grad_(False)


@pytest.mark.cuda
@pytest.mark.parametrize("stage_times", [False, True])
@pytest.mark.parametrize("mode", ["sync", "async", "threshold:0.5"])
def test_cuda_graph_buckets_equal_eager(cuda_pair, mode, stage_times):
    """Replayed per-bucket graphs give the tokens of eager execution (sampled and greedy);
    several buckets are used; a second call replays them. A step is two graphs (draft +
    lengths, then the verify of a bucket: every bucket captured up front, most never run
    eagerly), or one per stage with stage_times (each at its first use)."""
    target, model = cuda_pair
    sps = affine_sps(0.01, 4096)
    kw = dict(max_new_tokens=40, temperature=1.0, seed=list(range(len(CUDA_PROMPTS))))
    eager = SpeculativeEngine(ModelRunner(target, use_cuda_graphs=False), make_drafter(model),
                              schedule=mode, sps=sps, bucket_rows=True)
    graphed = SpeculativeEngine(target, make_drafter(model), schedule=mode, sps=sps,
                                stage_times=stage_times)
    assert graphed.graphs.enabled and graphed.scheduler.buckets
    want = eager.generate(CUDA_PROMPTS, **kw)
    for _ in range(2):
        got = graphed.generate(CUDA_PROMPTS, **kw)
        assert got.tokens == want.tokens
        assert got.metrics.verified_hist == want.metrics.verified_hist
    buckets = set(graphed.scheduler.rows_log)
    assert len(buckets) >= 2  # several row buckets in use, each captured once
    if stage_times:  # each bucket's stages at its first use
        assert len(graphed.graphs) == 2 + 4 * len(buckets)
    else:  # every bucket the batch size can use, captured with the draft graph
        d = graphed.drafter
        shapes = graphed.scheduler.shapes(len(CUDA_PROMPTS), d.max_nodes, d.gamma)
        assert len(shapes) >= len(buckets) and len(graphed.graphs) == 1 + len(shapes)
    greedy = graphed.generate(CUDA_PROMPTS, max_new_tokens=40)
    assert greedy.tokens == graphed.generate_autoregressive(CUDA_PROMPTS, max_new_tokens=40).tokens


@pytest.mark.cuda
def test_cuda_packed_forward_fused_bit_identical():
    """bf16 on the dspark kernels: a packed ragged verify gives the bits of the full one."""
    if not dspark.cuda_available():
        pytest.skip("needs a CUDA build of dspark and a visible GPU")
    model = _random_qwen3(V, seed=7, device="cuda").to(torch.bfloat16)
    R, W = 6, 5
    ells = [4, 0, 2, 3, 1, 4]
    tokens = torch.randint(0, V, (R * W,), device="cuda")
    start = torch.full((R,), 9, device="cuda")

    def run(tok, off, par, padded=False):
        r = ModelRunner(model, fused=True, use_cuda_graphs=False)
        r.allocate(R, 32)
        r.prefill([[3] * 9] * R)
        return r.forward_tree(tok, par, off, start, W, (), padded).logits

    full = run(tokens, *dspark.ops.chain_layout([W - 1] * R, "cuda"))
    off, par = dspark.ops.chain_layout(ells, "cuda")
    rows = torch.cat([torch.arange(r * W, r * W + n + 1) for r, n in enumerate(ells)]).cuda()
    pad = torch.zeros(3, dtype=torch.int64, device="cuda")
    packed = run(torch.cat([tokens[rows], pad]), off, torch.cat([par, pad]), True)
    assert torch.equal(packed[:len(rows)], full[rows])


@pytest.mark.cuda
def test_cuda_async_steps_never_sync_and_sync_mode_reads_once(cuda_pair):
    """async: replayed steps never wait for the GPU (the budget is read from a pinned copy two
    steps old); sync: exactly one host sync per step (the row count)."""
    target, model = cuda_pair
    kw = dict(max_new_tokens=32, temperature=1.0, seed=[1, 2, 3])
    for mode in ("async", "sync"):
        eng = SpeculativeEngine(target, make_drafter(model), schedule=mode,
                                sps=affine_sps(0.01, 4096))
        eng.generate(CUDA_PROMPTS[:3], **kw)  # captures
        eng.generate(CUDA_PROMPTS[:3], **kw)  # captures buckets seen once so far
        step, syncs = eng._step, []

        def checked(st, timer):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    step(st, timer)
                syncs.append(sum("synchronizing" in str(x.message) for x in w))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        eng._step = checked
        eng.generate(CUDA_PROMPTS[:3], **kw)
        assert syncs and set(syncs) == ({0} if mode == "async" else {1}), (mode, syncs)
