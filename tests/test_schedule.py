"""dspark::schedule_prefix and dspark::schedule_budget against dspark.reference (every mode;
ragged lengths; ties within and across requests; flat, steep, jagged and short SPS tables;
R = 0, 1 and up to the 16384-candidate limit; gamma = 0, 1 and 32), the scheduler's behaviour
(load -> shorter verifies, a flat table -> every draft, the table's end, budget >= sync),
opcheck, torch.compile, CUDA-graph replay, empty batches and bad input."""
import pytest
import torch

import dspark
from dspark import reference as ref
from dspark.timing import capture_graph

MODES = ("sync", "async", "threshold", "fixed")


def random_confidences(R, gamma, gen, kind):
    """[R, gamma] f32 in [0, 1]. "uniform"; "high" (c near 1: long admitted prefixes); "ties"
    (multiples of 1/4 and repeated rows: equal survivals within and across requests); "edges"
    (exact 0 and 1 mixed in, and a few c so small that a < 2^-44)."""
    if kind == "uniform":
        c = torch.rand(R, gamma, generator=gen)
    elif kind == "high":
        c = 1 - 0.3 * torch.rand(R, gamma, generator=gen) ** 2
    elif kind == "ties":
        c = torch.randint(0, 5, (R, gamma), generator=gen) / 4.0
        if R > 1:
            rows = torch.randint(0, R, (R,), generator=gen)
            c = torch.where(torch.rand(R, 1, generator=gen) < 0.5, c[rows], c)
    else:
        c = torch.rand(R, gamma, generator=gen)
        pick = torch.rand(R, gamma, generator=gen)
        c = torch.where(pick < 0.15, 0.0, torch.where(pick < 0.3, 1.0, c))
        c = torch.where(pick > 0.97, 1e-9, c)
    return c.float().contiguous()


def random_lengths(R, gamma, gen):
    """[R] i64 in [0, gamma], often at the edges."""
    lengths = torch.randint(0, gamma + 1, (R,), generator=gen)
    edge = torch.rand(R, generator=gen)
    return torch.where(edge < 0.2, gamma, torch.where(edge < 0.3, 0, lengths))


def sps_table(kind, Bmax, gen):
    """[Bmax] f32 > 0, steps/s of a B-token verify: "flat"; "linear" (time t0 + t1 B, the usual
    memory- then compute-bound shape); "steep" (1/B); "jagged" (linear with tile-quantisation
    steps and noise, not monotone)."""
    B = torch.arange(1, Bmax + 1, dtype=torch.float64)
    if kind == "flat":
        s = torch.full_like(B, 50.0)
    elif kind == "linear":
        s = 1e3 / (10 + 0.05 * B)
    elif kind == "steep":
        s = 1e3 / B
    else:
        s = 1e3 / (10 + 0.4 * torch.ceil(B / 16) + 0.02 * B)
        s = s * (1 + 0.05 * torch.rand(Bmax, generator=gen, dtype=torch.float64))
    return s.float()


def case(R, gamma, gen, conf_kind, sps_kind, bmax=None):
    c = random_confidences(R, gamma, gen, conf_kind)
    lengths = random_lengths(R, gamma, gen)
    Bmax = bmax if bmax is not None else max(1, R * (gamma + 1))
    return c, lengths, sps_table(sps_kind, Bmax, gen)


def run_both(device, c, lengths, sps, mode, threshold=0.0, budget=None):
    """The op on device and the reference (CPU): both results on CPU."""
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = torch.ops.dspark.schedule_prefix(dev(c), dev(lengths), dev(sps), mode, threshold,
                                           dev(budget))
    want = ref.schedule_prefix(c, lengths, sps, mode, threshold, budget)
    assert got.dtype == torch.long and got.shape == (c.shape[0],) and got.device.type == device
    return got.cpu(), want


def check_lengths(got, lengths):
    assert (got >= 0).all() and (got <= lengths).all(), (got, lengths)


# ---- reference equality --------------------------------------------------------------------------
SIZES = [(0, 7), (1, 1), (1, 7), (2, 2), (3, 5), (16, 7), (64, 7), (100, 16), (256, 7), (33, 32),
         (1000, 16), (16384, 1)]


