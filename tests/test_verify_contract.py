"""The contract of dspark::verify and dspark::sample (one binding family: sample is verify of a
request with no drafts): torch.library.opcheck, torch.compile(fullgraph=True) == eager, CUDA-graph
replay == eager, and bad input (every caller error raises RuntimeError/ValueError/TypeError
naming the argument; never a crash). Their numerics: test_verify.py, test_sample.py."""
import pytest
import torch

import dspark
from dspark.timing import capture_graph

from helpers import make_batch, sample_args


# ---- opcheck, torch.compile, CUDA graphs ----------------------------------------------------
def verify_cases():
    gen = torch.Generator().manual_seed(0)
    return {
        "chain_q_keyed": make_batch([3, 0, 2], 11, gen, q_dtype=torch.float32),
        "tree_noq_uniforms": make_batch([4, 2], 9, gen, layout="tree", randomness="uniforms",
                                        dtype=torch.bfloat16, temperature="mixed"),
        "greedy_f16_q64_wide": make_batch([1, 5], 17, gen, temperature="greedy", top_k=3,
                                          dtype=torch.float16, q_dtype=torch.float64, max_nodes=9),
    }


@pytest.mark.parametrize("case", ["chain_q_keyed", "tree_noq_uniforms", "greedy_f16_q64_wide"])
def test_opcheck_verify(device, case):
    b = verify_cases()[case].to(device)
    torch.library.opcheck(torch.ops.dspark.verify.default, b.args())


@pytest.mark.parametrize("randomness", ["keyed", "uniforms"])
@pytest.mark.parametrize("return_probs", [False, True])
def test_opcheck_sample(device, randomness, return_probs):
    gen = torch.Generator().manual_seed(1)
    args = sample_args(torch.randn(5, 13, generator=gen), gen, top_k=[0, 2, 0, 5, 1],
                       top_p=[1.0, 1.0, 0.7, 0.9, 1.0], randomness=randomness)
    args = tuple(None if a is None else a.to(device) for a in args)
    torch.library.opcheck(torch.ops.dspark.sample.default, (*args, return_probs))


def decode_step(logits, offsets, tokens, parents, q, temp, top_k, top_p, seeds, positions):
    """What a decode loop does: verify, then sample the next block's first token from the rows
    after the last accepted node (the ops plus a few torch ops around them)."""
    out, count, nodes = torch.ops.dspark.verify(logits, offsets, tokens, parents, q, temp, top_k,
                                                top_p, seeds, positions, None, 8)
    last = nodes.gather(1, count.unsqueeze(1)).squeeze(1)
    nxt, probs = torch.ops.dspark.sample(logits.index_select(0, last).contiguous(), temp, top_k,
                                         top_p, seeds, positions + count + 1, None, True)
    return out, count, nodes, nxt, probs


def step_args(b):
    return (b.target_logits, b.node_offsets, b.draft_tokens, b.parents, b.draft_probs,
            b.temperature, b.top_k, b.top_p, b.seeds, b.positions)


