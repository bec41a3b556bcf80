"""dspark::commit_tokens and dspark::ngram_propose against dspark.reference (random states with
inactive requests, stop tokens in and out of the kept prefix, max_new reached exactly, round-log
overflow; periodic contexts so n-grams match at every size, n near 1 and near C), opcheck,
torch.compile, CUDA-graph replay, empty batches and bad input."""
import pytest
import torch

import dspark
from dspark import reference as ref
from dspark.timing import capture_graph

COMMIT = ["tokens", "n_tokens", "active", "out_tokens", "accept_count", "stop_tokens",
          "prompt_lens", "max_new", "round_active", "round_accepts", "rounds", "any_active"]
I64 = dict(dtype=torch.long)


def randint(lo, hi, shape, gen):
    return torch.randint(lo, hi, shape, generator=gen)


def commit_args(B, C, W, S, R, gen, V=12):
    """A valid commit: out_tokens as verify returns them (accepted drafts + bonus, -1 padded, at
    times garbage past the prefix) and, for active requests, n_tokens <= max(C - W, C - add - 1):
    no two writes of the reference's scatter meet on the clamped slot C - 1 with different
    values (where they would, its order is unspecified)."""
    active = torch.rand(B, generator=gen) < 0.75
    accept = randint(0, W, (B,), gen)
    add = torch.where(active, accept + 1, 0)
    bound = torch.maximum(torch.full((B,), C - W), C - add - 1).clamp(min=0)
    near_end = torch.rand(B, generator=gen) < 0.3  # n right at the bound
    n = torch.where(near_end, bound, (torch.rand(B, generator=gen) * (bound + 1)).long())
    n = torch.where(active, n, randint(0, C + 3, (B,), gen))  # inactive: never written
    out = randint(0, V, (B, W), gen)
    pad = torch.arange(W)[None, :] > accept[:, None]
    garbage = torch.rand(B, generator=gen) < 0.2
    out = torch.where(pad & ~garbage[:, None], -1, out)
    stops = torch.where(torch.rand(B, S, generator=gen) < 0.3, -1, randint(0, V, (B, S), gen))
    prompt = (torch.rand(B, generator=gen) * (n + 1)).long()
    # max_new: reached exactly by this commit, one more, or random (also already exceeded)
    kind = randint(0, 3, (B,), gen)
    max_new = torch.where(kind == 0, n + add - prompt, torch.where(kind == 1, n + add - prompt + 1,
                                                                   randint(0, C + 2, (B,), gen)))
    return dict(tokens=randint(0, V, (B, C), gen), n_tokens=n, active=active, out_tokens=out,
                accept_count=accept, stop_tokens=stops, prompt_lens=prompt, max_new=max_new,
                round_active=torch.rand(R, B, generator=gen) < 0.5,
                round_accepts=randint(-1, W, (R, B), gen),
                rounds=torch.tensor(int(randint(0, R + 3, (), gen))),
                any_active=torch.tensor(bool(torch.rand((), generator=gen) < 0.5)))


def run_commit(args, device):
    """The op on a copy on device and the reference on a CPU copy: both final states (CPU)."""
    got = {k: v.clone().to(device) for k, v in args.items()}
    want = {k: v.clone() for k, v in args.items()}
    torch.ops.dspark.commit_tokens(*[got[k] for k in COMMIT])
    ref.commit_tokens(*[want[k] for k in COMMIT])
    return {k: v.cpu() for k, v in got.items()}, want


def assert_same_state(got, want, what=""):
    for k in COMMIT:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), \
            f"{what} {k}:\nkernel    {got[k].tolist()}\nreference {want[k].tolist()}"


# ---- commit_tokens: reference equality -----------------------------------------------------------
@pytest.mark.parametrize("B,C,W,S,R", [(1, 1, 1, 1, 1), (1, 9, 4, 0, 2), (3, 8, 8, 2, 3),
                                       (7, 40, 5, 3, 4), (33, 64, 8, 4, 16), (130, 300, 6, 5, 9),
                                       (1100, 20, 3, 2, 5)])  # B > 1024: threads stride
def test_commit_matches_reference(device, gen, B, C, W, S, R):
    for trial in range(6):
        got, want = run_commit(commit_args(B, C, W, S, R, gen), device)
        assert_same_state(got, want, f"trial {trial}")


