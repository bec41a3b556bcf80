"""Metrics count emitted tokens only (issue 15): rounds cut at max_new_tokens or a stop token
report what they kept; autoregressive runs are labelled as such in the CLI."""
import json

import pytest
import torch

from dspark.cli import main
from dspark.drafters.testing import perfect_drafter
from dspark.engine import SpeculativeEngine
from dspark.metrics import clip_rounds
from dspark.models import load_model

from helpers import make_checkpoint

V = 64
PROMPTS = [[1, 2, 3], [7], [9, 8, 7, 6]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("metrics_target"))
    make_checkpoint(path, "llama", vocab=V, hidden=32, layers=1, heads=2, kv_heads=1, inter=48,
                    init=0.3)
    return path


@pytest.fixture(scope="module")
def target(ckpt):
    return load_model(ckpt, dtype=torch.float32)


def test_clip_rounds():
    accept = torch.tensor([[4, 2], [4, 0], [4, 3]])
    active = torch.tensor([[True, True], [True, True], [True, False]])
    acc, act = clip_rounds(accept, active, [7, 4])
    # request 0 kept 7 tokens of rounds of 5, 5, 5: a full round, a round of 2, none
    assert acc[:, 0].tolist() == [4, 1, 0] and act[:, 0].tolist() == [True, True, False]
    # request 1 kept all 4 tokens of its rounds of 3 and 1: unchanged
    assert acc[:, 1].tolist() == [2, 0, 3] and act[:, 1].tolist() == [True, True, False]
    assert accept[1, 0] == 4  # inputs untouched


@pytest.mark.parametrize("gamma,rounds", [(1, 5), (4, 3), (8, 2)])
def test_perfect_drafter_full_acceptance_when_rounds_fit(target, gamma, rounds):
    """max_new_tokens = the prefill token + whole rounds: every round accepts everything."""
    eng = SpeculativeEngine(target, perfect_drafter(target, gamma))
    m = eng.generate(PROMPTS, max_new_tokens=1 + rounds * (gamma + 1), stop_tokens=[]).metrics
    assert m.acceptance_rate == 1.0 and m.tau == gamma + 1
    assert m.accept_hist[gamma] == m.request_rounds == len(PROMPTS) * rounds
    assert m.position_acceptance == [1.0] * gamma


@pytest.mark.parametrize("gamma,max_new", [(8, 4), (32, 8), (63, 2)])
def test_tau_counts_only_emitted_tokens(target, gamma, max_new):
    """`--gamma 8 --max-new-tokens 4` used to report tau 9: one round kept 3 tokens."""
    eng = SpeculativeEngine(target, perfect_drafter(target, gamma))
    out = eng.generate(PROMPTS, max_new_tokens=max_new, stop_tokens=[])
    m = out.metrics
    assert all(len(t) == max_new for t in out.tokens)
    assert m.request_rounds == len(PROMPTS) and m.tau == max_new - 1
    assert m.acceptance_rate == pytest.approx((max_new - 2) / gamma)


def test_stop_token_cuts_the_round(target):
    """A stop token inside an accepted block: the tokens after it are not counted."""
    eng = SpeculativeEngine(target, perfect_drafter(target, 8))
    free = eng.generate([PROMPTS[0]], max_new_tokens=10, stop_tokens=[]).tokens[0]
    stop = free[3]
    k = free.index(stop)  # the first occurrence ends the request
    out = eng.generate([PROMPTS[0]], max_new_tokens=10, stop_tokens=[stop])
    assert out.tokens[0] == free[:k + 1]
    assert out.metrics.tau == k and out.metrics.new_tokens == k + 1


def test_cli_labels_autoregressive_metrics(ckpt, capsys):
    rc = main(["generate", "--target", ckpt, "--ngram", "2", "--prompt", "w1 w2 w1",
               "--max-new-tokens", "6", "--device", "cpu", "--compare", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    spec, ar = out.split("=== autoregressive ===")
    assert "tau" in spec and "accept" in spec
    assert "autoregressive: " in ar and "decode steps" in ar
    assert "tau" not in ar and "accept" not in ar and "draft" not in ar
    rc = main(["generate", "--target", ckpt, "--ngram", "2", "--prompt", "w1", "--json",
               "--max-new-tokens", "4", "--device", "cpu", "--autoregressive", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["autoregressive"]
    assert report["autoregressive"]["metrics"][0]["gamma"] == 0
