"""The engine's ar_fallback (dspark/fallback.py): where speculation measured slower than plain
decoding over a load's first call, later calls at that load decode plainly, and the output is
what speculation or plain decoding would give; the probe itself changes nothing (same tokens,
sampled too, when speculation is kept). CPU; the CUDA variant at the end runs the probe's graphs."""
import json
import os
import statistics
import time

import pytest

import dspark
from dspark import fallback
from dspark.cli import main
from dspark.demo import DEMO_MODELS, DEMO_PROMPTS, load_demo_pair
from dspark.engine import SpeculativeEngine
from dspark.fallback import FallbackGate, choose_plain
from dspark.models import ModelRunner

NEW = 40


@pytest.fixture(scope="module")
def demo():
    target, tok, drafter = load_demo_pair("cpu")
    return target, drafter, [tok.encode(p).ids for p in DEMO_PROMPTS]


def slowed(drafter, seconds: float):
    """The drafter with a sleep in every propose: drafting costs more than a decode step."""
    propose = drafter.propose

    def slow(st):
        time.sleep(seconds)
        return propose(st)
    drafter.propose = slow
    return drafter


def probe(st, spec_step, decode, steps: int = FallbackGate.WARM + FallbackGate.PROBE + 1):
    """A gate's probe over a stand-in engine (speculative steps ``spec_step``, the target's
    decode ``decode``): ``steps`` steps of one call, then the call's end; the gate and its one
    choice."""
    import types
    engine = types.SimpleNamespace(_step=spec_step, _decode_step=lambda state, timer: None,
                                   target=types.SimpleNamespace(decode=decode),
                                   _graph_key=lambda state: 0,
                                   graphs=lambda key, fn, graphed: fn())
    gate = FallbackGate()
    step = gate.stepper(engine, st, None, key=(1, 8))
    for _ in range(steps):
        step()
    gate.finish()
    (choice,) = gate.choices.values()
    return gate, choice


def test_choose_plain_and_bad_margin():
    assert choose_plain(100.0, 120.0, 0.05) and choose_plain(104.0, 100.0, 0.05)
    assert not choose_plain(110.0, 100.0, 0.05)
    assert choose_plain(100.0, 100.0, 0.0)  # a tie: plain decoding
    for bad in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="ar_fallback margin"):
            FallbackGate(bad)


def test_probe_takes_each_side_at_its_median_step():
    """One probed speculative step that still pays a one-time cost (a late capture or compile:
    0.5 s here) does not make the gate choose plain decoding: 3 tokens per 20-ms step (150
    tokens/s) beat plain decoding's 1 token per 20 ms, although the probe's five steps together
    read 15 tokens in 0.58 s (26 tokens/s)."""
    import types

    import torch
    st = types.SimpleNamespace(tokens=torch.zeros(1), n_tokens=torch.zeros(1, dtype=torch.long),
                               active=torch.ones(1, dtype=torch.bool), rounds=0,
                               anchor=lambda: None, anchor_pos=lambda: None)
    spec_steps = []

    def spec_step(state, timer):
        probed = len(spec_steps) - FallbackGate.WARM
        time.sleep(0.5 if probed == 0 else 0.02)
        spec_steps.append(1)
        state.n_tokens += 3
        state.rounds += 1

    gate, choice = probe(st, spec_step, decode=lambda *a: time.sleep(0.02))
    assert not choice.plain and gate.plain_from is None
    assert choice.speculative_tok_s > 2 * choice.plain_tok_s
    assert len(spec_steps) == FallbackGate.WARM + FallbackGate.PROBE + 1


@pytest.mark.parametrize("schedule", ["fixed", "sync"])
def test_slow_drafting_falls_back_to_plain_decoding(demo, schedule):
    target, _, prompts = demo
    _, _, drafter = load_demo_pair("cpu")  # a fresh drafter: this one is slowed
    engine = SpeculativeEngine(target, slowed(drafter, 0.1), schedule=schedule,
                               sps=[1.0] * 512, ar_fallback=True)
    want = SpeculativeEngine(target).generate_autoregressive(prompts, max_new_tokens=NEW,
                                                             stop_tokens=[]).tokens
    out = engine.generate(prompts, max_new_tokens=NEW, stop_tokens=[])
    assert out.tokens == want  # greedy: speculation and plain decoding agree
    (key, choice), = engine.fallback.choices.items()
    assert key[0] == len(prompts) and choice.plain
    assert choice.plain_tok_s > choice.speculative_tok_s > 0
    # the probing call speculates to its end (every round verified drafts)
    assert engine.fallback.plain_from is None and out.metrics.verified_hist[0] == 0
    # a second call at this load does not probe: plain decoding from its first round
    again = engine.generate(prompts, max_new_tokens=NEW, stop_tokens=[])
    assert again.tokens == want and engine.fallback.plain_from == 0
    m = again.metrics
    assert m.verified_hist[0] == m.request_rounds and sum(m.verified_hist[1:]) == 0
    rows = m.per_round["rows"]  # the target forward's rows: plain steps decode one a request
    assert len(rows) == m.rounds and rows == [len(prompts)] * m.rounds
    assert m.forward_rows == sum(rows)


