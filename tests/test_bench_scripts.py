"""bench/project_8b.py's measurement on a CPU at toy size (the demo target, a random DSpark
drafter built the way the script builds one at the 8B shape): the script's code path runs, its
numbers are per-round times of real engine runs, and the projection is tau x decode / round."""
import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


@pytest.mark.skipif(not os.path.isdir(BENCH), reason="needs the source tree's bench/")
def test_project_8b_measures_rounds_on_cpu(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import project_8b

    from dspark.demo import DEMO_MODELS
    from dspark.models import ModelRunner, load_model

    target = load_model(os.path.join(DEMO_MODELS, "target"), "cpu", torch.float32)
    drafter = project_8b.random_dspark_drafter(target, gamma=3, layers=1, rank=8,
                                               taps=[0, 1, 2],
                                               mask_token_id=target.config.vocab_size - 1)
    assert drafter.model.head.w1.weight.dtype == torch.float32
    m = project_8b.measure(ModelRunner(target), drafter, B=2, prompt_len=12, new_tokens=6)
    assert m["decode"]["rounds"] >= 5 and m["decode"]["ms"] > 0 and m["round"]["ms"] > 0
    assert m["round"]["tau"] >= 1.0
    split = m["split"]
    assert all(split[s] > 0 for s in ("draft", "target_forward", "accept", "commit"))


SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")


@pytest.mark.skipif(not os.path.isdir(SCRIPTS), reason="needs the source tree's scripts/")
def test_gpu_session_stages_exist_and_bad_mode_fails(tmp_path):
    """scripts/gpu_session.sh: valid bash, every device_run.sh / bench_pair.sh stage it names
    exists there, and an unknown mode is a usage error (exit 2) before anything runs."""
    import re
    import subprocess
    session = os.path.join(SCRIPTS, "gpu_session.sh")
    assert subprocess.run(["bash", "-n", session]).returncode == 0
    text = open(session).read()
    device_run = open(os.path.join(SCRIPTS, "device_run.sh")).read()
    pair = open(os.path.join(SCRIPTS, "bench_pair.sh")).read()
    stages = set(re.findall(r"device_run\.sh (\w+)", text))
    assert stages >= {"build", "sweep", "project", "fuzz"}
    for s in stages:
        assert re.search(rf"^\s+{s}\)", device_run, re.M), f"device_run.sh has no stage {s}"
    for s in set(re.findall(r"bench_pair\.sh ([\w -]+)", text)):
        for name in s.split():
            assert re.search(rf"^\s+{name}\) timed", pair, re.M), f"bench_pair.sh: no {name}"
    r = subprocess.run(["bash", session, "nonsense"], capture_output=True, text=True,
                       env={**os.environ, "RES": str(tmp_path)})
    assert r.returncode == 2 and "usage" in r.stderr


def test_gpu_session_start_without_eval_sets_stops_before_building(tmp_path):
    """`gpu_session.sh start` in a checkout whose .data lacks the eval sets (they do not reach the
    device otherwise) stops at once with the fix, before the build spends device time."""
    import shutil
    import subprocess
    (tmp_path / "scripts").mkdir()
    shutil.copy(os.path.join(SCRIPTS, "gpu_session.sh"), tmp_path / "scripts")
    (tmp_path / ".data").mkdir()
    (tmp_path / ".data" / "humaneval.jsonl").write_text("{}\n")  # one of four
    r = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_session.sh"), "start"],
                       capture_output=True, text=True,
                       env={**os.environ, "RES": str(tmp_path / "res")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert ".data/mbpp.jsonl missing" in r.stderr and "../shared/data/eval" in r.stderr
    assert not (tmp_path / "res" / "build.txt").exists()