def test_commit_edge_cases(device):
    """Stop token at the bonus / past the prefix / -1 padding never kept; max_new exact."""
    args = dict(tokens=torch.zeros(4, 8, **I64), n_tokens=torch.tensor([2, 3, 1, 5]),
                active=torch.tensor([True, True, True, False]),
                out_tokens=torch.tensor([[4, 9, -1], [4, 5, 9], [6, 7, 8], [9, 9, 9]]),
                accept_count=torch.tensor([1, 0, 2, 2]),
                stop_tokens=torch.tensor([[9, -1], [9, -1], [-1, -1], [9, 9]]),
                prompt_lens=torch.tensor([1, 1, 1, 1]), max_new=torch.tensor([10, 10, 3, 10]),
                round_active=torch.zeros(2, 4, dtype=torch.bool),
                round_accepts=torch.zeros(2, 4, **I64), rounds=torch.tensor(5),
                any_active=torch.tensor(True))
    got, want = run_commit(args, device)
    assert_same_state(got, want)
    assert got["active"].tolist() == [False, True, False, False]  # stop, no stop, max_new, off
    assert got["n_tokens"].tolist() == [4, 4, 4, 5]
    assert got["tokens"][0, 2:4].tolist() == [4, 9] and got["tokens"][1, 3:5].tolist() == [4, 0]
    assert got["rounds"].item() == 6 and got["any_active"].item()
    assert got["round_active"][1].tolist() == [True, True, True, False]  # row Rmax - 1


@pytest.mark.parametrize("accept", [-7, -1, 3, 4, 50])
def test_commit_clamps_out_of_range_counts(device, accept):
    """accept_count outside [0, W - 1] (never from verify): add = clamp(accept + 1, 0, W)."""
    args = commit_args(5, 20, 4, 2, 3, torch.Generator().manual_seed(accept + 100))
    args["active"][:] = True
    args["n_tokens"] = args["n_tokens"].clamp(max=20 - 4)
    args["accept_count"][1::2] = accept
    got, want = run_commit(args, device)
    assert_same_state(got, want)
    add = min(max(accept + 1, 0), 4)
    assert torch.equal(got["n_tokens"][1::2], args["n_tokens"][1::2] + add)


def test_commit_colliding_slots_last_write_wins(device, gen):
    """C < W: several kept tokens clamp onto slot C - 1 (the engine sizes C so this never
    happens): no crash; the op writes in increasing k, so the last kept token stays."""
    args = commit_args(6, 3, 5, 2, 2, gen)
    args["active"][:] = True
    args["accept_count"] = torch.tensor([4, 3, 2, 1, 0, 4])
    args["n_tokens"] = torch.tensor([0, 1, 2, 3, 1, 2])
    got, want = run_commit(args, device)
    for k in COMMIT[1:]:
        assert torch.equal(got[k], want[k]), k
    ends = args["n_tokens"] + args["accept_count"]  # slot of the last kept token, unclamped
    for b in range(6):
        last = int(args["out_tokens"][b, args["accept_count"][b]])
        assert got["tokens"][b, -1] == (last if ends[b] >= 2 else args["tokens"][b, -1])
        assert torch.equal(got["tokens"][b, :-1], want["tokens"][b, :-1])


def test_commit_empty_batch(device):
    args = commit_args(0, 4, 2, 1, 3, torch.Generator().manual_seed(0))
    got, want = run_commit(args, device)
    assert_same_state(got, want)
    assert not got["any_active"].item()


# ---- ngram_propose: reference equality -----------------------------------------------------------
def periodic_tokens(B, C, gen, V=6):
    """Rows that repeat a random pattern (period 1..7) with some noise: matches at many sizes."""
    period = randint(1, 8, (B, 1), gen)
    pattern = randint(0, V, (B, 8), gen)
    rows = pattern.gather(1, torch.arange(C)[None, :] % period)
    noise = torch.rand(B, C, generator=gen) < 0.15
    return torch.where(noise, randint(0, V, (B, C), gen), rows)


def random_n(B, C, gen):
    """n_tokens in [1, C], often at the edges (1, 2, C - 1, C)."""
    edge = torch.tensor([1, 2, C - 1, C]).clamp(1, C)[randint(0, 4, (B,), gen)]
    return torch.where(torch.rand(B, generator=gen) < 0.4, edge, randint(1, C + 1, (B,), gen))