@pytest.mark.parametrize("R,gamma", SIZES)
@pytest.mark.parametrize("conf_kind", ["uniform", "high", "ties", "edges"])
def test_matches_reference(device, gen, R, gamma, conf_kind):
    trials = 1 if R * gamma > 4000 else 3
    for trial in range(trials):
        for sps_kind in ("flat", "linear", "steep", "jagged"):
            # the full table, one that ends inside the path, one shorter than R
            for bmax in (None, R + (R * gamma) // 3 + 1, max(1, R // 2)):
                c, lengths, sps = case(R, gamma, gen, conf_kind, sps_kind, bmax)
                got, want = run_both(device, c, lengths, sps, "sync")
                assert torch.equal(got, want), f"sync {sps_kind} Bmax {sps.numel()} trial {trial}"
                check_lengths(got, lengths)
                k = torch.ops.dspark.schedule_budget(c.to(device), lengths.to(device),
                                                     sps.to(device))
                assert k.shape == () and k.dtype == torch.long
                assert k.item() == ref.schedule_budget(c, lengths, sps).item(), sps_kind
        M = len(ref.ranked_candidates(c, lengths))
        for budget in (0, 1, M // 2, M, M + 3, -2, int(torch.randint(0, M + 1, (), generator=gen))):
            got, want = run_both(device, c, lengths, None, "async", budget=torch.tensor(budget))
            assert torch.equal(got, want), f"async budget {budget}"
            assert got.sum().item() == min(max(budget, 0), M)
        for threshold in (0.0, 0.3, 0.5, float(torch.rand((), generator=gen)), 1.0):
            got, want = run_both(device, c, lengths, sps, "threshold", threshold)
            assert torch.equal(got, want), f"threshold {threshold}"
        got, want = run_both(device, c, lengths, sps, "fixed")
        assert torch.equal(got, lengths) and torch.equal(want, lengths)


def test_docstring_example(device):
    c = torch.tensor([[0.9, 0.9, 0.5], [0.6, 0.5, 0.9]], device=device)
    lengths = torch.tensor([3, 3], device=device)
    sps = torch.tensor([100., 99., 98., 97., 96., 60., 50., 40.], device=device)
    # a: 0.9, 0.81, 0.405 | 0.6, 0.3, 0.27. Theta: 2*99 < 2.9*98 < 3.71*97 < 4.31*96, then
    # 4.715*60 falls: 0.9, 0.81 and 0.6 are admitted
    assert dspark.ops.schedule_prefix(c, lengths, sps).tolist() == [2, 1]
    assert dspark.ops.schedule_budget(c, lengths, sps).item() == 3
    assert dspark.ops.schedule_prefix(c, lengths, mode="threshold", threshold=0.55).tolist() == \
        [2, 1]
    assert dspark.ops.schedule_prefix(c, lengths, mode="fixed").tolist() == [3, 3]


def test_ties_rank_smaller_position_then_smaller_request(device):
    """Equal survivals: (r = 1, j = 0) before (r = 0, j = 1); equal rows: request 0 first. The
    table pays for exactly one more token (Theta rises once, then falls)."""
    sps = torch.tensor([10.0, 9.0, 8.0, 2.0], device=device)  # B = 2 anchors: 2*9 < 2.5*8 > ...
    c = torch.tensor([[1.0, 0.5], [0.5, 0.5]], device=device)
    lengths = torch.tensor([2, 2], device=device)
    # ranked: (0,0) a=1, then a=0.5: (1,0) [j=0] before (0,1) [j=1]; Theta: 2*9=18, 3*8=24, then
    # B = 4: 3.5*2 = 7 stops
    assert dspark.ops.schedule_prefix(c, lengths, sps).tolist() == [1, 0]
    same = torch.tensor([[0.5, 0.5], [0.5, 0.5]], device=device)
    sps = torch.tensor([10.0, 9.0, 8.0, 1.0], device=device)  # 2*9 < 2.5*8, then 3*1
    assert dspark.ops.schedule_prefix(same, lengths, sps).tolist() == [1, 0]
    K = torch.tensor(3, device=device)
    assert dspark.ops.schedule_prefix(same, lengths, mode="async", budget=K).tolist() == [2, 1]


def test_entries_past_the_draft_length_are_never_read(device, gen):
    c, lengths, sps = case(40, 7, gen, "uniform", "linear")
    past = torch.arange(7)[None, :] >= lengths[:, None]
    poisoned = torch.where(past, float("nan"), c)
    K = torch.tensor(50)
    for mode in MODES:
        a, _ = run_both(device, c, lengths, sps, mode, 0.4, K)
        b, _ = run_both(device, poisoned, lengths, sps, mode, 0.4, K)
        assert torch.equal(a, b), mode


# ---- behaviour -----------------------------------------------------------------------------------
def test_more_load_gives_shorter_verifies(device, gen):
    """time(B) = 10 ms + 0.05 ms * B: one request verifies (nearly) everything, 256 requests
    only their most likely drafts."""
    sps = sps_table("linear", 256 * 8, gen).to(device)
    means = []
    for R in (1, 4, 16, 64, 256):
        c = (1 - 0.5 * torch.rand(R, 7, generator=gen)).float()
        lengths = torch.full((R,), 7)
        got = dspark.ops.schedule_prefix(c.to(device), lengths.to(device), sps).cpu()
        means.append(got.double().mean().item())
    assert all(a >= b for a, b in zip(means, means[1:])), means
    assert means[0] >= 6 and means[-1] <= 3, means


@pytest.mark.parametrize("R,gamma", [(1, 7), (64, 7), (300, 16)])
def test_flat_table_admits_every_draft(device, gen, R, gamma):
    """Constant SPS: any a > 0 raises tau, so every draft is verified (c >= 0.01 keeps a > 2^-44)
    -- up to the end of the table."""
    c = (0.01 + 0.99 * torch.rand(R, gamma, generator=gen)).float()
    lengths = random_lengths(R, gamma, gen)
    flat = torch.full((R * (gamma + 1),), 7.0)
    got, _ = run_both(device, c, lengths, flat, "sync")
    assert torch.equal(got, lengths)
    assert torch.ops.dspark.schedule_budget(c.to(device), lengths.to(device),
                                            flat.to(device)).item() == lengths.sum().item()
    short = flat[:R + 5]  # B may grow by 5 only
    got, want = run_both(device, c, lengths, short, "sync")
    assert torch.equal(got, want) and got.sum().item() == min(5, lengths.sum().item())
    got, _ = run_both(device, c, lengths, flat[:max(R - 1, 1)], "sync")  # R > Bmax: anchors only
    assert got.sum().item() == 0


def test_budget_is_at_least_the_sync_total(device, gen):
    """Theta rises strictly up to the sync stop, so the first argmax over the whole path lies at
    or after it."""
    for _ in range(20):
        c, lengths, sps = case(50, 7, gen, "uniform", "jagged")
        sync = dspark.ops.schedule_prefix(c.to(device), lengths.to(device), sps.to(device))
        K = dspark.ops.schedule_budget(c.to(device), lengths.to(device), sps.to(device))
        assert K.item() >= sync.sum().item()


@pytest.mark.parametrize("gamma", [0, 4])
def test_empty_batch(device, gamma):
    c = torch.zeros(0, gamma, device=device)
    lengths = torch.zeros(0, dtype=torch.long, device=device)
    sps = torch.ones(3, device=device)
    K = torch.tensor(2, device=device)
    for mode in MODES:
        out = dspark.ops.schedule_prefix(c, lengths, sps, mode, budget=K)
        assert out.shape == (0,) and out.dtype == torch.long and out.device.type == device
    assert dspark.ops.schedule_budget(c, lengths, sps).item() == 0


def test_no_drafts(device):
    """gamma = 0 (or every length 0): nothing to admit, whatever the mode."""
    c = torch.zeros(5, 0, device=device)
    lengths = torch.zeros(5, dtype=torch.long, device=device)
    sps = torch.ones(40, device=device)
    K = torch.tensor(9, device=device)
    for mode in MODES:
        out = dspark.ops.schedule_prefix(c, lengths, sps, mode, budget=K)
        assert out.tolist() == [0] * 5
    assert dspark.ops.schedule_budget(c, lengths, sps).item() == 0


# ---- opcheck, torch.compile, CUDA graphs ---------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_schedule_prefix(device, gen, mode):
    c, lengths, sps = case(12, 5, gen, "uniform", "linear")
    args = (c.to(device), lengths.to(device), sps.to(device), mode, 0.3,
            torch.tensor(20, device=device))
    torch.library.opcheck(torch.ops.dspark.schedule_prefix.default, args)


def test_opcheck_schedule_budget(device, gen):
    c, lengths, sps = case(12, 5, gen, "uniform", "jagged")
    torch.library.opcheck(torch.ops.dspark.schedule_budget.default,
                          (c.to(device), lengths.to(device), sps.to(device)))


def plan(stale_c, stale_lengths, c, lengths, sps):
    """A step's scheduling: the async budget from stale confidences, then every mode."""
    K = dspark.ops.schedule_budget(stale_c, stale_lengths, sps)
    return torch.stack([dspark.ops.schedule_prefix(c, lengths, sps, "sync"),
                        dspark.ops.schedule_prefix(c, lengths, None, "async", budget=K),
                        dspark.ops.schedule_prefix(c, lengths, None, "threshold", 0.6),
                        dspark.ops.schedule_prefix(c, lengths, None, "fixed")]), K


def plan_inputs(gen, count, R=64, gamma=7):
    out = []
    for _ in range(count):
        stale_c, stale_l, sps = case(R, gamma, gen, "high", "jagged")
        c, lengths, _ = case(R, gamma, gen, "high", "jagged")
        out.append((stale_c, stale_l, c, lengths, sps))
    return out


def test_compile_fullgraph_equals_eager(device, gen):
    torch._dynamo.reset()
    compiled = torch.compile(plan, fullgraph=True)
    for inputs in plan_inputs(gen, 2):
        inputs = [t.to(device) for t in inputs]
        eager, comp = plan(*inputs), compiled(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(eager, comp))


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager(device, gen):
    """Both ops capture into one CUDA graph (no host sync) and replays over new values copied
    into the captured buffers equal eager calls and the reference."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    inputs = plan_inputs(gen, 4, R=256)
    static = [t.clone().cuda() for t in inputs[0]]
    graph, (lengths, K) = capture_graph(lambda: plan(*static))
    for inp in inputs:
        for dst, src in zip(static, inp):
            dst.copy_(src)
        graph.replay()
        want_lengths, want_K = plan(*[t.cuda() for t in inp])
        torch.cuda.synchronize()
        assert torch.equal(lengths, want_lengths) and torch.equal(K, want_K)
        stale_c, stale_l, c, cur_l, sps = inp
        assert K.item() == ref.schedule_budget(stale_c, stale_l, sps).item()
        assert torch.equal(lengths[0].cpu(), ref.schedule_prefix(c, cur_l, sps, "sync"))


# ---- bad input -----------------------------------------------------------------------------------
I64 = dict(dtype=torch.long)


def bad_cases():
    c = torch.tensor([[0.9, 0.5, 0.2], [0.4, 0.8, 1.0]])
    base = dict(confidences=c, draft_lengths=torch.tensor([3, 2]), sps=torch.ones(8), mode="sync",
                threshold=0.0, budget=None)
    nan = float("nan")
    return base, {
        "confidences_f64": (dict(confidences=c.double()), "confidences must have dtype Float"),
        "confidences_1d": (dict(confidences=c[0]), "confidences must be a 2-D"),
        "confidences_strided": (dict(confidences=c.t().contiguous().t()),
                                "confidences must be contiguous"),
        "gamma_too_large": (dict(confidences=torch.zeros(2, 33)), "at most 32 columns"),
        "too_many_candidates": (dict(confidences=torch.zeros(2049, 8),
                                     draft_lengths=torch.zeros(2049, **I64)),
                                "at most R \\* gamma = 16384"),
        "too_many_requests": (dict(confidences=torch.zeros(16385, 0),
                                   draft_lengths=torch.zeros(16385, **I64)), "at most 16384 rows"),
        "draft_lengths_i32": (dict(draft_lengths=torch.tensor([3, 2]).int()),
                              "draft_lengths must have dtype Long"),
        "draft_lengths_size": (dict(draft_lengths=torch.tensor([3])),
                               "draft_lengths must have size 2"),
        "draft_lengths_2d": (dict(draft_lengths=torch.tensor([[3, 2]])),
                             "draft_lengths must be a 1-D"),
        "sps_f64": (dict(sps=torch.ones(8, dtype=torch.float64)), "sps must have dtype Float"),
        "sps_2d": (dict(sps=torch.ones(2, 4)), "sps must be a 1-D"),
        "sps_empty": (dict(sps=torch.ones(0)), "sps must have at least one entry"),
        "sps_missing": (dict(sps=None), "sps .* is required in sync mode"),
        "mode": (dict(mode="greedy"), "mode must be one of 'sync', 'async', 'threshold', "
                                      "'fixed', got 'greedy'"),
        "threshold_above_1": (dict(mode="threshold", threshold=1.5), "threshold must lie in"),
        "threshold_negative": (dict(threshold=-0.1), "threshold must lie in"),
        "threshold_nan": (dict(mode="threshold", threshold=nan), "threshold must lie in"),
        "budget_missing": (dict(mode="async"), "budget .* is required in async mode"),
        "budget_1d": (dict(mode="async", budget=torch.tensor([3])), "budget must be a 0-D"),
        "budget_f32": (dict(mode="async", budget=torch.tensor(3.0)), "budget must have dtype"),
        # data: the CPU raises; CUDA reads the status word back
        "confidence_above_1": (dict(confidences=torch.tensor([[0.9, 1.01, 0.2], [0.4, 0.8, 1.0]])),
                               r"confidences must lie in \[0, 1\]"),
        "confidence_negative": (dict(confidences=torch.tensor([[0.9, 0.5, 0.2], [-0.1, 0.8, 1]])),
                                r"confidences must lie in \[0, 1\]"),
        "confidence_nan": (dict(confidences=torch.tensor([[0.9, 0.5, nan], [0.4, 0.8, 1.0]])),
                           r"confidences must lie in \[0, 1\]"),
        "draft_length_above_gamma": (dict(draft_lengths=torch.tensor([3, 4])),
                                     r"draft_lengths must lie in \[0, gamma\]"),
        "draft_length_negative": (dict(draft_lengths=torch.tensor([-1, 2])),
                                  r"draft_lengths must lie in \[0, gamma\]"),
        "sps_zero": (dict(sps=torch.tensor([1.0, 0.0, 1.0])), "sps entries must be finite and > 0"),
        "sps_nan": (dict(sps=torch.tensor([1.0, nan])), "sps entries must be finite and > 0"),
        "sps_inf": (dict(sps=torch.tensor([float("inf")])), "sps entries must be finite and > 0"),
        "sps_negative_threshold_mode": (dict(mode="threshold", sps=torch.tensor([-1.0])),
                                        "sps entries must be finite and > 0"),
    }


def to_device(v, device):
    if not isinstance(v, torch.Tensor):
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).copy_(v)


@pytest.mark.parametrize("case_name", list(bad_cases()[1]))
def test_schedule_prefix_bad_input(device, case_name):
    base, cases = bad_cases()
    change, message = cases[case_name]
    args = {k: to_device(v, device) for k, v in {**base, **change}.items()}
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.dspark.schedule_prefix(*args.values())


@pytest.mark.parametrize("case_name", ["confidences_f64", "draft_lengths_size", "sps_empty",
                                       "confidence_nan", "draft_length_above_gamma", "sps_zero"])
def test_schedule_budget_bad_input(device, case_name):
    base, cases = bad_cases()
    change, message = cases[case_name]
    args = {k: to_device(v, device) for k, v in {**base, **change}.items()}
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.dspark.schedule_budget(args["confidences"], args["draft_lengths"], args["sps"])


@pytest.mark.cuda
def test_cuda_without_read_back_stays_in_bounds(device, gen):
    """With sync checks off, a request with a bad length or confidence has no candidates and
    length 0 (the others are scheduled as if its length were 0); a bad table gives sync lengths
    and a budget of 0."""
    if device != "cuda":
        pytest.skip("needs a GPU")
    c, lengths, sps = case(32, 7, gen, "high", "linear")
    bad_c, bad_l = c.clone(), lengths.clone()
    bad_c[3, 0] = float("nan")
    bad_l[5] = 9
    lengths[3] = max(int(lengths[3]), 1)
    bad_l[3] = lengths[3]
    fixed = lengths.clone()
    fixed[3] = fixed[5] = 0
    K = torch.tensor(40)
    with dspark.ops.sync_checks(False):
        for mode in MODES:
            got = dspark.ops.schedule_prefix(bad_c.cuda(), bad_l.cuda(), sps.cuda(), mode, 0.5,
                                             K.cuda()).cpu()
            want = ref.schedule_prefix(c, fixed, sps, mode, 0.5, K)
            assert torch.equal(got, want), mode
        bad_sps = sps.clone()
        bad_sps[10] = -1.0
        got = dspark.ops.schedule_prefix(c.cuda(), lengths.cuda(), bad_sps.cuda())
        assert got.tolist() == [0] * 32
        assert dspark.ops.schedule_budget(c.cuda(), lengths.cuda(), bad_sps.cuda()).item() == 0


@pytest.mark.cuda
def test_device_mismatch(device):
    if device != "cuda":
        pytest.skip("needs two devices")
    c = torch.rand(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="draft_lengths must be on cuda"):
        torch.ops.dspark.schedule_prefix(c, torch.tensor([1, 2]), None, "fixed")
    with pytest.raises(RuntimeError, match="sps must be on cuda"):
        torch.ops.dspark.schedule_budget(c, torch.tensor([1, 2], device="cuda"), torch.ones(4))


@pytest.mark.cuda
@pytest.mark.parametrize("sort", ["auto", "registers", "group"])
@pytest.mark.parametrize("threads", ["32", "64", "256", "1024"])
def test_cuda_block_size_changes_nothing(device, gen, monkeypatch, threads, sort):
    """DSPARK_SCHEDULE_THREADS / DSPARK_SCHEDULE_SORT (the A/B switches of bench_schedule.py
    --threads / --sorts): the same lengths and budgets as the reference for every block size
    and either sort, key counts 64 to 16384."""
    if device != "cuda":
        pytest.skip("the block size is a CUDA launch parameter")
    monkeypatch.setenv("DSPARK_SCHEDULE_THREADS", threads)
    monkeypatch.setenv("DSPARK_SCHEDULE_SORT", sort)
    for R, gamma in [(1, 7), (64, 7), (256, 7), (1000, 16), (16384, 1)]:
        c, lengths, sps = case(R, gamma, gen, "ties", "jagged")
        got, want = run_both(device, c, lengths, sps, "sync")
        assert torch.equal(got, want), (R, gamma)
        M = len(ref.ranked_candidates(c, lengths))
        budget = torch.tensor(M // 3)
        got, want = run_both(device, c, lengths, None, "async", budget=budget)
        assert torch.equal(got, want), (R, gamma)
        k = torch.ops.dspark.schedule_budget(c.cuda(), lengths.cuda(), sps.cuda())
        assert k.item() == ref.schedule_budget(c, lengths, sps).item(), (R, gamma)


@pytest.mark.cuda
def test_cuda_bad_sort_is_named(device, monkeypatch):
    if device != "cuda":
        pytest.skip("the sort is a CUDA kernel choice")
    monkeypatch.setenv("DSPARK_SCHEDULE_SORT", "quick")
    c, lengths = torch.rand(2, 3, device="cuda"), torch.tensor([3, 3], device="cuda")
    with pytest.raises(ValueError,
                       match="DSPARK_SCHEDULE_SORT must be 'auto', 'registers' or 'group'"):
        torch.ops.dspark.schedule_prefix(c, lengths, torch.ones(8, device="cuda"), "sync")


@pytest.mark.cuda
@pytest.mark.parametrize("bad", ["16", "48", "2048", "x", "64k"])
def test_cuda_bad_block_size_is_named(device, monkeypatch, bad):
    if device != "cuda":
        pytest.skip("the block size is a CUDA launch parameter")
    monkeypatch.setenv("DSPARK_SCHEDULE_THREADS", bad)
    c, lengths = torch.rand(2, 3, device="cuda"), torch.tensor([3, 3], device="cuda")
    with pytest.raises(ValueError, match="DSPARK_SCHEDULE_THREADS must be a power of two"):
        torch.ops.dspark.schedule_prefix(c, lengths, torch.ones(8, device="cuda"), "sync")