def test_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    compiled = torch.compile(decode_step, fullgraph=True)
    # Two batches with the same shapes (N = 19 nodes, 4 requests) and different contents.
    for lengths in ([7, 0, 3, 5], [6, 2, 3, 4]):
        b = make_batch(lengths, 50, gen, layout="tree", q_dtype=torch.float32,
                       temperature="mixed", top_k="random", top_p="random", max_nodes=8)
        args = step_args(b.to(device))
        eager, got = decode_step(*args), compiled(*args)
        for e, c in zip(eager, got):
            assert e.dtype == c.dtype and e.device == c.device and torch.equal(e, c)


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager(device):
    """The ops capture into a CUDA graph (no host sync inside) and replays with new inputs copied
    into the captured buffers give exactly the eager results."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    gen = torch.Generator().manual_seed(3)
    batches = [make_batch(lengths, 300, gen, layout="tree", q_dtype=torch.float32,
                          temperature="mixed", top_k="random", top_p="random", max_nodes=8)
               for lengths in ([7, 0, 3, 5], [6, 2, 3, 4], [0, 7, 7, 1])]
    static = [a.clone() if a is not None else None for a in step_args(batches[0].to("cuda"))]
    graph, outs = capture_graph(lambda: decode_step(*static))
    for b in batches:
        args = step_args(b.to("cuda"))
        for dst, src in zip(static, args):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, decode_step(*args)):
            assert torch.equal(got, want)


# ---- bad input -----------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
VERIFY = ["target_logits", "node_offsets", "draft_tokens", "parents", "draft_probs",
          "temperature", "top_k", "top_p", "seeds", "positions", "uniforms", "max_nodes"]
SAMPLE = ["logits", "temperature", "top_k", "top_p", "seeds", "positions", "uniforms",
          "return_probs"]
ERRORS = (RuntimeError, ValueError)
DTYPE_CASES = {"logits_f64", "logits_int", "offsets_i32", "tokens_i32", "parents_i32", "q_f16",
               "temperature_f64", "top_k_i32", "top_p_f64", "seeds_i32", "positions_f32",
               "uniforms_f32", "s_logits_f64", "s_top_k_f32", "s_positions_i32", "s_uniforms_f32"}


def verify_args(randomness="keyed"):
    """Two requests (3 and 2 nodes, N = 5), V = 6, f32 draft_probs: a valid call."""
    b = make_batch([2, 1], 6, torch.Generator().manual_seed(0), q_dtype=torch.float32,
                   randomness=randomness)
    return dict(zip(VERIFY, b.args()))


def sample_call_args(randomness="keyed"):
    R = 3
    params = dspark.ops.sampling_tensors(R, [1.0, 0.0, 0.5], [0, 2, 0], [1.0, 1.0, 0.8])
    keyed = randomness == "keyed"
    return dict(zip(SAMPLE, (torch.randn(R, 6), *params,
                             torch.arange(R) if keyed else None, torch.zeros(R, dtype=torch.long)
                             if keyed else None,
                             None if keyed else torch.rand(R, dtype=torch.float64), True)))


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on device with t's strides (``Tensor.to`` would make a strided view contiguous and so
    hide the layout under test)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    return out.copy_(t)


def call(op, args, device=None):
    """The op on args (moved to device, strides kept, unless device is None)."""
    if device is not None:
        args = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v
                for k, v in args.items()}
    names = VERIFY if op == "verify" else SAMPLE
    return getattr(torch.ops.dspark, op)(*[args[k] for k in names])


def setitem(name, index, value):
    def f(a):
        a[name] = a[name].clone()
        a[name][index] = value
    return f


def put(name, value):
    def f(a):
        a[name] = value(a[name]) if callable(value) else value
    return f


def set_q_at_token(a, value):
    setitem("draft_probs", (1, int(a["draft_tokens"][1])), value)(a)


# (id, op, randomness, mutation, match)
CASES = [
    # ---- dtype / shape / layout of every tensor argument ----
    ("logits_f64", "verify", "keyed", put("target_logits", lambda t: t.double()), "target_logits"),
    ("logits_int", "verify", "keyed", put("target_logits", lambda t: t.long()), "target_logits"),
    ("logits_1d", "verify", "keyed", put("target_logits", lambda t: t[0]), "target_logits"),
    ("logits_V0", "verify", "keyed", put("target_logits", lambda t: t[:, :0]), "target_logits"),
    ("logits_noncontig", "verify", "keyed",
     put("target_logits", lambda t: t.t().contiguous().t()), "target_logits"),
    ("offsets_i32", "verify", "keyed", put("node_offsets", lambda t: t.int()), "node_offsets"),
    ("offsets_2d", "verify", "keyed", put("node_offsets", lambda t: t[None]), "node_offsets"),
    ("offsets_len1", "verify", "keyed", put("node_offsets", lambda t: t[:1]), "node_offsets"),
    ("offsets_more_requests_than_rows", "verify", "keyed",
     put("node_offsets", lambda t: torch.arange(7)), "target_logits"),
    ("tokens_i32", "verify", "keyed", put("draft_tokens", lambda t: t.int()), "draft_tokens"),
    ("tokens_short", "verify", "keyed", put("draft_tokens", lambda t: t[:-1]), "draft_tokens"),
    ("tokens_2d", "verify", "keyed", put("draft_tokens", lambda t: t[None]), "draft_tokens"),
    ("parents_i32", "verify", "keyed", put("parents", lambda t: t.int()), "parents"),
    ("parents_long", "verify", "keyed", put("parents", lambda t: torch.cat([t, t])), "parents"),
    ("parents_noncontig", "verify", "keyed", put("parents", lambda t: torch.stack([t, t], 1)[:, 0]),
     "parents"),
    ("q_f16", "verify", "keyed", put("draft_probs", lambda t: t.half()), "draft_probs"),
    ("q_shape", "verify", "keyed", put("draft_probs", lambda t: t[:, :-1]), "draft_probs"),
    ("q_rows", "verify", "keyed", put("draft_probs", lambda t: t[:-1]), "draft_probs"),
    ("q_1d", "verify", "keyed", put("draft_probs", lambda t: t[0]), "draft_probs"),
    ("q_noncontig", "verify", "keyed", put("draft_probs", lambda t: t.t().contiguous().t()),
     "draft_probs"),
    ("temperature_f64", "verify", "keyed", put("temperature", lambda t: t.double()), "temperature"),
    ("temperature_size", "verify", "keyed", put("temperature", lambda t: t[:1]), "temperature"),
    ("temperature_2d", "verify", "keyed", put("temperature", lambda t: t[None]), "temperature"),
    ("top_k_i32", "verify", "keyed", put("top_k", lambda t: t.int()), "top_k"),
    ("top_k_size", "verify", "keyed", put("top_k", lambda t: torch.cat([t, t])), "top_k"),
    ("top_p_f64", "verify", "keyed", put("top_p", lambda t: t.double()), "top_p"),
    ("top_p_size", "verify", "keyed", put("top_p", lambda t: t[:1]), "top_p"),
    ("seeds_i32", "verify", "keyed", put("seeds", lambda t: t.int()), "seeds"),
    ("seeds_size", "verify", "keyed", put("seeds", lambda t: t[:1]), "seeds"),
    ("seeds_without_positions", "verify", "keyed", put("positions", None), "positions"),
    ("positions_without_seeds", "verify", "keyed", put("seeds", None), "seeds"),
    ("positions_f32", "verify", "keyed", put("positions", lambda t: t.float()), "positions"),
    ("positions_2d", "verify", "keyed", put("positions", lambda t: t[None]), "positions"),
    ("uniforms_f32", "verify", "uniforms", put("uniforms", lambda t: t.float()), "uniforms"),
    ("uniforms_cols", "verify", "uniforms", put("uniforms", lambda t: t[:, :1]), "uniforms"),
    ("uniforms_rows", "verify", "uniforms", put("uniforms", lambda t: t[1:]), "uniforms"),
    ("uniforms_1d", "verify", "uniforms", put("uniforms", lambda t: t[:, 0]), "uniforms"),
    ("uniforms_noncontig", "verify", "uniforms", put("uniforms", lambda t: t.t().contiguous().t()),
     "uniforms"),
    ("no_randomness", "verify", "keyed", lambda a: a.update(seeds=None, positions=None), "seeds"),
    ("max_nodes_0", "verify", "keyed", put("max_nodes", 0), "max_nodes"),
    ("max_nodes_huge", "verify", "keyed", put("max_nodes", 1 << 20), "max_nodes"),
    # ---- data errors (found by the kernels) ----
    ("offsets_decreasing", "verify", "keyed", put("node_offsets", torch.tensor([0, 6, 5])),
     "node_offsets"),
    ("offsets_empty_request", "verify", "keyed", put("node_offsets", torch.tensor([0, 5, 5])),
     "node_offsets"),
    ("offsets_empty_first", "verify", "keyed", put("node_offsets", torch.tensor([0, 0, 5])),
     "node_offsets"),
    ("offsets_not_from_0", "verify", "keyed", put("node_offsets", torch.tensor([1, 3, 5])),
     "node_offsets"),
    ("offsets_not_to_N", "verify", "keyed", put("node_offsets", torch.tensor([0, 2, 4])),
     "node_offsets"),
    ("offsets_past_N", "verify", "keyed", put("node_offsets", torch.tensor([0, 3, 6])),
     "node_offsets"),
    ("max_nodes_too_small", "verify", "keyed", put("max_nodes", 2), "max_nodes"),
    ("token_V", "verify", "keyed", setitem("draft_tokens", 1, 6), "draft_tokens"),
    ("token_minus1_padding", "verify", "keyed", setitem("draft_tokens", 4, -1), "draft_tokens"),
    ("token_huge", "verify", "keyed", setitem("draft_tokens", 2, 1 << 40), "draft_tokens"),
    ("parent_root_not_minus1", "verify", "keyed", setitem("parents", 3, 0), "parents"),
    ("parent_self", "verify", "keyed", setitem("parents", 2, 2), "parents"),
    ("parent_forward", "verify", "keyed", setitem("parents", 1, 2), "parents"),
    ("parent_minus1_nonroot", "verify", "keyed", setitem("parents", 4, -1), "parents"),
    ("parent_minus2", "verify", "keyed", setitem("parents", 2, -2), "parents"),
    ("logits_nan", "verify", "keyed", setitem("target_logits", (4, 2), NAN), "logits"),
    ("logits_posinf", "verify", "keyed", setitem("target_logits", (0, 0), INF), "logits"),
    ("logits_all_neginf", "verify", "keyed", setitem("target_logits", 2, -INF), "logits"),
    ("logits_overflow_over_T", "verify", "keyed", lambda a: (
        setitem("target_logits", (1, 3), -3e38)(a), setitem("temperature", 0, 0.5)(a)), "logits"),
    ("temperature_negative", "verify", "keyed", setitem("temperature", 1, -0.5), "temperature"),
    ("temperature_nan", "verify", "keyed", setitem("temperature", 0, NAN), "temperature"),
    # T = +inf makes 1/T = 0 and t(-inf) = -inf * 0 = NaN (today: token -1, NaN probs).
    ("temperature_inf", "verify", "keyed", lambda a: (
        setitem("temperature", 0, INF)(a), setitem("top_k", 0, 2)(a),
        setitem("target_logits", (0, 1), -INF)(a)), "temperature"),
    ("top_p_0", "verify", "keyed", setitem("top_p", 0, 0.0), "top_p"),
    ("top_p_1.5", "verify", "keyed", setitem("top_p", 1, 1.5), "top_p"),
    ("top_p_nan", "verify", "keyed", setitem("top_p", 1, NAN), "top_p"),
    ("top_p_negative", "verify", "keyed", setitem("top_p", 0, -0.2), "top_p"),
    ("top_k_negative", "verify", "keyed", setitem("top_k", 0, -1), "top_k"),
    ("uniform_1", "verify", "uniforms", setitem("uniforms", (2, 0), 1.0), "uniforms"),
    ("uniform_negative", "verify", "uniforms", setitem("uniforms", (0, 1), -1e-9), "uniforms"),
    ("uniform_nan", "verify", "uniforms", setitem("uniforms", (4, 1), NAN), "uniforms"),
    # at node 1's drafted token: an entry every call reads (node 1 is always tested)
    ("q_negative", "verify", "keyed", lambda a: set_q_at_token(a, -0.1), "draft_probs"),
    ("q_nan", "verify", "keyed", lambda a: set_q_at_token(a, NAN), "draft_probs"),
    ("q_inf", "verify", "keyed", lambda a: set_q_at_token(a, INF), "draft_probs"),
    # ---- sample ----
    ("s_logits_f64", "sample", "keyed", put("logits", lambda t: t.double()), "logits"),
    ("s_logits_3d", "sample", "keyed", put("logits", lambda t: t[None]), "logits"),
    ("s_logits_noncontig", "sample", "keyed", put("logits", lambda t: t.t().contiguous().t()),
     "logits"),
    ("s_temperature_size", "sample", "keyed", put("temperature", lambda t: t[:2]), "temperature"),
    ("s_top_k_f32", "sample", "keyed", put("top_k", lambda t: t.float()), "top_k"),
    ("s_top_p_size", "sample", "keyed", put("top_p", lambda t: t[:1]), "top_p"),
    ("s_seeds_size", "sample", "keyed", put("seeds", lambda t: t[:2]), "seeds"),
    ("s_positions_i32", "sample", "keyed", put("positions", lambda t: t.int()), "positions"),
    ("s_uniforms_2d", "sample", "uniforms", put("uniforms", lambda t: t[:, None]), "uniforms"),
    ("s_uniforms_f32", "sample", "uniforms", put("uniforms", lambda t: t.float()), "uniforms"),
    ("s_uniforms_size", "sample", "uniforms", put("uniforms", lambda t: t[:2]), "uniforms"),
    ("s_no_randomness", "sample", "keyed", lambda a: a.update(seeds=None, positions=None), "seeds"),
    ("s_logits_nan", "sample", "keyed", setitem("logits", (1, 0), NAN), "logits"),
    ("s_logits_all_neginf", "sample", "keyed", setitem("logits", 2, -INF), "logits"),
    ("s_temperature_negative", "sample", "keyed", setitem("temperature", 2, -1.0), "temperature"),
    ("s_temperature_inf", "sample", "keyed", lambda a: (
        setitem("temperature", 2, INF)(a), setitem("top_k", 2, 2)(a),
        setitem("logits", (2, 0), -INF)(a)), "temperature"),
    ("s_top_p_0", "sample", "keyed", setitem("top_p", 0, 0.0), "top_p"),
    ("s_top_k_negative", "sample", "keyed", setitem("top_k", 1, -3), "top_k"),
    ("s_uniform_1", "sample", "uniforms", setitem("uniforms", 1, 1.0), "uniforms"),
]


@pytest.mark.parametrize("case,op,randomness,mutate,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(device, case, op, randomness, mutate, match):
    args = verify_args(randomness) if op == "verify" else sample_call_args(randomness)
    call(op, args, device)  # the unmodified call is valid
    mutate(args)
    # Wrong dtypes raise TypeError (TORCH_CHECK_TYPE), everything else RuntimeError/ValueError.
    with pytest.raises(TypeError if case in DTYPE_CASES else ERRORS, match=match):
        call(op, args, device)


def on(device, args):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


VERIFY_TENSORS = [n for n in VERIFY if n != "max_nodes"]
SAMPLE_TENSORS = ["logits", "temperature", "top_k", "top_p", "seeds", "positions", "uniforms"]


@pytest.mark.parametrize("op,name", [("verify", n) for n in VERIFY_TENSORS] +
                         [("sample", n) for n in SAMPLE_TENSORS])
def test_wrong_device(device, op, name):
    """One argument on the CPU, the logits on the GPU."""
    if device == "cpu":
        pytest.skip("needs a second real device (runs in the cuda variant)")
    rnd = "uniforms" if name == "uniforms" else "keyed"
    args = on(device, verify_args(rnd) if op == "verify" else sample_call_args(rnd))
    args[name] = args[name].cpu()
    first = "target_logits" if op == "verify" else "logits"
    with pytest.raises(ERRORS, match="device|must be on" if name == first else name):
        call(op, args)


def test_meta_argument_mixed_with_real_tensors(device):
    """A meta tensor among real ones must raise, not return uninitialized outputs."""
    silent = []
    for op, names in (("verify", VERIFY_TENSORS), ("sample", SAMPLE_TENSORS)):
        for name in names:
            rnd = "uniforms" if name == "uniforms" else "keyed"
            args = on(device, verify_args(rnd) if op == "verify" else sample_call_args(rnd))
            args[name] = args[name].to("meta")
            try:
                call(op, args)
                silent.append(f"{op}:{name}")
            except ERRORS:
                pass
    assert not silent, f"no error for a meta tensor in: {silent}"


@pytest.mark.parametrize("root_argmax", [0, 1])
def test_bad_draft_probs_raise_where_read(device, root_argmax):
    """Documented contract: draft_probs entries are validated where verification reads them
    (scanning all of draft_probs would cost a full extra read). Greedy chain 0 -> 1 -> 2 (tokens
    1, 2): with root argmax 0 node 1 is rejected and its whole q row (holding -1) is read -> error;
    with root argmax 1 both drafts are accepted, reading only q[1, 1] and q[2, 2] (both valid), so
    the call succeeds with the greedy answer."""
    root = [0.0, 0.0, 0.0]
    root[root_argmax] = 5.0
    after1 = [0.0, 0.0, 5.0]
    q = torch.tensor([[0.0] * 3, [0.2, 0.6, -1.0], [-5.0, 1.0, 1.0]], dtype=torch.float64)
    params = dspark.ops.sampling_tensors(1, 0.0)
    args = [torch.tensor([root, after1, after1]), torch.tensor([0, 3]), torch.tensor([0, 1, 2]),
            torch.tensor([-1, 0, 1]), q, *params, None, None,
            torch.full((3, 2), 0.5, dtype=torch.float64)]
    args = [a if a is None else a.to(device) for a in args]
    if root_argmax == 0:
        with pytest.raises(ERRORS, match="draft_probs"):
            torch.ops.dspark.verify(*args, 3)
    else:
        out, count, _ = torch.ops.dspark.verify(*args, 3)
        assert out.tolist() == [[1, 2, 2]] and count.tolist() == [2]