def test_short_call_leaves_the_load_unknown():
    """A call that ends before the probe has timed its steps decides nothing: the next call at
    that load probes."""
    import types

    import torch
    st = types.SimpleNamespace(tokens=torch.zeros(1), n_tokens=torch.zeros(1, dtype=torch.long),
                               active=torch.ones(1, dtype=torch.bool), rounds=0,
                               anchor=lambda: None, anchor_pos=lambda: None)
    engine = types.SimpleNamespace(_step=lambda state, timer: None, _decode_step=None,
                                   target=types.SimpleNamespace(decode=lambda *a: None),
                                   _graph_key=lambda state: 0,
                                   graphs=lambda key, fn, graphed: fn())
    gate = FallbackGate()
    step = gate.stepper(engine, st, None, key=(1, 8))
    for _ in range(FallbackGate.WARM + FallbackGate.PROBE - 1):
        step()
    gate.finish()
    assert gate.choices == {} and gate.plain_from is None


def test_whole_call_rate_counts_the_late_rounds():
    """Acceptance that changes during a call: five early steps of 1 token, then 4 tokens a
    step. The first five steps alone read 1 token a step (below plain decoding's 2 a step);
    the call as a whole speculates at ~3.5 a step, and the gate keeps speculation."""
    import types

    import torch
    st = types.SimpleNamespace(tokens=torch.zeros(1), n_tokens=torch.zeros(1, dtype=torch.long),
                               active=torch.ones(2, dtype=torch.bool), rounds=0,
                               anchor=lambda: None, anchor_pos=lambda: None)

    def spec_step(state, timer):
        time.sleep(0.01)
        state.rounds += 1
        state.n_tokens += 1 if state.rounds <= FallbackGate.WARM + FallbackGate.PROBE else 4
    gate, choice = probe(st, spec_step, decode=lambda *a: time.sleep(0.01), steps=40)
    assert not choice.plain, choice
    assert 250 < choice.speculative_tok_s < 400 and 150 < choice.plain_tok_s < 210, choice


def test_greedy_and_sampled_calls_choose_apart(demo):
    """The choice is kept per (batch, block, sampling): acceptance, so the faster side, differs
    between greedy and sampled requests; a sampled call at a batch size already probed greedy
    probes again."""
    target, _, prompts = demo
    _, _, drafter = load_demo_pair("cpu")
    engine = SpeculativeEngine(target, slowed(drafter, 0.05), ar_fallback=True)
    engine.generate(prompts, max_new_tokens=NEW, stop_tokens=[])
    engine.generate(prompts, max_new_tokens=NEW, stop_tokens=[], temperature=1.0,
                    seed=list(range(len(prompts))))
    keys = sorted(engine.fallback.choices)
    W = drafter.max_nodes
    assert keys == [(len(prompts), W, False), (len(prompts), W, True)]
    assert all(c.plain for c in engine.fallback.choices.values())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_probe_that_keeps_speculating_changes_nothing(demo, temperature, monkeypatch):
    """A gate that keeps speculating: speculation continues after the probe's plain decodes of
    the anchors, and every token (sampled too, same seeds) is the engine's without a probe."""
    target, drafter, prompts = demo
    kw = dict(max_new_tokens=NEW, temperature=temperature, seed=[3, 4, 5][:len(prompts)],
              stop_tokens=[])
    want = SpeculativeEngine(target, drafter).generate(prompts, **kw)
    monkeypatch.setattr(fallback, "choose_plain", lambda *a: False)
    engine = SpeculativeEngine(target, drafter, ar_fallback=True)
    got = engine.generate(prompts, **kw)
    (_, choice), = engine.fallback.choices.items()
    assert not choice.plain and engine.fallback.plain_from is None
    assert got.tokens == want.tokens
    assert got.metrics.accept_hist == want.metrics.accept_hist


def test_ar_fallback_from_the_cli(capsys):
    rc = main(["generate", "--target", os.path.join(DEMO_MODELS, "target"), "--drafter",
               os.path.join(DEMO_MODELS, "dspark"), "--prompt", "def add(a, b):",
               "--max-new-tokens", "12", "--device", "cpu", "--ar-fallback", "--compare"])
    assert rc == 0
    assert "identical text: true" in capsys.readouterr().out.lower()


