"""Property-based fuzzing of every op's argument space (issue 15), with hypothesis.

Each example builds a valid call of one op (small sizes; empty batches, a one-token vocabulary
and a one-slot cache among them), then changes at most one argument: its dtype, rank or one size,
an empty, non-contiguous, stride-0 or other-device version, None, out-of-range or non-finite
entries, a bad int / float / str scalar. The op must either raise an exception whose message
names one of its arguments, or return results of the documented shapes and ranges; a call left
unchanged must succeed. A crash aborts the run and a hang stalls it: both are failures.

The examples are derandomized (the same ones on every run, so CI is reproducible);
DSPARK_FUZZ_EXAMPLES=N draws N fresh random examples per op instead. On a GPU the cuda variant
runs the same examples through the CUDA kernels, synchronizing after each call so an
asynchronous fault is charged to its example; run it under compute-sanitizer to catch
out-of-bounds accesses that do not fault (README: Tests).
"""
import math
import os

import pytest
import torch

import dspark

from helpers import LOGIT_DTYPES, make_batch

pytest.importorskip("hypothesis")  # a test tool (scripts/setup.sh installs it)
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("DSPARK_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 120, derandomize=not EXAMPLES, deadline=None,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
I64 = torch.int64


def gen_of(draw) -> torch.Generator:
    """Bulk random content comes from a generator seeded by hypothesis (it shrinks the seed)."""
    return torch.Generator().manual_seed(draw(st.integers(0, 2**16)))


# ---- valid calls -------------------------------------------------------------------------------
def build_verify(draw):
    R, V = draw(st.integers(0, 3)), draw(st.sampled_from([1, 2, 5, 33]))
    lengths = [draw(st.integers(0, 4)) for _ in range(R)]
    temperature = draw(st.sampled_from(["greedy", "sampled", "mixed"]))
    b = make_batch(lengths, V, gen_of(draw), layout=draw(st.sampled_from(["chain", "tree"])),
                   dtype=draw(st.sampled_from(LOGIT_DTYPES)),
                   q_dtype=draw(st.sampled_from([None, torch.float32, torch.float64])),
                   randomness=draw(st.sampled_from(["keyed", "uniforms"])),
                   temperature=temperature, top_k="random", top_p="random",
                   max_nodes=max(lengths, default=0) + 1 + draw(st.integers(0, 2)))
    if temperature == "greedy" and draw(st.booleans()):  # all greedy: no randomness needed
        b = b.replace(seeds=None, positions=None, uniforms=None)
    return dict(zip(torch_args("verify"), b.args()))


def build_sample(draw):
    R, V = draw(st.integers(0, 4)), draw(st.sampled_from([1, 3, 40]))
    g = gen_of(draw)
    temps = [draw(st.sampled_from([0.0, 0.7, 1.0])) for _ in range(R)]
    params = dspark.ops.sampling_tensors(R, temps, draw(st.sampled_from([0, 1, 5])),
                                         draw(st.sampled_from([1.0, 0.5])))
    randomness = draw(st.sampled_from(["keyed", "uniforms", "none"]))
    if randomness == "none" and any(temps):
        randomness = "keyed"
    keyed = randomness == "keyed"
    return dict(logits=(torch.randn(R, V, generator=g) * 3).to(draw(st.sampled_from(LOGIT_DTYPES))),
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                seeds=torch.randint(-(2**63), 2**63 - 1, (R,), generator=g) if keyed else None,
                positions=torch.randint(0, 2**40, (R,), generator=g) if keyed else None,
                uniforms=(torch.rand(R, generator=g, dtype=torch.float64)
                          if randomness == "uniforms" else None),
                return_probs=draw(st.booleans()))


def build_fused_linear(draw):
    M, N, K = draw(st.integers(0, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 70))
    dt, kind, g = draw(st.sampled_from(FLOAT_DTYPES)), draw(st.sampled_from(["plain", "norm",
                                                                            "gate"])), gen_of(draw)
    lead = (M,) if draw(st.booleans()) else (1, M)  # the wrapper flattens leading dims

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dt)
    return dict(x=rnd(*lead, 2 * K if kind == "gate" else K), weight=rnd(N, K) * K ** -0.5,
                bias=rnd(N) if draw(st.booleans()) else None,
                residual=rnd(*lead, N) if draw(st.booleans()) else None,
                norm_weight=rnd(K).abs() + 0.5 if kind == "norm" else None, eps=1e-6,
                silu_gate=kind == "gate")


