"""The draft trainer on a tiny random target (CPU): training lowers the loss and raises the
engine-measured tau over an untrained drafter for every method; checkpoints resume exactly; the
train-draft / calibrate-draft / eval-draft commands run end to end."""
import contextlib
import io
import json
import os
import warnings

import pytest
import torch

from dspark.cli_train import main
from dspark.drafters import DrafterSpec, build_draft_model, load_drafter, make_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import load_model
from dspark.train.data import Sample, load_samples
from dspark.train.losses import block_losses, cosine_lr
from dspark.train.trainer import TrainConfig, train_drafter

from helpers import make_checkpoint

V = 64
NEW = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ttarget"))
    make_checkpoint(path, "qwen3", vocab=V, hidden=32, layers=3, init=0.3, seed=1, head_dim=8)
    return path


@pytest.fixture(scope="module")
def target(ckpt):
    return load_model(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def corpus(target):
    """16 prompts and the target's own greedy continuations (the training data)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V - 1, (6,), generator=g).tolist() for _ in range(16)]
    gen = SpeculativeEngine(target).generate_autoregressive(prompts, max_new_tokens=NEW,
                                                            stop_tokens=[]).tokens
    samples = [Sample(p + r, [0] * len(p) + [1] * len(r), len(p))
               for p, r in zip(prompts, gen, strict=True)]
    return prompts, samples


def _spec(target, method, head="markov"):
    return DrafterSpec.for_target(target.config, method, gamma=4, mask_token_id=V - 1,
                                  num_draft_layers=None if method == "eagle3" else 1,
                                  markov_rank=32, head_type=head)


def _tau(target, model, prompts):
    return SpeculativeEngine(target, make_drafter(model)).generate(
        prompts, max_new_tokens=NEW, stop_tokens=[]).metrics.tau


@pytest.mark.parametrize("method,head", [("dspark", "markov"), ("dspark", "rnn"),
                                         ("dflash", "none"), ("eagle3", "none")])
def test_training_lowers_loss_and_raises_tau(target, corpus, method, head):
    prompts, samples = corpus
    spec = _spec(target, method, head)
    torch.manual_seed(0)
    untrained = build_draft_model(spec, target)
    tau0 = _tau(target, untrained, prompts)
    steps = 150 if method == "eagle3" else 300  # EAGLE-3 supervises every position
    cfg = TrainConfig(steps=steps, batch_size=8, num_anchors=16, lr=3e-3, progress=False,
                      log_every=20, seed=0)
    model, hist = train_drafter(target, spec, samples, cfg, log=lambda s: None)
    assert hist[0]["step"] == 1 and hist[-1]["step"] == steps
    first = sum(h["loss"] for h in hist[:2]) / 2
    last = sum(h["loss"] for h in hist[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    assert hist[-1]["tau_est"] > hist[0]["tau_est"]
    tau1 = _tau(target, model, prompts)
    assert tau1 > tau0 + 0.2, (tau0, tau1)


def test_resume_continues_the_same_run(target, corpus, tmp_path):
    _, samples = corpus
    spec = _spec(target, "dspark")
    kw = dict(steps=12, batch_size=4, num_anchors=8, lr=3e-3, progress=False, save_every=0)
    straight, _ = train_drafter(target, spec, samples, TrainConfig(**kw), log=lambda s: None)
    out = str(tmp_path / "run")
    train_drafter(target, _spec(target, "dspark"), samples, TrainConfig(stop_after=5, **kw), out,
                  log=lambda s: None)
    assert os.path.isfile(os.path.join(out, "checkpoint", "trainer.pt"))
    resumed, hist = train_drafter(target, _spec(target, "dspark"), samples, TrainConfig(**kw),
                                  out, resume=True, log=lambda s: None)
    assert hist[-1]["step"] == 12
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    assert load_drafter(out, target).spec.training["steps"] == 12
    with pytest.raises(ValueError, match="nothing to resume"):
        train_drafter(target, spec, samples, TrainConfig(**kw), str(tmp_path / "new"),
                      resume=True)


def test_loss_terms():
    """TV is the full L1, the confidence label is 1 - L1 / 2, weights decay with 4.0."""
    Z = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # [1, G=2, V=2]
    T = torch.tensor([[[0.0, 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[0, 0]])
    valid = torch.tensor([[True, True]])
    conf = torch.zeros(1, 2, requires_grad=True)
    t = block_losses(Z, conf, T, labels, valid, 0.1, 0.9, 1.0)
    w = torch.tensor([1.0, torch.exp(torch.tensor(-0.25))])
    l1 = torch.tensor([0.0, 2 * (torch.sigmoid(torch.tensor(10.0)) - torch.sigmoid(
        torch.tensor(-10.0)))])
    assert float(t.tv) == pytest.approx(float((w * l1).sum() / w.sum()), rel=1e-5)
    torch.testing.assert_close(t.accept, 1 - l1 / 2)
    t.total.backward()
    assert conf.grad is not None and conf.grad[0, 0] < 0  # label 1 at slot 1 pushes z up
    assert cosine_lr(0, 100) == pytest.approx(0.25) and cosine_lr(4, 100) == pytest.approx(1.0)
    assert cosine_lr(99, 100) < 0.01
    # the "soft" CE ablation: cross-entropy against the target's distribution, same weights
    soft = block_losses(Z, None, T, labels, valid, 1.0, 0.0, 0.0, ce_target="soft")
    ce_k = -(torch.softmax(T, -1) * torch.log_softmax(Z, -1)).sum(-1)[0]
    assert float(soft.ce) == pytest.approx(float((w * ce_k).sum() / w.sum()), rel=1e-5)
    assert float(soft.total) == pytest.approx(float(soft.ce), rel=1e-6)
    with pytest.raises(ValueError, match="ce_target"):
        block_losses(Z, None, T, labels, valid, ce_target="hard")


def _write_text(path, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = torch.randint(1, V - 2, (30,), generator=g).tolist()
            f.write(" ".join(f"w{w}" for w in words) + "\n")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_train_calibrate_eval(ckpt, tmp_path):
    data = str(tmp_path / "corpus.txt")
    _write_text(data)
    jsonl = str(tmp_path / "prompts.jsonl")
    with open(jsonl, "w") as f:
        for i in range(6):
            f.write(json.dumps({"turns": [f"w{i + 1} w{i + 2} w{i + 3}", "w9 w9"]}) + "\n")
    out = str(tmp_path / "dspark")
    common = ["--target", ckpt, "--device", "cpu", "--no-progress", "--gamma", "3",
              "--layers", "1", "--rank", "16", "--batch-size", "4", "--num-anchors", "8",
              "--max-length", "48", "--prompt-tokens", "8", "--gen-tokens", "24",
              "--heldout-frac", "0.25", "--eval-prompts", "4", "--eval-new-tokens", "12",
              "--calib-prompts", "6", "--calib-new-tokens", "16"]
    rc, text, err = _run(["train-draft", "--method", "dspark", "--data", data, jsonl,
                          "--out", out, "--steps", "6"] + common)
    assert rc == 0, err
    assert "STS on" in text and "greedy identical: True" in text
    spec = json.load(open(os.path.join(out, "drafter_config.json")))
    assert spec["method"] == "dspark" and len(spec["sts_temperatures"]) == 3
    assert spec["calibration"]["per_position"][0]["rounds"] > 0
    train = load_samples(os.path.join(out, "data", "train.safetensors"))
    held = load_samples(os.path.join(out, "data", "heldout.safetensors"))
    assert train and held and all(0 < s.prompt_len < len(s.ids) for s in train)
    assert all(m == (i >= s.prompt_len) for s in train for i, m in enumerate(s.loss_mask))
    # --data-only builds a shared cache and trains nothing
    shared = str(tmp_path / "shared_data")
    rc, text, err = _run(["train-draft", "--method", "dflash", "--data", data, "--out",
                          str(tmp_path / "d0"), "--data-cache", shared, "--responses", "as-is",
                          "--data-only"] + common)
    assert rc == 0 and "held-out samples" in text, err
    assert os.path.isfile(os.path.join(shared, "train.safetensors"))
    assert not os.path.exists(str(tmp_path / "d0" / "drafter_config.json"))
    # the cached data is reused; as-is data for the other methods
    for method in ("dflash", "eagle3"):
        rc, text, err = _run(["train-draft", "--method", method, "--data", data, "--out",
                              str(tmp_path / method), "--steps", "3", "--responses", "as-is"]
                             + common)
        assert rc == 0, err
    rc, text, err = _run(["train-draft", "--method", "dspark", "--out", out, "--steps", "2"]
                         + common)
    assert rc == 0 and "using cached data" in text, err
    heldout = os.path.join(out, "data", "heldout.safetensors")
    rc, text, err = _run(["calibrate-draft", "--target", ckpt, "--drafter", out, "--data",
                          heldout, "--num-prompts", "4", "--max-new-tokens", "12", "--device",
                          "cpu"])
    assert rc == 0 and "ECE" in text, err
    rc, text, err = _run(["eval-draft", "--target", ckpt, "--drafter", out,
                          str(tmp_path / "dflash"), str(tmp_path / "eagle3"), "--data", jsonl,
                          "--num-prompts", "3", "--max-new-tokens", "10", "--device", "cpu",
                          "--json"])
    assert rc == 0, err
    report = json.loads(text)
    # every drafter's greedy output is compared with the one autoregressive baseline run
    assert len(report) == 3 and all(r.get("greedy_identical") is True for r in report.values())
    assert all(r["speculative"]["tau"] >= 1 for r in report.values())
    # bad input: a clear message and exit code 2
    rc, _, err = _run(["train-draft", "--target", ckpt, "--data", str(tmp_path / "missing.txt"),
                       "--out", str(tmp_path / "x"), "--device", "cpu", "--no-progress"])
    assert rc == 2 and "no data" in err
    rc, _, err = _run(["calibrate-draft", "--target", ckpt, "--drafter", str(tmp_path / "eagle3"),
                       "--data", heldout, "--device", "cpu"])
    assert rc == 2 and "STS" in err
