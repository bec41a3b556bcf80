"""`dspark demo` (the README's first command) and the shipped demo pair."""
import re

import torch

from dspark.cli import main
from dspark.demo import DEMO_PROMPTS, load_demo_pair
from dspark.engine import SpeculativeEngine


def test_demo_runs_offline_and_every_drafter_is_lossless(capsys):
    assert main(["demo", "--device", "cpu", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    verdicts = re.findall(r"identical to autoregressive: (\w+)", out)
    assert len(verdicts) == 4 and set(verdicts) == {"True"}, out


def test_shipped_pair_is_trained_and_matched():
    """The shipped DSpark drafter was trained for the shipped target: it is accepted far more
    often than chance, and greedy decoding with it equals autoregressive decoding."""
    target, tok, drafter = load_demo_pair("cpu")
    assert drafter.vocab_size == target.config.vocab_size
    eng = SpeculativeEngine(target, drafter, tokenizer=tok)
    spec = eng.generate(DEMO_PROMPTS, max_new_tokens=48, temperature=0.0)
    ar = eng.generate_autoregressive(DEMO_PROMPTS, max_new_tokens=48, temperature=0.0)
    assert spec.tokens == ar.tokens
    assert spec.metrics.tau > 1.5, spec.metrics.tau
    assert all(t.strip() for t in spec.text)
    assert target.dtype == torch.float32