def build_decode_attention(draw):
    B, L, S = draw(st.integers(0, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 12))
    H, Hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]))
    D, dt, g = draw(st.sampled_from([2, 8, 16])), draw(st.sampled_from(FLOAT_DTYPES)), gen_of(draw)
    T = draw(st.one_of(st.none(), st.integers(1, min(S, 4))))
    rows = T or 1
    parents = None
    if T is not None and draw(st.booleans()):  # a tree: each row's parent is an earlier row
        parents = torch.tensor([[-1] + [int(torch.randint(-1, j, (), generator=g))
                                        for j in range(1, T)] for _ in range(B)], dtype=I64)
        parents = parents.reshape(B, T)
    qk_norm = draw(st.booleans())

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dt)
    width = (H + 2 * Hkv) * D
    return dict(qkv=rnd(B, width) if T is None else rnd(B, T, width),
                k_cache=rnd(L, B, Hkv, S, D), v_cache=rnd(L, B, Hkv, S, D),
                layer=draw(st.integers(0, L - 1)),
                positions=torch.randint(0, S - rows + 1, (B,), generator=g),
                inv_freq=1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D),
                q_norm_weight=rnd(D).abs() + 0.5 if qk_norm else None,
                k_norm_weight=rnd(D).abs() + 0.5 if qk_norm else None, eps=1e-6, num_heads=H,
                window=draw(st.sampled_from([0, 1, S])), parents=parents)


def build_commit_tokens(draw):
    B, C, W = draw(st.integers(0, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 4))
    S, Rmax, g = draw(st.integers(1, 3)), draw(st.integers(1, 3)), gen_of(draw)
    accept = torch.randint(0, W, (B,), generator=g)
    out = torch.randint(0, 9, (B, W), generator=g)
    out[torch.arange(W)[None, :] > accept[:, None]] = -1
    n = torch.randint(0, C + 1, (B,), generator=g)
    return dict(tokens=torch.randint(0, 9, (B, C), generator=g), n_tokens=n,
                active=torch.rand(B, generator=g) < 0.7, out_tokens=out, accept_count=accept,
                stop_tokens=torch.randint(-1, 9, (B, S), generator=g),
                prompt_lens=(torch.rand(B, generator=g) * (n + 1)).long(),
                max_new=torch.randint(0, C + 2, (B,), generator=g),
                round_active=torch.rand(Rmax, B, generator=g) < 0.5,
                round_accepts=torch.randint(0, W, (Rmax, B), generator=g),
                rounds=torch.tensor(draw(st.integers(0, Rmax + 1))),
                any_active=torch.tensor(draw(st.booleans())))


def build_ngram_propose(draw):
    B, C, g = draw(st.integers(0, 3)), draw(st.integers(1, 10)), gen_of(draw)
    max_ngram = draw(st.integers(1, 4))
    return dict(tokens=torch.randint(0, 4, (B, C), generator=g),
                n_tokens=torch.randint(1, C + 1, (B,), generator=g),
                gamma=draw(st.integers(1, 6)), max_ngram=max_ngram,
                min_ngram=draw(st.integers(1, max_ngram)))


def build_schedule(draw, budget_op=False):
    R, gamma, g = draw(st.integers(0, 4)), draw(st.integers(0, 5)), gen_of(draw)
    args = dict(confidences=torch.rand(R, gamma, generator=g),
                draft_lengths=torch.randint(0, gamma + 1, (R,), generator=g),
                sps=torch.rand(draw(st.integers(1, 10)), generator=g) * 100 + 1)
    if budget_op:
        return args
    mode = draw(st.sampled_from(["sync", "async", "threshold", "fixed"]))
    return dict(args, mode=mode, threshold=draw(st.sampled_from([0.0, 0.5, 1.0])),
                budget=torch.tensor(draw(st.integers(0, 6))) if mode == "async" else None)


# ---- calls and the shapes and ranges of a valid result -----------------------------------------
def call_verify(a):  # through the wrapper: it reads node_offsets to size the output
    return dspark.ops.verify(a["target_logits"], a["node_offsets"], a["draft_tokens"],
                             a["parents"], a["draft_probs"],
                             dspark.ops.SamplingTensors(a["temperature"], a["top_k"], a["top_p"]),
                             a["seeds"], a["positions"], a["uniforms"], a["max_nodes"])