NGRAM_CONFIGS = [(1, 1, 1), (4, 3, 1), (5, 4, 2), (2, 5, 5), (13, 3, 1), (3, 40, 1), (6, 2, 2)]


@pytest.mark.parametrize("B,C", [(1, 1), (1, 2), (3, 3), (5, 5), (7, 17), (33, 64), (9, 300),
                                 (2, 1000)])
@pytest.mark.parametrize("gamma,max_ngram,min_ngram", NGRAM_CONFIGS)
def test_ngram_matches_reference(device, gen, B, C, gamma, max_ngram, min_ngram):
    for trial in range(3):
        tokens, n = periodic_tokens(B, C, gen, V=2 + trial * 3), random_n(B, C, gen)
        want = ref.ngram_propose(tokens, n, gamma, max_ngram, min_ngram)
        got = torch.ops.dspark.ngram_propose(tokens.to(device), n.to(device), gamma, max_ngram,
                                             min_ngram)
        assert got.shape == (B, gamma + 1) and got.dtype == torch.long
        assert torch.equal(got.cpu(), want), f"trial {trial}: n {n.tolist()}\n{got}\n{want}"


def test_ngram_never_reads_past_the_context(device, gen):
    """Tokens at and beyond n_tokens (garbage in a real state) change nothing."""
    tokens, n = periodic_tokens(16, 50, gen), random_n(16, 50, gen)
    first = torch.ops.dspark.ngram_propose(tokens.to(device), n.to(device), 6, 4, 1)
    past = torch.arange(50)[None, :] >= n[:, None]
    for fill in (torch.full_like(tokens, 7), randint(0, 6, tokens.shape, gen)):
        again = torch.ops.dspark.ngram_propose(torch.where(past, fill, tokens).to(device),
                                               n.to(device), 6, 4, 1)
        assert torch.equal(first, again)


def test_ngram_examples(device):
    """The longest suffix wins; its most recent occurrence; continuation wraps periodically."""
    t = torch.tensor([[5, 6, 7, 5, 6, 0, 0], [1, 2, 3, 9, 2, 3, 4], [1, 2, 1, 2, 1, 2, 8]])
    got = dspark.ops.ngram_propose(t.to(device), torch.tensor([5, 6, 6], device=device), 4)
    assert got.tolist() == [[6, 7, 5, 6, 7],   # "5 6" at 0 -> 7 5 6, then 7 again
                            [3, 9, 2, 3, 9],   # "2 3" twice: the later one (4) is the suffix itself
                            [2, 1, 2, 1, 2]]   # "2 1 2" at 1 (most recent) -> 1 2, period 2


def test_ngram_longest_match_far_back(device, gen):
    """Shorter matches near the anchor lose to the longest one at the start of a long context
    (several CUDA chunks away); a max_ngram far beyond C acts as C - 1."""
    C = 1500
    row = randint(0, 6, (C,), gen)
    row[:4] = torch.tensor([7, 8, 9, 42])
    row[C - 3:] = torch.tensor([7, 8, 9])
    row[C - 10] = 9
    tokens = torch.stack([row, row])
    n = torch.tensor([C, C - 1])  # the second one's suffix is "7 8": also only at the start
    got = dspark.ops.ngram_propose(tokens.to(device), n.to(device), 3, max_ngram=10**12)
    assert got.cpu().tolist() == [[9, 42, int(row[4]), int(row[5])], [8, 9, 42, int(row[4])]]
    assert torch.equal(got.cpu(), ref.ngram_propose(tokens, n, 3, 10, 1))  # no match beyond 3


def test_ngram_empty_batch(device):
    out = torch.ops.dspark.ngram_propose(torch.zeros(0, 8, **I64, device=device),
                                         torch.zeros(0, **I64, device=device), 3, 3, 1)
    assert out.shape == (0, 4) and out.dtype == torch.long and out.device.type == device


# ---- opcheck, torch.compile, CUDA graphs ---------------------------------------------------------
def test_opcheck_commit_tokens(device, gen):
    args = {k: v.to(device) for k, v in commit_args(5, 16, 4, 2, 3, gen).items()}
    torch.library.opcheck(torch.ops.dspark.commit_tokens.default, tuple(args[k] for k in COMMIT))


