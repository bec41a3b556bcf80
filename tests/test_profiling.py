"""dspark.profiling: stage ranges in a real profiled generate() (CPU here) and the trace
summary's attribution of GPU kernels to stages, busy time and gaps (on a hand-made trace whose
answer is known)."""
import pytest

from dspark.demo import DEMO_PROMPTS, load_demo_pair
from dspark.engine import SpeculativeEngine
from dspark.metrics import StageTimer
from dspark.profiling import format_summary, profile_generate, summarize_trace


def _range(name, ts, dur, tid=1):
    return {"ph": "X", "cat": "user_annotation", "name": name, "pid": 1, "tid": tid, "ts": ts,
            "dur": dur}


def _launch(corr, ts, tid=1, name="cudaGraphLaunch"):
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "pid": 1, "tid": tid, "ts": ts,
            "dur": 2, "args": {"correlation": corr}}


def _kernel(name, corr, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": 7, "ts": ts, "dur": dur,
            "args": {"correlation": corr}}


def test_summary_attributes_kernels_to_the_launching_stage():
    # prefill (one launch), then two rounds of draft / target forward / accept / commit; a
    # graph replay's kernels share its launch's correlation id
    ev = [_range("prefill", 0, 100), _launch(1, 10), _kernel("prefill_gemm", 1, 20, 60)]
    t = 200
    for r in range(2):
        c = 10 * (r + 1)
        ev += [_range("draft", t, 40), _launch(c, t + 5),
               _kernel("draft_gemm", c, t + 10, 20), _kernel("draft_sample", c, t + 32, 4),
               _range("target forward", t + 40, 50), _launch(c + 1, t + 45),
               _kernel("fwd_gemm", c + 1, t + 50, 30), _kernel("fwd_attn", c + 1, t + 82, 10),
               _range("accept", t + 90, 10), _launch(c + 2, t + 92),
               _kernel("verify", c + 2, t + 95, 3),
               _range("commit", t + 100, 10), _launch(c + 3, t + 101),
               _kernel("commit", c + 3, t + 104, 2)]
        t += 200
    ev.append(_kernel("stray", 99, 1000, 1))  # no launch event: outside the stages
    s = summarize_trace({"traceEvents": ev})
    assert s["rounds"] == 2
    st = s["stages"]
    assert st["draft"]["calls"] == 2 and st["draft"]["host_ms_per_call"] == pytest.approx(0.040)
    assert st["draft"]["gpu_ms_per_call"] == pytest.approx(0.024)
    assert [k for k, _, _ in st["draft"]["top_kernels"]] == ["draft_gemm", "draft_sample"]
    assert st["draft"]["top_kernels"][0][2] == pytest.approx(20 / 24)
    assert st["target forward"]["gpu_ms_per_call"] == pytest.approx(0.040)
    assert st["accept"]["gpu_ms_per_call"] == pytest.approx(0.003)
    assert st["prefill"]["gpu_ms_per_call"] == pytest.approx(0.060)
    assert st["(outside stages)"]["top_kernels"][0][0] == "stray"
    g = s["gpu"]  # rounds only (not prefill, not the stray kernel): first kernel at 210
    busy = 2 * (20 + 4 + 30 + 10 + 3 + 2)
    assert g["busy_ms"] == pytest.approx(busy / 1e3)
    assert g["span_ms"] == pytest.approx((400 + 104 + 2 - 210) / 1e3)
    assert g["idle_ms"] == pytest.approx(g["span_ms"] - busy / 1e3)
    assert g["per_round_ms"]["busy"] == pytest.approx(busy / 2e3)
    assert g["gap_us_median"] > 0 and g["gap_us_p90"] >= g["gap_us_median"]
    assert "draft_gemm" in format_summary(s)


def test_nested_ranges_take_the_innermost_stage():
    ev = [_range("step", 0, 100), _range("draft", 10, 20), _launch(1, 15), _launch(2, 50),
          _kernel("k_draft", 1, 20, 5), _kernel("k_step", 2, 60, 5)]
    st = summarize_trace(ev)["stages"]
    assert [k for k, _, _ in st["draft"]["top_kernels"]] == ["k_draft"]
    assert [k for k, _, _ in st["step"]["top_kernels"]] == ["k_step"]