def check_verify(a, res):
    R, (N, V), W = a["node_offsets"].numel() - 1, a["target_logits"].shape, a["max_nodes"]
    out, count, nodes = (t.cpu() for t in res)
    assert out.shape == nodes.shape == (R, W) and count.shape == (R,)
    assert bool(((out >= -1) & (out < V)).all()) and bool(((count >= 0) & (count < W)).all())
    assert bool(((nodes >= -1) & (nodes < N)).all())
    emitted = (out >= 0).sum(1)
    assert torch.equal(emitted, count + 1)  # accepted drafts, then the bonus/correction token


def check_sample(a, res):
    R, V = a["logits"].shape
    tokens, probs = (t.cpu() for t in res)
    assert tokens.shape == (R,) and bool(((tokens >= 0) & (tokens < V)).all())
    assert probs.shape == ((R, V) if a["return_probs"] else (0, V))
    if a["return_probs"] and R:
        assert bool((probs >= 0).all()) and torch.allclose(probs.sum(1), torch.ones(R).double())
        assert bool((probs[torch.arange(R), tokens] > 0).all())  # never a token of mass 0


def call_fused_linear(a):
    return dspark.ops.fused_linear(**a)


def check_fused_linear(a, out):
    assert out.shape == (*a["x"].shape[:-1], a["weight"].shape[0]) and out.dtype == a["x"].dtype


def check_decode_attention(a, out):
    qkv, H, D = a["qkv"], a["num_heads"], a["k_cache"].shape[-1]
    assert out.shape == (*qkv.shape[:-1], H * D) and out.dtype == qkv.dtype


def check_commit_tokens(a, before, _):
    assert int(a["rounds"]) == int(before["rounds"]) + 1
    added = (a["n_tokens"] - before["n_tokens"]).cpu()  # accepted + bonus of active requests
    W = a["out_tokens"].shape[1]
    assert bool(((added >= 0) & (added <= W)).all())
    assert bool((added[~before["active"].cpu()] == 0).all())
    assert bool(a["any_active"]) == bool(a["active"].any())


def check_ngram_propose(a, out):
    B, gamma = a["tokens"].shape[0], a["gamma"]
    assert out.shape == (B, gamma + 1)
    for b in range(B):  # every draft is a token of the request's context
        n = int(a["n_tokens"][b])
        assert set(out[b].tolist()) <= set(a["tokens"][b, :n].tolist())


def check_schedule_prefix(a, out):
    lengths = a["draft_lengths"].cpu()
    assert out.shape == lengths.shape and out.dtype == I64
    assert bool(((out.cpu() >= 0) & (out.cpu() <= lengths)).all())


def check_schedule_budget(a, out):
    assert out.shape == () and 0 <= int(out) <= a["confidences"].numel()


def raw(name):
    op = getattr(torch.ops.dspark, name)
    return lambda a: op(*a.values())


OPS = {  # name -> (build, call, check, also named in messages besides the schema's arguments)
    "verify": (build_verify, call_verify, check_verify, ["logits"]),
    "sample": (build_sample, raw("sample"), check_sample, []),
    "fused_linear": (build_fused_linear, call_fused_linear, check_fused_linear, []),
    "decode_attention": (build_decode_attention, raw("decode_attention"), check_decode_attention,
                         []),
    "commit_tokens": (build_commit_tokens, raw("commit_tokens"), check_commit_tokens, []),
    "ngram_propose": (build_ngram_propose, raw("ngram_propose"), check_ngram_propose, []),
    "schedule_prefix": (build_schedule, raw("schedule_prefix"), check_schedule_prefix, []),
    "schedule_budget": (lambda draw: build_schedule(draw, budget_op=True), raw("schedule_budget"),
                        check_schedule_budget, []),
}


def torch_args(op: str) -> list:
    return [a.name for a in getattr(torch.ops.dspark, op).default._schema.arguments]


# ---- one change ----------------------------------------------------------------------------------
INTS = [-(2**63), -2, -1, 0, 1, 3, 40, 65, 4097, 2**31, 2**62]
FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-45, 0.5, 1.0, 2.0, 1e30, -1e30]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, I64,
          torch.bool]


