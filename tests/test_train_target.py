"""`dspark train-target`: a tiny Qwen3 + BPE tokenizer trained on local files is a checkpoint the
runner (and transformers) loads and generates from."""
import contextlib
import io
import json
import os
import textwrap
import warnings

import pytest
import torch

from dspark.cli_train import main
from dspark.drafters import default_mask_token
from dspark.engine import SpeculativeEngine
from dspark.models import ModelRunner, load_model, load_tokenizer
from dspark.train.target import collect_corpus, default_corpus_paths


def _corpus(root):
    os.makedirs(root / "pkg", exist_ok=True)
    for i, mod in enumerate((textwrap, json, contextlib)):
        with open(mod.__file__) as f:
            (root / "pkg" / f"m{i}.py").write_text(f.read())
    (root / "pkg" / "README.txt").write_text(
        "This package wraps text and reads JSON documents. " * 40)
    (root / "pkg" / "notes.rst").write_text("Notes\n=====\n\nContext managers close files. " * 30)
    (root / "pkg" / "data.bin").write_bytes(b"\x00\xff" * 100)  # ignored


def test_collect_corpus(tmp_path):
    _corpus(tmp_path)
    docs, stats = collect_corpus([str(tmp_path)], max_bytes=1 << 20)
    assert stats["code_files"] == 3 and stats["prose_files"] == 2 and len(docs) == 5
    docs, stats = collect_corpus([str(tmp_path)], max_bytes=20000, prose_frac=0.1)
    assert stats["code_bytes"] + stats["prose_bytes"] < 20000 + max(map(len, docs))
    assert default_corpus_paths()  # the stdlib is always there
    with pytest.raises(ValueError, match="does not exist"):
        collect_corpus([str(tmp_path / "nope")])


def test_train_target_checkpoint_loads_and_generates(tmp_path):
    _corpus(tmp_path / "corpus")
    out = str(tmp_path / "target")
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = main(["train-target", "--out", out, "--corpus", str(tmp_path / "corpus"),
                   "--vocab-size", "320", "--hidden", "32", "--layers", "2", "--heads", "2",
                   "--kv-heads", "1", "--head-dim", "16", "--intermediate", "64",
                   "--max-positions", "128", "--seq-len", "32", "--batch-size", "4",
                   "--steps", "30", "--lr", "3e-3", "--warmup-steps", "5", "--device", "cpu",
                   "--no-progress"])
    assert rc == 0, err.getvalue()
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    summary = json.load(open(os.path.join(out, "train_target.json")))
    assert summary["steps"] == 30 and summary["train_loss_last"] < 5.5  # ln(320) = 5.77
    tok = load_tokenizer(out)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    assert n_tok == 320 and cfg["vocab_size"] == 384 and cfg["vocab_size"] % 64 == 0
    assert default_mask_token(cfg["vocab_size"], tok) == n_tok == summary["mask_token_id"]
    model = load_model(out)
    assert model.config.num_layers == 2 and model.config.eos_token_ids == (0,)
    engine = SpeculativeEngine(model, tokenizer=tok)
    gen = engine.generate_autoregressive(["def wrap(text"], max_new_tokens=12, stop_tokens=[])
    assert len(gen.tokens[0]) == 12 and isinstance(gen.text[0], str)
    assert tok.decode(tok.encode("import json\n    x = 1").ids) == "import json\n    x = 1"
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok.encode("class Wrapper:\n    def fill(self").ids
    runner = ModelRunner(model)
    runner.allocate(1, 64)
    ours = runner.prefill([ids]).logits[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_train_target_bad_input(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["train-target", "--out", str(tmp_path / "t"), "--corpus",
                     str(tmp_path / "missing"), "--device", "cpu", "--no-progress"]) == 2
        assert main(["train-target", "--out", str(tmp_path / "t"), "--heads", "3",
                     "--kv-heads", "2", "--device", "cpu"]) == 2
    assert "does not exist" in err.getvalue() and "multiple" in err.getvalue()


def test_train_target_reuses_a_tokenizer(tmp_path):
    """--tokenizer DIR: a draft LM trained with the target's tokenizer has its vocabulary and
    embedding rows, so it can draft for that target (`dspark generate --drafter`)."""
    _corpus(tmp_path / "corpus")
    common = ["--corpus", str(tmp_path / "corpus"), "--hidden", "32", "--heads", "2",
              "--kv-heads", "1", "--head-dim", "16", "--intermediate", "64", "--max-positions",
              "128", "--seq-len", "32", "--batch-size", "4", "--steps", "10", "--warmup-steps",
              "2", "--device", "cpu", "--no-progress"]
    target, draft = str(tmp_path / "target"), str(tmp_path / "draft")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["train-target", "--out", target, "--vocab-size", "300", "--layers", "2",
                     *common]) == 0, err.getvalue()
        assert main(["train-target", "--out", draft, "--tokenizer", target, "--layers", "1",
                     "--seed", "1", *common]) == 0, err.getvalue()
        assert main(["train-target", "--out", str(tmp_path / "x"), "--tokenizer",
                     str(tmp_path / "corpus"), *common]) == 2
    assert "no tokenizer.json" in err.getvalue()
    with open(os.path.join(target, "tokenizer.json")) as a, \
            open(os.path.join(draft, "tokenizer.json")) as b:
        assert a.read() == b.read()
    cfg_t = json.load(open(os.path.join(target, "config.json")))
    cfg_d = json.load(open(os.path.join(draft, "config.json")))
    assert cfg_t["vocab_size"] == cfg_d["vocab_size"] and cfg_d["num_hidden_layers"] == 1
    summary = json.load(open(os.path.join(draft, "train_target.json")))
    assert summary["tokenizer_from"] == target and summary["config"]["vocab_size"] == 300
    engine = SpeculativeEngine.from_pretrained(target, drafter=draft, gamma=3,
                                               dtype=torch.float32)
    spec = engine.generate(["def wrap(text"], max_new_tokens=10, stop_tokens=[])
    plain = engine.generate_autoregressive(["def wrap(text"], max_new_tokens=10, stop_tokens=[])
    assert spec.tokens == plain.tokens  # greedy: the draft LM changes nothing but the speed
