"""The scheduler around dspark::schedule_prefix: losslessness of the early stop (the method's
Appendix A counterexample, exactly and as a sampled test with dspark.ops.verify), and SPS
profiling (grid, layout, interpolation, the JSON cache, load_sps, the plot, `dspark
profile-sps`) on the shipped demo target, on CPU."""
import json
import os

import pytest
import torch
from scipy import stats

import dspark
from dspark import scheduler
from dspark.cli import main as cli_main
from dspark.demo import DEMO_MODELS
from dspark.models import ModelRunner, load_model

# ---- Appendix A: searching past a non-improvement with the current draft's confidences biases
# the output; the early stop does not. R = 1, gamma = 2, SPS = (1.0, 0.5, 0.45); target
# p = (A 0.7, B 0.3), draft q = (0.5, 0.5), so c_1 = sum min(p, q) = 0.8; x_1 = A gives
# c_2 = 0.9, x_1 = B gives c_2 = 0. Theta_0 = 1, Theta_1 = 1.8 * 0.5 = 0.9 < 1: Algorithm 1 stops
# before c_2 is known and the target samples A w.p. 0.7. The global argmax over the path sees
# Theta_2 = 2.52 * 0.45 = 1.134 when x_1 = A (verify both: A is accepted w.p. 1) and 0.81 when
# x_1 = B (verify none: A w.p. 0.7), so A comes out w.p. 0.5 * 1 + 0.5 * 0.7 = 0.85.
P_TARGET, Q_DRAFT = torch.tensor([0.7, 0.3]), torch.tensor([0.5, 0.5])
SPS = torch.tensor([1.0, 0.5, 0.45])
A, B = 0, 1


def confidences(x1: int) -> torch.Tensor:
    return torch.tensor([[0.8, 0.9 if x1 == A else 0.0]])


def early_stop_length(x1: int) -> int:
    """Ours: Algorithm 1 (sync mode) on the round's confidences."""
    return int(dspark.ops.schedule_prefix(confidences(x1), torch.tensor([2]), SPS, "sync"))


def global_argmax_length(x1: int) -> int:
    """The anticipating scheduler: the whole path's first argmax (schedule_budget) computed on
    the *current* draft's confidences, then its top K -- what the async variant may only do
    with confidences two steps old."""
    c = confidences(x1)
    K = dspark.ops.schedule_budget(c, torch.tensor([2]), SPS)
    return int(dspark.ops.schedule_prefix(c, torch.tensor([2]), None, "async", budget=K))


def exact_p_first_is_a(length_of) -> float:
    """P(first output = A), enumerating x_1: verifying x_1 keeps it w.p. min(1, p/q), else the
    residual max(p - q, 0) (all A) is sampled; verifying nothing samples p."""
    total = 0.0
    for x1 in (A, B):
        if length_of(x1) == 0:
            p_a = float(P_TARGET[A])
        else:
            accept = min(1.0, float(P_TARGET[x1] / Q_DRAFT[x1]))
            p_a = accept * (x1 == A) + (1 - accept) * 1.0  # the residual is all A here
        total += float(Q_DRAFT[x1]) * p_a
    return total


def test_appendix_a_exact():
    assert [early_stop_length(x) for x in (A, B)] == [0, 0]
    assert [global_argmax_length(x) for x in (A, B)] == [2, 0]
    assert exact_p_first_is_a(early_stop_length) == pytest.approx(0.70)
    assert exact_p_first_is_a(global_argmax_length) == pytest.approx(0.85)


def simulate_first_tokens(length_of, rounds: int, seed: int) -> torch.Tensor:
    """`rounds` independent rounds: draw x_1, x_2 from q, schedule each round with the op (R = 1),
    then verify every round's admitted prefix in one dspark.ops.verify call (exact rejection
    sampling, keyed randomness); returns each round's first output token."""
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(Q_DRAFT, 2 * rounds, replacement=True, generator=gen)
    drafts = drafts.view(rounds, 2)
    lengths = [length_of(int(x1)) for x1 in drafts[:, 0]]
    offsets, parents = dspark.ops.chain_layout(lengths)
    tokens = torch.cat([torch.cat([torch.tensor([A]), drafts[i, :n]])
                        for i, n in enumerate(lengths)])
    N = tokens.numel()
    logits = P_TARGET.log().expand(N, 2).contiguous()  # the target is p after every prefix
    res = dspark.ops.verify(logits, offsets, tokens, parents, Q_DRAFT.expand(N, 2).contiguous(),
                            dspark.ops.sampling_tensors(rounds, 1.0),
                            seeds=torch.arange(rounds) + seed * rounds,
                            positions=torch.zeros(rounds, dtype=torch.long), max_nodes=3)
    return res.out_tokens[:, 0]