def changed_tensor(draw, t: torch.Tensor, device: str):
    kinds = ["dtype", "rank+", "none", "huge"]
    if t.dim():
        kinds += ["rank-", "grow", "shrink", "empty", "strided"]
    if t.numel():
        kinds += ["value", "expanded"]
    if device != "cpu":
        kinds += ["cpu"]
    kind = draw(st.sampled_from(kinds))
    d = draw(st.integers(0, t.dim() - 1)) if t.dim() else 0
    if kind == "dtype":
        return t.to(draw(st.sampled_from([x for x in DTYPES if x != t.dtype])))
    if kind == "rank+":
        return t.unsqueeze(draw(st.integers(0, t.dim())))
    if kind == "rank-":
        return t.reshape(-1) if t.dim() > 1 else (t[0] if t.numel() else t.sum())
    if kind == "none":
        return None
    if kind == "expanded":  # stride 0: the same shape, every entry the first one
        return t.reshape(-1)[:1].reshape([1] * t.dim()).expand(t.shape)
    if kind == "huge":  # a stride-0 view with 10^12 entries along one dim: nothing allocated,
        if t.dim() == 0:  # and nothing may be (a copy or a sized output would be terabytes)
            return t.reshape(1).expand(10**12)
        shape = list(t.shape)
        shape[d] = 1
        one = t.narrow(d, 0, 1) if t.shape[d] else t.new_zeros(shape)
        shape[d] = 10**12
        return one.expand(shape)
    if kind in ("grow", "shrink", "empty"):
        if kind == "grow":
            pad = list(t.shape)
            pad[d] = draw(st.sampled_from([1, 70]))
            return torch.cat([t, torch.zeros(pad, dtype=t.dtype, device=t.device)], d)
        return t.narrow(d, 0, max(t.shape[d] - 1, 0) if kind == "shrink" else 0)
    if kind == "strided":  # the same values in a non-contiguous view
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "cpu":
        return t.cpu()
    new = t.clone().reshape(-1)  # "value": some entries out of range or non-finite
    if draw(st.booleans()):
        idx = slice(None)
    else:
        idx = draw(st.integers(0, new.numel() - 1))
    if t.dtype == torch.bool:
        new[idx] = ~new[idx]
    elif t.dtype.is_floating_point:
        new[idx] = draw(st.sampled_from(FLOATS))
    else:
        new[idx] = draw(st.sampled_from([v for v in INTS if torch.iinfo(t.dtype).min <= v
                                         <= torch.iinfo(t.dtype).max]))
    return new.reshape(t.shape)


def change_one(draw, args: dict, device: str):
    """At most one argument changed; returns (args, what changed)."""
    name = draw(st.sampled_from([None, *args]))
    if name is None:
        return args, None
    v = args[name]
    if isinstance(v, torch.Tensor):
        new = changed_tensor(draw, v, device)
    elif v is None:  # an optional argument given: a tensor of some wrong or right shape
        new = draw(st.sampled_from([torch.ones(()), torch.ones(3), torch.zeros(2, 2, dtype=I64)]))
        new = new.to(device)
    elif isinstance(v, bool):
        new = not v
    elif isinstance(v, int):
        new = draw(st.sampled_from(INTS))
    elif isinstance(v, float):
        new = draw(st.sampled_from(FLOATS))
    else:
        new = draw(st.sampled_from(["", "bogus", "SYNC"]))
    return {**args, name: new}, f"{name}: {describe(v)} -> {describe(new)}"


def describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{v.dtype} {list(v.shape)} stride {list(v.stride())} on {v.device}"
    return repr(v)


# ---- the property --------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
@FUZZ
@given(data=st.data())
def test_fuzz_op(device, op, data):
    build, call, check, aliases = OPS[op]
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in build(data.draw).items()}
    args, change = change_one(data.draw, args, device)
    note(f"change: {change}")
    # what an in-place op had before the call (stride-0 views of 10^12 entries are not copied)
    before = {k: v.clone() for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.numel() < 2**20}
    try:
        result = call(args)
        if device != "cpu":
            torch.cuda.synchronize()  # an asynchronous fault belongs to this example
    except ERRORS as exc:
        msg = str(exc).strip()
        assert change is not None, f"a valid call failed: {msg}"
        names = torch_args(op) + aliases
        assert any(n in msg for n in names), f"no argument named in: {msg}"
        return
    if op == "commit_tokens":  # in place: the state after the call
        check(args, before, result)
    else:
        check(args, result)