@pytest.mark.cuda
def test_cuda_probe_graphs_change_nothing(monkeypatch):
    """On the GPU the probe replays the target's decode graph between speculative step graphs:
    the tokens are the unprobed engine's (sampled), and a slowed drafter falls back."""
    if not dspark.cuda_available():
        pytest.skip("needs a CUDA build of dspark and a visible GPU")
    target, tok, drafter = load_demo_pair("cuda")
    prompts = [tok.encode(p).ids for p in DEMO_PROMPTS]
    kw = dict(max_new_tokens=NEW, temperature=1.0, seed=[7, 8, 9][:len(prompts)],
              stop_tokens=[])
    runner = ModelRunner(target)  # one runner (its graphs, its cache) for every engine
    want = SpeculativeEngine(runner, drafter).generate(prompts, **kw).tokens
    with monkeypatch.context() as m:  # a gate that keeps speculating
        m.setattr(fallback, "choose_plain", lambda *a: False)
        kept = SpeculativeEngine(runner, drafter, ar_fallback=True)
        assert kept.generate(prompts, **kw).tokens == want
    _, _, slow = load_demo_pair("cuda")
    engine = SpeculativeEngine(runner, slowed(slow, 0.05), ar_fallback=True)
    greedy = engine.generate(prompts, max_new_tokens=NEW, stop_tokens=[]).tokens
    assert next(iter(engine.fallback.choices.values())).plain
    assert greedy == SpeculativeEngine(runner).generate_autoregressive(
        prompts, max_new_tokens=NEW, stop_tokens=[]).tokens


@pytest.mark.cuda
def test_cuda_probe_times_steps_as_they_overlap():
    """The probe times a speculative step as the GPU lives it while the host prepares the next
    one: a step whose host part (6 ms) overlaps the previous step's GPU part (10 ms) takes
    ~10 ms, not the 16 ms that a host sync around each step reads (s12: the benchmark pair's
    DSpark step read at half its speed, and the gate chose plain decoding at 0.6x)."""
    import types

    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")

    def gpu_ms(cycles: int) -> float:  # one _sleep's time on the stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    gpu_ms(1_000_000)  # the first launch pays the clock ramp and lazy init (H100, s13: the
    # calibration read on a cold GPU gave 5-ms steps where 10 were meant, and the test tied)
    cycles = int(1_000_000 * 10.0 / gpu_ms(1_000_000))
    step_ms = statistics.median(gpu_ms(cycles) for _ in range(3))  # ~10 ms, measured
    st = types.SimpleNamespace(tokens=torch.zeros(1, device="cuda"),
                               n_tokens=torch.zeros(1, dtype=torch.long, device="cuda"),
                               active=torch.ones(1, dtype=torch.bool, device="cuda"), rounds=0,
                               anchor=lambda: None, anchor_pos=lambda: None)

    def spec_step(state, timer):
        time.sleep(0.6 * step_ms / 1e3)  # the host's part, while the GPU runs the previous step
        torch.cuda._sleep(cycles)
        state.n_tokens += 2
        state.rounds += 1

    _, choice = probe(st, spec_step, decode=lambda *a: torch.cuda._sleep(cycles))
    # overlapped, 2 tokens per GPU step (2 / step_ms); a sync per step would read 2 / (1.6 step_ms)
    spec, plain = choice.speculative_tok_s * step_ms / 1e3, choice.plain_tok_s * step_ms / 1e3
    assert 1.6 < spec < 2.4, (choice, step_ms)
    assert 0.8 < plain < 1.2 and not choice.plain, (choice, step_ms)


def test_bench_runs_a_fallback_schedule(tmp_path, capsys):
    """`dspark bench --schedule fixed+ar`: a run named drafter[fixed+ar] whose JSON says what
    the probe measured at that batch size."""
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in DEMO_PROMPTS[:2]))
    rc = main(["bench", "--target", os.path.join(DEMO_MODELS, "target"), "--drafter",
               os.path.join(DEMO_MODELS, "dspark"), "--dataset", str(data), "--prompts", "2",
               "--max-new-tokens", "16", "--device", "cpu", "--dtype", "float32",
               "--schedule", "fixed", "fixed+ar", "--out", str(tmp_path / "b"), "--no-progress",
               "--json"])
    assert rc == 0
    capsys.readouterr()
    runs = json.loads((tmp_path / "b" / "results.json").read_text())["runs"]
    (run,) = [r for r in runs if r["method"] == "dspark[fixed+ar]"]
    assert run["fallback"]["chose"] in ("autoregressive", "speculative")
    assert run["fallback"]["plain_tok_s"] > 0 and run["greedy_identical_fraction"] == 1.0
    assert main(["bench", "--target", os.path.join(DEMO_MODELS, "target"), "--ngram", "2",
                 "--dataset", str(data), "--device", "cpu", "--schedule", "bogus+ar"]) == 2
    assert "schedule must be" in capsys.readouterr().err