@pytest.mark.parametrize("scheduler_name,p_true,p_false", [
    ("early_stop", 0.70, 0.85), ("global_argmax", 0.85, 0.70)])
def test_appendix_a_sampled(scheduler_name, p_true, p_false):
    """3000 rounds: the sample fits its exact P(A) (p > 1e-3) and rejects the other one
    (p < 1e-9; the two differ by ~18 standard deviations)."""
    length_of = early_stop_length if scheduler_name == "early_stop" else global_argmax_length
    first = simulate_first_tokens(length_of, 3000, seed=7)
    k, n = int((first == A).sum()), first.numel()
    assert stats.binomtest(k, n, p_true).pvalue > 1e-3, (k, n)
    assert stats.binomtest(k, n, p_false).pvalue < 1e-9, (k, n)


# ---- SPS tables ----------------------------------------------------------------------------------
def test_default_grid_and_layout():
    g = scheduler.default_grid(1024, "cuda")
    assert g[:64] == list(range(1, 65)) and g[-1] == 1024 and 512 in g and 544 in g and 520 not in g
    c = scheduler.default_grid(40, "cpu")
    assert c == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40]
    assert scheduler.default_grid(1, "cpu") == [1]
    for B in (1, 7, 8, 9, 63, 64, 100):
        counts = scheduler.verify_layout(B, 7)
        assert sum(counts) == B and max(counts) <= 8 and len(counts) == -(-B // 8)
        assert max(counts) - min(counts) <= 1
    assert scheduler.verify_layout(10, 7, requests=4) == [3, 3, 2, 2]
    assert scheduler.verify_layout(3, 7, requests=4) == [1, 1, 1]


def test_table_interpolation_and_monotone():
    grid, secs = [1, 4, 8], [1.0, 0.5, 2.0]  # B = 4 measured faster than B = 1 (noise)
    raw = scheduler.table_from_measurements(grid, secs, 8, "linear", monotone=False)
    assert raw[0] == 1.0 and raw[3] == 2.0 and raw[7] == 0.5
    assert raw[1] == pytest.approx(1 / (1.0 - 0.5 / 3)) and raw[5] == pytest.approx(1 / 1.25)
    mono = scheduler.table_from_measurements(grid, secs, 8, "linear")
    assert mono[:4] == [2.0] * 4 and all(a >= b for a, b in zip(mono, mono[1:]))
    step = scheduler.table_from_measurements(grid, secs, 8, "step", monotone=False)
    assert step == [1.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="up to max_tokens"):
        scheduler.table_from_measurements([1, 4], [1.0, 1.0], 8)
    with pytest.raises(ValueError, match="interpolate"):
        scheduler.table_from_measurements(grid, secs, 8, "cubic")


def test_parse_schedule():
    assert scheduler.parse_schedule("sync") == ("sync", 0.0)
    assert scheduler.parse_schedule("threshold:0.7") == ("threshold", 0.7)
    for bad in ("threshold", "threshold:1.5", "threshold:x", "greedy", "sync:1"):
        with pytest.raises(ValueError):
            scheduler.parse_schedule(bad)


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(load_model(os.path.join(DEMO_MODELS, "target"), "cpu", torch.float32))


def test_profile_cache_load_and_plot(runner, tmp_path):
    cache = str(tmp_path / "sps")
    assert scheduler.load_sps(runner, 12, cache_dir=cache) is None
    table = scheduler.profile_sps(runner, 12, gamma=3, context=16, grid=[1, 5, 9], reps=1,
                                  cache_dir=cache)
    assert table.max_tokens == 12 and table.grid == [1, 5, 9, 12]
    assert all(s > 0 for s in table.sps) and all(a >= b for a, b in zip(table.sps, table.sps[1:]))
    assert table.key == scheduler.sps_key(runner) and table.key["dtype"] == "float32"
    path = scheduler.sps_cache_path(table.key, cache)
    assert os.path.isfile(path) and path.startswith(cache)
    assert scheduler.load_sps(runner, 12, cache_dir=cache) == table
    assert scheduler.load_sps(path) == table
    assert scheduler.load_sps(runner, 13, cache_dir=cache) is None  # too short for B = 13
    t = table.tensor()
    assert t.dtype == torch.float32 and t.shape == (12,)
    lengths = dspark.ops.schedule_prefix(torch.full((2, 3), 0.9), torch.tensor([3, 3]), t)
    assert lengths.shape == (2,)
    longer = scheduler.load_sps(runner, 16, cache_dir=cache, profile=True, gamma=3, context=16,
                                grid=[1, 16], reps=1)
    assert longer.max_tokens == 16 and scheduler.load_sps(runner, 16, cache_dir=cache) == longer
    png = scheduler.plot_sps(longer, str(tmp_path / "sps.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(path) as f:
        doc = json.load(f)
    doc["sps"][3] = -1.0
    with open(path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(ValueError, match="finite and > 0"):
        scheduler.load_sps(path)
    assert scheduler.load_sps(runner, 4, cache_dir=cache) is None  # unreadable: not used


def test_cli_profile_sps(tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["profile-sps", "--target", os.path.join(DEMO_MODELS, "target"), "--device", "cpu",
            "--dtype", "float32", "--max-tokens", "10", "--gamma", "3", "--context", "8",
            "--grid", "1,4", "--reps", "1", "--out", out, "--no-progress"]
    assert cli_main(args) == 0
    files = sorted(os.listdir(out))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    assert "B =    10" in capsys.readouterr().out
    assert cli_main(args + ["--json"]) == 0  # cached now
    captured = capsys.readouterr()
    assert "cached" in captured.err and json.loads(captured.out)["grid"] == [1, 4, 10]
    missing = ["profile-sps", "--target", str(tmp_path / "no"), "--device", "cpu", "--out", out]
    assert cli_main(missing) == 2


@pytest.mark.cuda
def test_profile_on_cuda(tmp_path):
    """The GPU path: each size captured in its own CUDA graph and replayed; the runner keeps
    no graph of its own and gets its setting back."""
    if not dspark.cuda_available():
        pytest.skip("needs a GPU")
    r = ModelRunner(load_model(os.path.join(DEMO_MODELS, "target"), "cuda", torch.bfloat16))
    table = scheduler.profile_sps(r, 40, gamma=7, context=64, grid=[1, 8, 9, 33], reps=5,
                                  cache_dir=str(tmp_path))
    assert table.grid == [1, 8, 9, 33, 40] and table.key["device"] == torch.cuda.get_device_name()
    assert all(s > 0 for s in table.sps) and all(a >= b for a, b in zip(table.sps, table.sps[1:]))
    assert r.use_cuda_graphs and not r._graphs
    assert scheduler.load_sps(r, 40, cache_dir=str(tmp_path)) == table


def test_ranking_table_spreads_bucket_edges():
    """Step tables (a bucketed engine pays the next captured size) are ranked with time linear
    between the ends of their constant runs; other tables are ranked as they are."""
    step = scheduler.table_from_measurements([3, 7, 15], [1.0, 2.0, 4.0], 15, "step")
    rank = [1 / s for s in scheduler.ranking_table(step)]
    assert rank[:3] == [1.0] * 3 and rank[6] == 2.0 and rank[14] == 4.0
    assert rank[3] == pytest.approx(1.25) and rank[7] == pytest.approx(2.25)
    assert all(a < b for a, b in zip(rank[2:], rank[3:]))
    smooth = [1 / (1 + 0.1 * b) for b in range(1, 50)]
    assert scheduler.ranking_table(smooth) == pytest.approx(smooth)
    assert scheduler.ranking_table([2.0] * 9) == [2.0] * 9
    # Algorithm 1 on the step table stops at the first bucket edge; ranked with the spread
    # table it admits the drafts the bucket's room pays for (8 requests, gamma 7, c = 0.8; a
    # table shaped like the benchmark pair's: flat to 7 tokens, then +25-60 % per bucket)
    grid, secs = [7, 15, 31, 63], [1.0, 1.25, 1.6, 2.5]
    table = scheduler.table_from_measurements(grid, secs, 63, "step")
    conf = torch.full((8, 7), 0.8)
    lengths = torch.full((8,), 7)
    raw = dspark.ops.schedule_prefix(conf, lengths, torch.tensor(table), "sync")
    ranked = dspark.ops.schedule_prefix(conf, lengths, torch.tensor(
        scheduler.ranking_table(table)), "sync")
    assert int(raw.sum()) < int(ranked.sum())
