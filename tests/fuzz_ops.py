"""Valid calls of every op for tests/test_fuzz.py, drawn with hypothesis (small sizes; empty
batches, a one-token vocabulary and a one-slot cache among them), and the documented shapes and
ranges of their results. OPS maps each op to (build, call, check, names besides the schema's
arguments that its messages may use)."""
import torch
from hypothesis import strategies as st

import dspark

from helpers import LOGIT_DTYPES, make_batch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
I64 = torch.int64


# ---- valid calls -------------------------------------------------------------------------------
def gen_of(draw) -> torch.Generator:
    """Bulk random content comes from a generator seeded by hypothesis (it shrinks the seed)."""
    return torch.Generator().manual_seed(draw(st.integers(0, 2**16)))


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


def build_kv_commit(draw):
    """Verified trees at slots start + j: a root-first increasing path per request (or -1:
    inactive), in a contiguous [L, B, H, S, D] cache or pages of a [L, P, page, H, D] pool."""
    B, W, g = draw(st.integers(0, 3)), draw(st.integers(1, 4)), gen_of(draw)
    L, H, D, S = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 4])), \
        draw(st.integers(W, 12))
    offsets, nodes, counts, starts = [0], torch.full((B, W), -1, dtype=I64), [], []
    for b in range(B):
        n = draw(st.integers(1, W))
        keep = torch.randperm(n - 1, generator=g)[:draw(st.integers(0, n - 1))] + 1
        path = [0] + sorted(keep.tolist())
        active = draw(st.integers(0, 4)) > 0
        nodes[b, :len(path)] = torch.tensor(path) + offsets[-1]
        counts.append(len(path) - 1 if active else -1)
        starts.append(draw(st.integers(0, S - n)))
        offsets.append(offsets[-1] + n)
    args = dict(k_cache=None, v_cache=None, start=torch.tensor(starts, dtype=I64),
                accept_nodes=nodes, accept_count=torch.tensor(counts, dtype=I64),
                node_offsets=torch.tensor(offsets, dtype=I64), block_table=None)
    shape = (L, B, H, S, D)
    if draw(st.booleans()):  # paged: each request owns its pages of a shuffled pool
        page = draw(st.sampled_from([1, 4]))
        per = -(-S // page)
        pool = torch.randperm(B * per + 2, generator=g)
        args["block_table"] = pool[:B * per].view(B, per).to(draw(st.sampled_from([torch.int32,
                                                                                 I64])))
        shape = (L, B * per + 2, page, H, D)
    dt = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int64]))
    args.update(k_cache=torch.randn(shape, generator=g).to(dt),
                v_cache=torch.randn(shape, generator=g).to(dt))
    return args


def build_markov_draft(draw):
    R, G, V = draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(st.sampled_from([1, 3, 17]))
    rank, d, g = draw(st.sampled_from([1, 4])), draw(st.sampled_from([0, 3])), gen_of(draw)
    wdt = draw(st.sampled_from(FLOAT_DTYPES))
    temps = [draw(st.sampled_from([0.0, 0.7, 1.0])) for _ in range(R)]
    params = dspark.ops.sampling_tensors(R, temps, draw(st.sampled_from([0, 1, 5])),
                                         draw(st.sampled_from([1.0, 0.5])))

    def rnd(*shape, dtype=wdt):
        return torch.randn(*shape, generator=g).to(dtype)
    head = d > 0  # the confidence head: all three or none
    return dict(base_logits=rnd(R, G, V, dtype=draw(st.sampled_from([torch.float32, wdt]))) * 3,
                anchors=torch.randint(0, V, (R,), generator=g), w1=rnd(V, rank),
                w2=rnd(rank, V), hidden=rnd(R, G, d) if head else None,
                conf_weight=rnd(d + rank) if head else None, conf_bias=rnd(1) if head else None,
                temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                seeds=torch.randint(-(2**63), 2**63 - 1, (R,), generator=g),
                positions=torch.randint(0, 2**40, (R,), generator=g),
                return_probs=draw(st.booleans()))


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


def check_kv_commit(a, before, res):
    lengths, freed = (t.cpu() for t in res)
    B, count, start = a["start"].shape[0], before["accept_count"].cpu(), before["start"].cpu()
    assert lengths.shape == (B,) and lengths.dtype == I64 and freed.shape[0] == B
    active = count >= 0
    assert torch.equal(lengths[active], (start + count + 1)[active])
    if a["block_table"] is None:
        assert freed.shape == (B, 0)
    else:  # -1 padding or pages of the request's own table
        table = a["block_table"].cpu()
        assert all(set(freed[b].tolist()) <= set(table[b].tolist()) | {-1} for b in range(B))


def check_markov_draft(a, out):
    (R, G, V), head = a["base_logits"].shape, a["conf_weight"] is not None
    tokens, conf, probs = (t.cpu() for t in out)
    assert tokens.shape == (R, G) and bool(((tokens >= 0) & (tokens < V)).all())
    assert conf.shape == ((R, G) if head else (0, G))
    assert probs.shape == ((R, G, V) if a["return_probs"] else (0, G, V))
    if a["return_probs"] and R:
        assert torch.allclose(probs.sum(-1), torch.ones(R, G).double())
        assert bool((probs.gather(-1, tokens[..., None]) > 0).all())  # drawn where q > 0


def raw(name):
    op = getattr(torch.ops.dspark, name)
    return lambda a: op(*a.values())


OPS = {  # name -> (build, call, check, also named in messages besides the schema's arguments)
    "verify": (build_verify, call_verify, check_verify, ["logits"]),
    "sample": (build_sample, raw("sample"), check_sample, []),
    "fused_linear": (build_fused_linear, call_fused_linear, check_fused_linear, []),
    "decode_attention": (build_decode_attention, raw("decode_attention"), check_decode_attention,
                         []),
    "markov_draft": (build_markov_draft, raw("markov_draft"), check_markov_draft, ["logits"]),
    "commit_tokens": (build_commit_tokens, raw("commit_tokens"), check_commit_tokens, []),
    "kv_commit": (build_kv_commit, raw("kv_commit"), check_kv_commit, []),
    "ngram_propose": (build_ngram_propose, raw("ngram_propose"), check_ngram_propose, []),
    "schedule_prefix": (build_schedule, raw("schedule_prefix"), check_schedule_prefix, []),
    "schedule_budget": (lambda draw: build_schedule(draw, budget_op=True), raw("schedule_budget"),
                        check_schedule_budget, []),
}


def torch_args(op: str) -> list:
    return [a.name for a in getattr(torch.ops.dspark, op).default._schema.arguments]