@pytest.mark.parametrize("gamma,max_ngram,min_ngram", [(4, 3, 1), (1, 2, 2)])
def test_opcheck_ngram_propose(device, gen, gamma, max_ngram, min_ngram):
    tokens, n = periodic_tokens(5, 24, gen), random_n(5, 24, gen)
    torch.library.opcheck(torch.ops.dspark.ngram_propose.default,
                          (tokens.to(device), n.to(device), gamma, max_ngram, min_ngram))


def step(state, gamma=5):
    """A step's bookkeeping: commit the verified tokens, then draft the next block."""
    dspark.ops.commit_tokens(*[state[k] for k in COMMIT])
    return dspark.ops.ngram_propose(state["tokens"], state["n_tokens"].clamp(1, 64), gamma)


def step_inputs(gen, count):
    """`count` states of one shape (B = 9, C = 64, W = 6) with periodic token rows."""
    out = []
    for _ in range(count):
        a = commit_args(9, 64, 6, 3, 4, gen, V=5)
        a["tokens"] = periodic_tokens(9, 64, gen, V=5)
        a["n_tokens"] = a["n_tokens"].clamp(min=1)
        out.append(a)
    return out


def test_compile_fullgraph_equals_eager(device, gen):
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for a in step_inputs(gen, 2):
        eager = {k: v.clone().to(device) for k, v in a.items()}
        comp = {k: v.clone().to(device) for k, v in a.items()}
        assert torch.equal(step(eager), compiled(comp))
        assert_same_state(comp, eager)


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager(device, gen):
    """Both ops capture into one CUDA graph (no host sync) and replays with new values copied
    into the captured buffers equal eager calls."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    inputs = step_inputs(gen, 4)
    static = {k: v.clone().cuda() for k, v in inputs[0].items()}
    graph, drafts = capture_graph(lambda: step(static),  # warm-up on copies: step mutates
                                  lambda: step({k: v.clone() for k, v in static.items()}))
    for a in inputs:
        for k, v in a.items():
            static[k].copy_(v)
        graph.replay()
        eager = {k: v.clone().cuda() for k, v in a.items()}
        want = step(eager)
        torch.cuda.synchronize()
        assert torch.equal(drafts, want)
        assert_same_state(static, eager)


# ---- bad input -----------------------------------------------------------------------------------
def commit_bad_cases():
    base = commit_args(3, 10, 4, 2, 2, torch.Generator().manual_seed(0))
    b = dict(base)
    cases = {f"{k}_dtype": ({k: b[k].int()}, f"{k} must have dtype") for k in COMMIT}
    cases.update({
        "tokens_1d": (dict(tokens=torch.zeros(3, **I64)), "tokens must be a 2-D"),
        "tokens_no_columns": (dict(tokens=torch.zeros(3, 0, **I64)), "capacity C >= 1"),
        "tokens_strided": (dict(tokens=torch.zeros(10, 3, **I64).t()), "tokens must be contiguous"),
        "n_tokens_len": (dict(n_tokens=torch.zeros(4, **I64)), "n_tokens must have size 3"),
        "active_2d": (dict(active=torch.ones(3, 1, dtype=torch.bool)), "active must be a 1-D"),
        "out_tokens_rows": (dict(out_tokens=torch.zeros(2, 4, **I64)),
                            "out_tokens must have size 3"),
        "out_tokens_no_columns": (dict(out_tokens=torch.zeros(3, 0, **I64)), "W >= 1"),
        "out_tokens_strided": (dict(out_tokens=torch.zeros(4, 3, **I64).t()),
                               "out_tokens must be contiguous"),
        "stop_tokens_rows": (dict(stop_tokens=torch.zeros(4, 2, **I64)),
                             "stop_tokens must have size 3"),
        "max_new_len": (dict(max_new=torch.zeros(2, **I64)), "max_new must have size 3"),
        "round_active_batch": (dict(round_active=torch.zeros(2, 4, dtype=torch.bool)),
                               "round_active must have size 3 in dim 1"),
        "round_active_no_rows": (dict(round_active=torch.zeros(0, 3, dtype=torch.bool),
                                      round_accepts=torch.zeros(0, 3, **I64)), "Rmax >= 1"),
        "round_accepts_rows": (dict(round_accepts=torch.zeros(3, 3, **I64)),
                               r"round_accepts must have shape \[2, 3\]"),
        "rounds_1d": (dict(rounds=torch.zeros(1, **I64)), "rounds must be a 0-D"),
        "any_active_1d": (dict(any_active=torch.zeros(1, dtype=torch.bool)),
                          "any_active must be a 0-D"),
        "n_tokens_negative": (dict(n_tokens=torch.tensor([3, -1, 0])), "n_tokens must be >= 0"),
    })
    return base, cases


@pytest.mark.parametrize("case", list(commit_bad_cases()[1]))
def test_commit_bad_input(device, case):
    base, cases = commit_bad_cases()
    change, message = cases[case]
    args = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).copy_(v)
            for k, v in {**base, **change}.items()}
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.dspark.commit_tokens(*[args[k] for k in COMMIT])
    if device == "cpu":  # the CPU raises before writing anything
        assert_same_state(args, before)


def ngram_bad_cases():
    t, n = torch.zeros(3, 8, **I64), torch.tensor([1, 8, 4])
    base = dict(tokens=t, n_tokens=n, gamma=4, max_ngram=3, min_ngram=1)
    return base, {
        "tokens_i32": (dict(tokens=t.int()), "tokens must have dtype"),
        "tokens_1d": (dict(tokens=t[0]), "tokens must be a 2-D"),
        "tokens_no_columns": (dict(tokens=torch.zeros(3, 0, **I64)), "capacity C >= 1"),
        "tokens_strided": (dict(tokens=torch.zeros(8, 3, **I64).t()), "tokens must be contiguous"),
        "n_tokens_i32": (dict(n_tokens=n.int()), "n_tokens must have dtype"),
        "n_tokens_len": (dict(n_tokens=n[:2]), "n_tokens must have size 3"),
        "gamma": (dict(gamma=0), r"gamma must be in \[1, 4095\]"),
        "gamma_huge": (dict(gamma=2**40), r"gamma must be in \[1, 4095\]"),  # not a huge output
        "min_ngram": (dict(min_ngram=0), "min_ngram"),
        "min_above_max": (dict(min_ngram=4), "min_ngram <= max_ngram"),
        "n_tokens_zero": (dict(n_tokens=torch.tensor([1, 0, 4])), r"n_tokens must lie in \[1, C\]"),
        "n_tokens_past_capacity": (dict(n_tokens=torch.tensor([9, 1, 4])), "n_tokens must lie"),
    }


@pytest.mark.parametrize("case", list(ngram_bad_cases()[1]))
def test_ngram_bad_input(device, case):
    base, cases = ngram_bad_cases()
    change, message = cases[case]
    args = {k: (torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).copy_(v)
                if isinstance(v, torch.Tensor) else v) for k, v in {**base, **change}.items()}
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.dspark.ngram_propose(*args.values())


@pytest.mark.cuda
def test_cuda_without_read_back_stays_in_bounds(device):
    """With sync checks off, bad n_tokens gives a row of -1 (ngram) or skips the request
    (commit); the others are processed normally."""
    if device != "cuda":
        pytest.skip("needs a GPU")
    tokens = torch.arange(16, device="cuda").view(2, 8) % 3
    with dspark.ops.sync_checks(False):
        out = torch.ops.dspark.ngram_propose(tokens, torch.tensor([9, 5], device="cuda"), 2, 2, 1)
        assert out[0].tolist() == [-1, -1, -1]
        want = ref.ngram_propose(tokens[1:].cpu(), torch.tensor([5]), 2, 2, 1)
        assert out[1].tolist() == want[0].tolist()
        base, _ = commit_bad_cases()
        args = {k: v.clone().cuda() for k, v in base.items()}
        args["n_tokens"][1] = -1
        torch.ops.dspark.commit_tokens(*[args[k] for k in COMMIT])
        assert args["n_tokens"][1].item() == -1
        assert args["rounds"].item() == base["rounds"].item() + 1


@pytest.mark.cuda
def test_device_mismatch(device):
    if device != "cuda":
        pytest.skip("needs two devices")
    with pytest.raises(RuntimeError, match="n_tokens must be on cuda"):
        torch.ops.dspark.ngram_propose(torch.zeros(2, 8, **I64, device="cuda"),
                                       torch.ones(2, **I64), 3, 3, 1)
