"""The runner's fused_max_rows="auto" (dspark/crossover.py): where the fused kernels stop paying,
measured per model, device and dtype, cached, and used by the runner. CPU (the fused kernels have
CPU implementations); the CUDA variant measures on the GPU."""
import json
import os

import pytest
import torch

import dspark
from dspark import crossover
from dspark.cli import main as cli_main
from dspark.demo import DEMO_MODELS, DEMO_PROMPTS
from dspark.engine import SpeculativeEngine
from dspark.models import ModelRunner, load_model
from dspark.models.transformer import FUSED_MAX_ROWS


@pytest.fixture(scope="module")
def model():
    return load_model(os.path.join(DEMO_MODELS, "target"), "cpu", torch.float32)


def test_crossover_is_the_last_size_fused_never_lost(model, monkeypatch):
    """max_rows: the largest grid size up to which the fused path was never slower (a later
    size where it wins again does not count); the runner gets its settings back."""
    fused_ms = {8: 1.0, 16: 1.0, 32: 2.0, 64: 5.0, 128: 3.0}
    cublas_ms = {8: 2.0, 16: 2.0, 32: 2.0, 64: 4.0, 128: 4.0}
    runner = ModelRunner(model, fused=True)

    def fake(r, B, **kw):
        assert r.fused_max_rows >= B and not r.batch_invariant  # every size on its path
        return (fused_ms if r.fused else cublas_ms)[B] / 1e3
    monkeypatch.setattr(crossover, "measure_verify_seconds", fake)
    got = crossover.measure_crossover(runner, grid=[128, 8, 32, 16, 64])
    assert got["grid"] == [8, 16, 32, 64, 128] and got["max_rows"] == 32  # a tie is no loss
    assert got["fused_seconds"][3] == 5e-3 and got["cublas_seconds"][3] == 4e-3
    assert runner.fused and runner.fused_max_rows == FUSED_MAX_ROWS and runner.cache is None
    cublas_ms[8] = 0.5  # fused loses at the smallest size: that size is the crossover
    assert crossover.measure_crossover(runner, grid=[8, 16])["max_rows"] == 8
    with pytest.raises(ValueError, match="token counts >= 1"):
        crossover.measure_crossover(runner, grid=[0, 8])


def test_measured_on_the_demo_target(model):
    """A real (tiny) measurement: both paths time every size and give the same logits."""
    runner = ModelRunner(model, fused=True)
    got = crossover.measure_crossover(runner, grid=[2, 6], gamma=3, context=8, reps=1)
    assert got["grid"] == [2, 6] and got["max_rows"] in (2, 6)
    assert all(t > 0 for t in got["fused_seconds"] + got["cublas_seconds"])


def test_auto_runner_measures_once_then_reads_the_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_SPS_CACHE", str(tmp_path))
    calls = []

    def fake(runner):
        calls.append(1)
        return dict(format=crossover.CROSSOVER_FORMAT, grid=[8], fused_seconds=[1.0],
                    cublas_seconds=[2.0], max_rows=96, config={})
    monkeypatch.setattr(crossover, "measure_crossover", fake)
    runner = ModelRunner(model, fused=True, fused_max_rows="auto")
    assert runner.fused_max_rows == 96 and calls == [1]
    path = crossover.crossover_path(runner)
    assert path.startswith(str(tmp_path)) and os.path.isfile(path)
    again = ModelRunner(model, fused=True, fused_max_rows="auto")
    assert again.fused_max_rows == 96 and calls == [1]  # read from the cache
    # the engine's speculation on a runner with the resolved limit: greedy == autoregressive
    _, tok, _ = dspark.demo.load_demo_pair("cpu")
    prompts = [tok.encode(p).ids for p in DEMO_PROMPTS[:2]]
    engine = SpeculativeEngine(again, dspark.demo.load_demo_pair("cpu")[2])
    kw = dict(max_new_tokens=12, stop_tokens=[])
    assert engine.generate(prompts, **kw).tokens == engine.generate_autoregressive(
        prompts, **kw).tokens
    with open(path, "w") as f:
        json.dump({"format": crossover.CROSSOVER_FORMAT, "max_rows": 0}, f)
    with pytest.raises(ValueError, match="not a fused-kernel crossover file"):
        ModelRunner(model, fused=True, fused_max_rows="auto")


def test_auto_without_fused_kernels_measures_nothing(model, tmp_path, monkeypatch):
    """auto on a runner that does not use the fused kernels (CPU default, batch_invariant) keeps
    the default: nothing to choose between."""
    monkeypatch.setenv("DSPARK_SPS_CACHE", str(tmp_path))
    assert ModelRunner(model, fused_max_rows="auto").fused_max_rows == FUSED_MAX_ROWS
    assert ModelRunner(model, batch_invariant=True,
                       fused_max_rows="auto").fused_max_rows == FUSED_MAX_ROWS
    assert os.listdir(tmp_path) == []
    for bad in ("Auto", 0, -3, 2.5, True):
        with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
            ModelRunner(model, fused_max_rows=bad)


def test_ragged_fused_switch_is_checked(model, monkeypatch):
    monkeypatch.setenv("DSPARK_RAGGED_FUSED", "both")
    with pytest.raises(ValueError, match="DSPARK_RAGGED_FUSED must be 'auto', 'pad' or 'gather'"):
        ModelRunner(model)
    monkeypatch.setenv("DSPARK_RAGGED_FUSED", "gather")
    assert ModelRunner(model).ragged_fused == "gather"


def test_cli_fused_max_rows_argument(capsys):
    base = ["generate", "--target", os.path.join(DEMO_MODELS, "target"), "--prompt", "x",
            "--device", "cpu", "--max-new-tokens", "2"]
    with pytest.raises(SystemExit):
        cli_main(base + ["--fused-max-rows", "zero"])
    assert "expected an integer >= 1 or 'auto'" in capsys.readouterr().err


@pytest.mark.cuda
def test_cuda_crossover(tmp_path):
    if not dspark.cuda_available():
        pytest.skip("needs a GPU")
    r = ModelRunner(load_model(os.path.join(DEMO_MODELS, "target"), "cuda", torch.bfloat16))
    got = crossover.measure_crossover(r, grid=[8, 64, 256], reps=3, context=64)
    assert got["max_rows"] in (8, 64, 256) and r.use_cuda_graphs and not r._graphs
    assert all(t > 0 for t in got["fused_seconds"] + got["cublas_seconds"])
