"""`dspark bench` end to end on the shipped demo pair (CPU, tiny prompts): the table, the JSON
report and the PNG plots, with numbers from the engine's own code path."""
import json
import os

import pytest

from dspark.cli import main
from dspark.demo import DEMO_MODELS, DEMO_PROMPTS, load_demo_pair
from dspark.engine import SpeculativeEngine


def test_bench_writes_report_and_plots(tmp_path, capsys):
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"turns": [p, "unused second turn"]}) + "\n"
                            for p in DEMO_PROMPTS[:2]))
    out = tmp_path / "bench"
    rc = main(["bench", "--target", os.path.join(DEMO_MODELS, "target"),
               "--drafter", os.path.join(DEMO_MODELS, "dspark"), "--ngram", "3",
               "--dataset", str(data), "--prompts", "2", "--max-new-tokens", "8",
               "--batch", "1", "2", "--device", "cpu", "--dtype", "float32",
               "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    table = captured.out
    assert rc == 0 and "== code" in table and "ngram" in table
    report = json.loads((out / "results.json").read_text())
    runs = report["runs"]
    assert len(runs) == 6  # 1 dataset x 1 temperature x 2 batch sizes x (AR + 2 drafters)
    # each run is reported as it ends (a sweep cut short keeps what it measured)
    assert json.loads((out / "results.partial.json").read_text())["runs"] == runs
    assert captured.err.count("bench: code T=0 batch ") == 6
    for r in runs:
        assert r["new_tokens"] == 16 and r["rounds"] > 0
        # equal-length plain decoding ends every request together; speculation's slowest last
        assert r["tail"] == pytest.approx(1.0) if r["method"] == "autoregressive" \
            else r["tail"] >= 1.0
        assert set(r["round_ms"]) == {"draft", "schedule", "target_forward", "accept", "commit",
                                      "step", "other"}
        if r["method"] != "autoregressive":
            assert r["greedy_identical_fraction"] == 1.0 and r["tau"] >= 1.0
            assert len(r["position_acceptance"]) == 4 and r["speedup"] > 0
            assert r["user_speedup"] > 0
    for name in ("acceptance_by_position.png", "speedup.png", "time_split.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # the bench's tau is the engine's: one batch of 2 through SpeculativeEngine directly
    target, tok, drafter = load_demo_pair("cpu")
    prompts = [tok.encode(p).ids for p in DEMO_PROMPTS[:2]]
    gen = SpeculativeEngine(target, drafter).generate(prompts, max_new_tokens=8, seed=[0, 1])
    bench = next(r for r in runs if r["method"] == "dspark" and r["batch"] == 2)
    assert bench["accept_hist"] == gen.metrics.accept_hist


def test_bench_serve_requests(tmp_path, capsys):
    """--serve-requests N: N requests through continuous batching with --batch slots, every
    method the same way; greedy outputs identical to plain decoding's, the tau the engine's."""
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in DEMO_PROMPTS[:3]))
    out = tmp_path / "bench"
    rc = main(["bench", "--target", os.path.join(DEMO_MODELS, "target"),
               "--drafter", os.path.join(DEMO_MODELS, "dspark"), "--ngram", "3",
               "--dataset", str(data), "--prompts", "3", "--max-new-tokens", "8",
               "--batch", "2", "--serve-requests", "5", "--device", "cpu", "--dtype", "float32",
               "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["autoregressive", "dspark", "ngram"]
    for r in runs:
        assert r["serve"] and r["prompts"] == 5 and r["new_tokens"] == 40
        if r["method"] != "autoregressive":
            assert r["greedy_identical_fraction"] == 1.0 and r["tau"] >= 1.0
    assert runs[1]["tau"] > 1.0  # (DSpark accepts drafts on these prompts; n-gram may find none)
    target, tok, drafter = load_demo_pair("cpu")
    prompts = [tok.encode(p).ids for p in (DEMO_PROMPTS[:3] * 2)[:5]]
    gen = SpeculativeEngine(target, drafter).serve(prompts, 2, max_new_tokens=8,
                                                   seed=list(range(5)))
    assert runs[1]["tau"] == pytest.approx(gen.metrics.tau)
    assert main(["bench", "--target", os.path.join(DEMO_MODELS, "target"), "--ngram", "3",
                 "--dataset", str(data), "--serve-requests", "-1", "--device", "cpu"]) == 2


def test_bench_compile_drafter(tmp_path, capsys):
    """--compile-drafter: the DSpark drafter's per-round bodies under torch.compile give the same
    drafts (accept histogram) as the eager drafter, greedy output identical."""
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in DEMO_PROMPTS[:2]))
    reports = []
    for extra in ([], ["--compile-drafter"]):
        out = tmp_path / f"bench{len(extra)}"
        rc = main(["bench", "--target", os.path.join(DEMO_MODELS, "target"),
                   "--drafter", os.path.join(DEMO_MODELS, "dspark"), "--dataset", str(data),
                   "--prompts", "2", "--max-new-tokens", "8", "--device", "cpu",
                   "--dtype", "float32", "--out", str(out), "--no-progress", "--json", *extra])
        assert rc == 0
        capsys.readouterr()
        reports.append(json.loads((out / "results.json").read_text()))
    eager, compiled = ([r for r in rep["runs"] if r["method"] == "dspark"] for rep in reports)
    assert compiled[0]["greedy_identical_fraction"] == 1.0
    assert compiled[0]["accept_hist"] == eager[0]["accept_hist"]
    assert reports[0]["config"]["compile_drafter"] is False  # the default on a CPU
    assert reports[1]["config"]["compile_drafter"] is True


def test_bench_bad_input(tmp_path, capsys):
    target = os.path.join(DEMO_MODELS, "target")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["bench", "--target", target, "--ngram", "3", "--dataset", str(empty),
                 "--device", "cpu"]) == 2
    assert "no usable records" in capsys.readouterr().err
    assert main(["bench", "--target", target, "--dataset", str(empty), "--device", "cpu"]) == 2
    assert "nothing to compare" in capsys.readouterr().err


def test_bench_warms_every_prefill_shape_before_timing(monkeypatch):
    """Before an engine's timed run: the longest prompts (the largest cache bucket), then every
    prompt with 2 new tokens (every prefill shape); only then the timed run over all prompts."""
    from dspark import benchmark
    calls = []
    real = benchmark._generate

    def spy(engine, fn, prompts, batch, kw, bar, serve=False):
        calls.append((fn, [len(p) for p in prompts], kw["max_new_tokens"]))
        return real(engine, fn, prompts, batch, kw, bar, serve)

    monkeypatch.setattr(benchmark, "_generate", spy)
    target, tok, _ = load_demo_pair("cpu")
    prompts = [tok.encode(p).ids for p in DEMO_PROMPTS[:3]]
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) > 1  # the check below needs different lengths
    benchmark.run_bench(target, {}, {"demo": prompts}, max_new_tokens=4)
    assert calls == [("generate_autoregressive", [max(lengths)], 4),
                     ("generate_autoregressive", lengths, 2),
                     ("generate_autoregressive", lengths, 4)]
