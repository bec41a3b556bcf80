"""`dspark demo` (the README's first command) and the shipped demo pair."""
import json
import os
import re

import pytest
import torch

from dspark.cli import main
from dspark.demo import DEMO_MODELS, DEMO_PROMPTS, load_demo_pair
from dspark.drafters import DrafterSpec, build_draft_model, default_mask_token, save_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import load_model, load_tokenizer


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


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3", "draft-lm", "ngram"])
def test_generate_cli_loads_every_drafter_kind(tmp_path, capsys, kind):
    """`dspark generate --drafter DIR` takes any drafter dir (trained DSpark / DFlash / EAGLE-3,
    an HF causal LM) and `--ngram N` stays; greedy output equals plain decoding for each."""
    target_dir = os.path.join(DEMO_MODELS, "target")
    if kind == "dspark":
        source = ["--drafter", os.path.join(DEMO_MODELS, "dspark")]
    elif kind == "draft-lm":  # the target checkpoint itself, run as a draft model
        source = ["--drafter", target_dir, "--gamma", "3"]
    elif kind == "ngram":
        source = ["--ngram", "3"]
    else:  # an untrained drafter of the method for the demo target, saved like train-draft does
        target = load_model(target_dir, "cpu", torch.float32)
        mask = default_mask_token(target.config.vocab_size, load_tokenizer(target_dir))
        spec = DrafterSpec.for_target(target.config, kind, gamma=3, mask_token_id=mask,
                                      num_draft_layers=1)
        torch.manual_seed(0)
        save_drafter(build_draft_model(spec, target), str(tmp_path / kind))
        source = ["--drafter", str(tmp_path / kind)]
    rc = main(["generate", "--target", target_dir, *source, "--prompt", DEMO_PROMPTS[0],
               "--prompt", DEMO_PROMPTS[1], "--batch", "2", "--max-new-tokens", "12",
               "--compare", "--json", "--device", "cpu", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["identical_text"], report
    m = report["speculative"]["metrics"][0]
    assert m["gamma"] == (4 if kind in ("dspark", "ngram") else 3) and m["tau"] >= 1.0
    assert m["new_tokens"] == 24 and m["target_forward_s"] > 0