def test_stage_timer_ranges_only_when_asked():
    import torch.profiler as tp
    for annotate in (False, True):
        timer = StageTimer("cpu", nvtx=annotate)
        with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
            with timer("draft"):
                pass
        names = [e.name for e in prof.events()]
        assert ("draft" in names) == annotate
        assert "draft" in timer.totals()


@pytest.mark.parametrize("drafter", [True, False])
def test_profile_generate_on_cpu(tmp_path, drafter):
    target, tok, dspark_drafter = load_demo_pair("cpu")
    engine = SpeculativeEngine(target, dspark_drafter if drafter else None, nvtx=True)
    prompts = [tok.encode(p).ids for p in DEMO_PROMPTS[:2]]
    s = profile_generate(engine, prompts, str(tmp_path / "trace.json.gz"), max_new_tokens=8)
    assert (tmp_path / "trace.json.gz").stat().st_size > 0
    stages = s["stages"]
    # prefill: the target's, then (speculative) the drafter's start, each a range
    assert stages["prefill"]["calls"] == (2 if drafter else 1) and s["gpu"] is None
    if drafter:
        assert s["rounds"] >= 1
        for name in ("draft", "target forward", "accept", "commit"):
            assert stages[name]["calls"] == s["rounds"] and stages[name]["host_ms_per_call"] > 0
    else:  # autoregressive: one target forward per decode step
        assert stages["target forward"]["calls"] >= 7
    with pytest.raises(ValueError, match="nvtx=True"):
        profile_generate(SpeculativeEngine(target), prompts, str(tmp_path / "t.json"))


def test_profile_cli(tmp_path, capsys):
    import json
    import os

    from dspark.cli import main
    from dspark.demo import DEMO_MODELS

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in DEMO_PROMPTS[:2]))
    out = tmp_path / "prof"
    target = os.path.join(DEMO_MODELS, "target")
    rc = main(["profile", "--target", target, "--drafter", os.path.join(DEMO_MODELS, "dspark"),
               "--dataset", str(data), "--prompts", "2", "--max-new-tokens", "8",
               "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "target forward" in printed and "commit" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] >= 1 and summary["stages"]["draft"]["calls"] == summary["rounds"]
    assert (out / "trace.json.gz").stat().st_size > 0
    rc = main(["profile", "--target", target, "--ngram", "3", "--whole-step", "--dataset",
               str(data), "--device", "cpu", "--max-new-tokens", "8", "--json"])
    assert rc == 0 and "step" in json.loads(capsys.readouterr().out)["stages"]
    rc = main(["profile", "--target", target, "--dataset", str(tmp_path / "missing.jsonl"),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dspark profile: error:") and len(err.splitlines()) == 1


def test_graph_replays_group_kernels_by_their_launch():
    from dspark.profiling import graph_replays, replay_summary
    # two replays of a three-kernel graph (the second with a gap), one plain kernel launch
    ev = [_launch(1, 0), _kernel("gemm", 1, 10, 5), _kernel("attn", 1, 16, 3),
          _kernel("gemm", 1, 20, 5), _launch(2, 50), _kernel("gemm", 2, 60, 6),
          _kernel("attn", 2, 70, 2), _kernel("gemm", 2, 73, 4),
          _launch(3, 90, name="cudaLaunchKernel"), _kernel("lone", 3, 95, 1)]
    reps = graph_replays({"traceEvents": ev})
    assert reps == [[("gemm", 0, 5), ("attn", 6, 3), ("gemm", 10, 5)],
                    [("gemm", 0, 6), ("attn", 10, 2), ("gemm", 13, 4)]]
    s = replay_summary(reps[1])
    assert s["kernels"] == 3 and s["span_us"] == 17 and s["busy_us"] == 12
    assert s["top"] == [("gemm", 2, 10), ("attn", 1, 2)]
    assert replay_summary([]) == {"kernels": 0, "span_us": 0.0, "busy_us": 0.0, "top": []}
    assert replay_summary(reps[0], sequence=True)["sequence"] == reps[0]
