"""dspark::decode_attention against dspark.reference.decode_attention: outputs and the cache
writes, over dtypes, head groupings, head sizes (vector and scalar paths), cache lengths (one and
several chunks), sliding windows, edge positions, blocks of T rows (chains and trees with
siblings and extra roots); the bitwise property (a verified row == the decode of its token, at
two cache sizes); opcheck, torch.compile, bad input."""
import pytest
import torch

import dspark
from dspark import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(B, H, Hkv, S, D, dtype, gen, device, qk_norm=True, L=2, positions=None, T=None,
         parents=None):
    """T None: one row per request (2-D qkv); else [B, T, width] and optional parents [B, T]."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    rows = 1 if T is None else T
    pos = (positions if positions is not None
           else torch.randint(0, S - rows + 1, (B,), generator=gen))
    width = (H + 2 * Hkv) * D
    return dict(qkv=rnd(B, width) if T is None else rnd(B, T, width), k_cache=rnd(L, B, Hkv, S, D),
                v_cache=rnd(L, B, Hkv, S, D), layer=L - 1,
                positions=torch.as_tensor(pos, dtype=torch.int64),
                inv_freq=1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)),
                q_norm_weight=(torch.rand(D, generator=gen) + 0.5).to(dtype) if qk_norm else None,
                k_norm_weight=(torch.rand(D, generator=gen) + 0.5).to(dtype) if qk_norm else None,
                eps=1e-6, num_heads=H, window=0,
                parents=None if parents is None else torch.as_tensor(parents, dtype=torch.int64))


def to(args, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def check(args, device):
    dev = to(args, device)
    got = torch.ops.dspark.decode_attention(*dev.values())
    cpu = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    want = ref.decode_attention(*cpu.values())
    dt = args["qkv"].dtype
    # Outputs are convex combinations of V rows (|v| ~ 1): the kernels and the reference differ by
    # fp32 summation order and by the last bit of cos/sin/rsqrt, which can move a rounded q/k
    # element by one unit of T; allowed: a few units of T (fp32: 1e-5).
    tol = 1e-5 if dt == torch.float32 else 4 * torch.finfo(dt).eps
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)
    for name in ("k_cache", "v_cache"):  # written slot: one unit of T (rotary); others untouched
        torch.testing.assert_close(dev[name].cpu().float(), cpu[name].float(),
                                   atol=1e-6 if dt == torch.float32 else 2 * torch.finfo(dt).eps,
                                   rtol=1e-6 if dt == torch.float32 else torch.finfo(dt).eps)
    untouched = torch.ones_like(args["k_cache"], dtype=torch.bool)
    rows = 1 if args["qkv"].dim() == 2 else args["qkv"].shape[1]
    for b, p in enumerate(args["positions"].tolist()):
        untouched[args["layer"], b, :, p:p + rows] = False
    assert torch.equal(dev["k_cache"].cpu()[untouched], args["k_cache"][untouched])
    assert torch.equal(dev["v_cache"].cpu()[untouched], args["v_cache"][untouched])


# ---- reference equality --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 1, 1, 1, 2), (2, 4, 2, 5, 16), (3, 8, 2, 130, 64),
                                         (1, 32, 8, 300, 128), (2, 6, 3, 40, 12),
                                         (1, 16, 1, 20, 32)])
def test_matches_reference(device, gen, dtype, B, H, Hkv, S, D):
    check(make(B, H, Hkv, S, D, dtype, gen, device), device)


@pytest.mark.parametrize("window", [1, 3, 100, 1000])
def test_sliding_window(device, gen, window):
    args = make(3, 4, 2, 260, 32, torch.float32, gen, device, positions=[259, 2, 140])
    args["window"] = window
    check(args, device)


@pytest.mark.parametrize("positions", [[0, 0], [255, 256], [511, 0]])
def test_chunk_edges(device, gen, positions):
    """Positions at the first slot, either side of a chunk boundary, the last slot."""
    check(make(2, 4, 4, 512, 64, torch.bfloat16, gen, device, qk_norm=False, positions=positions),
          device)


TREE = [-1, 0, 0, 1, 2, 2, 4, -1, 7]  # siblings at depths 1 and 2, a second root (padding)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,Hkv,S,D,starts,tree", [
    (1, 8, 32, 8, 300, 128, [120], False),        # chain across a chunk boundary (128)
    (2, 5, 4, 2, 140, 16, [0, 130], True),         # tree at the first slot / in chunk 1
    (3, 16, 8, 2, 520, 64, [0, 250, 504], False),  # chain up to the last slot
    (2, 9, 6, 3, 40, 12, [3, 31], True),           # tree with a second root, scalar loads
    (1, 3, 16, 1, 20, 32, [17], True),             # 16 query heads per KV head
    (2, 64, 4, 4, 200, 8, [0, 136], False),        # the longest block
])
def test_block_matches_reference(device, gen, dtype, B, T, H, Hkv, S, D, starts, tree):
    parents = None
    if tree:
        parents = [[-1] + [int(torch.randint(-1, j, (1,), generator=gen)) for j in range(1, T)]
                   for _ in range(B)]
        if T == len(TREE):
            parents[0] = TREE
    check(make(B, H, Hkv, S, D, dtype, gen, device, positions=starts, T=T, parents=parents), device)


@pytest.mark.parametrize("window", [1, 3, 100])
def test_block_sliding_window(device, gen, window):
    args = make(2, 4, 2, 260, 32, torch.float32, gen, device, positions=[250, 125], T=9,
                parents=[TREE, list(range(-1, 8))])
    args["window"] = window
    check(args, device)


def compacted_decode(args, out, kc, vc, j, S2):
    """Row j of a block call, recomputed as a decode: a cache of S2 slots holding the block
    call's cache with row j's ancestors moved to the slots below its position (the engine's
    commit), and row j's qkv alone at that position. Returns (decode output, written K row,
    expected K row)."""
    B, S = kc.shape[1], kc.shape[3]
    k2 = torch.zeros(*kc.shape[:3], S2, kc.shape[4], dtype=kc.dtype, device=kc.device)
    v2 = torch.zeros_like(k2)
    k2[..., :S, :], v2[..., :S, :] = kc, vc
    pos = []
    L, T = args["layer"], args["qkv"].shape[1]
    for b in range(B):
        st = int(args["positions"][b])
        par = list(range(-1, T - 1)) if args["parents"] is None else args["parents"][b].tolist()
        path = ref.tree_paths(par)[j]
        for d, node in enumerate(path[:-1]):
            k2[L, b, :, st + d], v2[L, b, :, st + d] = (kc[L, b, :, st + node],
                                                        vc[L, b, :, st + node])
        pos.append(st + len(path) - 1)
    pos = torch.tensor(pos, device=kc.device)
    got = torch.ops.dspark.decode_attention(
        args["qkv"][:, j].contiguous(), k2, v2, L, pos, args["inv_freq"], args["q_norm_weight"],
        args["k_norm_weight"], args["eps"], args["num_heads"], args["window"], None)
    bidx = torch.arange(B, device=kc.device)
    start = args["positions"].to(kc.device)
    return got, k2[L, bidx, :, pos], kc[L, bidx, :, start + j]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["chain", "tree"])
@pytest.mark.parametrize("window", [0, 4])
def test_row_equals_decode_of_its_token(device, gen, dtype, layout, window):
    """The bitwise property behind greedy speculative == greedy autoregressive: every row of a
    verify block (chain or tree) equals, bit for bit, a decode of the same token at its position
    once its ancestors are compacted below it, with the same or a larger cache (other chunk
    count); the K row it writes is the decode's too."""
    B, T, H, Hkv, S, D = 2, 9, 8, 2, 300, 64
    parents = None if layout == "chain" else [TREE, [-1, 0, 1, 1, 3, 0, 5, 6, 6]]
    args = to(make(B, H, Hkv, S, D, dtype, gen, "cpu", positions=[126, 3], T=T, parents=parents),
              device)
    args["window"] = window
    out = torch.ops.dspark.decode_attention(*args.values())
    kc, vc = args["k_cache"].clone(), args["v_cache"].clone()
    for j in range(T):
        for S2 in (S, 700):
            got, k_written, k_block = compacted_decode(args, out, kc, vc, j, S2)
            assert torch.equal(got, out[:, j]), f"row {j}, S={S2}"
            assert torch.equal(k_written, k_block)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_do_not_depend_on_block_length(device, gen, dtype):
    """The first rows of a chain give the same bits in a block of 4 and in a block of 11."""
    args = to(make(2, 8, 2, 400, 128, dtype, gen, "cpu", positions=[200, 7], T=11), device)
    cache = args["k_cache"].clone(), args["v_cache"].clone()
    long = torch.ops.dspark.decode_attention(*args.values())
    short_args = dict(args, qkv=args["qkv"][:, :4].contiguous(), k_cache=cache[0], v_cache=cache[1])
    short = torch.ops.dspark.decode_attention(*short_args.values())
    assert torch.equal(short, long[:, :4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["decode", "chain", "tree"])
@pytest.mark.parametrize("heads", [(4, 2, 64), (8, 2, 136)], ids=["d64", "d136"])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("slots,positions", [(300, [126, 3]), (1100, [112, 1000])],
                         ids=["short", "long"])
def test_work_split_changes_no_bit(device, gen, dtype, layout, heads, window, slots, positions,
                                   monkeypatch):
    """The CUDA kernel's work split — rows of a verify block per thread block (chosen by grid
    size, or DSPARK_ATTN_ROWS_PER_BLOCK), query heads per thread block (chosen by grid size, or
    DSPARK_ATTN_HEADS_PER_BLOCK) and query vectors per weighted-V pass (the kernel's own, or
    fewer with DSPARK_ATTN_PASS_Q) and the tile code a one-query tile runs (its one-query
    instance, or the general one with DSPARK_ATTN_NO_COMPACT) — changes no output bit and no
    cache write. (d64: one 16-byte
    load a lane covers a 16-bit head, 8 query vectors a pass, 2 query heads per KV head; d136:
    two loads, 4 and 4. The launcher's own split maps blocks to each request's active chunks:
    "long" puts one block in the first of 9 chunks and one in the eighth, and "short" one across
    a chunk edge. "decode": one row per request, where the heads split is what changes.)"""
    if device != "cuda":
        pytest.skip("the CPU kernel has no thread blocks")
    H, Hkv, D = heads
    T = None if layout == "decode" else 9
    parents = None if layout != "tree" else [TREE, [-1, 0, 1, 1, 3, 0, 5, 6, 6]]
    base = to(make(2, H, Hkv, slots, D, dtype, gen, "cpu", positions=positions, T=T,
                   parents=parents), device)
    base["window"] = window  # (a sliding window: the rows of a pass see different first slots)
    G = H // Hkv
    results = []

    def run(what):  # one call on fresh cache copies under the switches now set
        args = dict(base, k_cache=base["k_cache"].clone(), v_cache=base["v_cache"].clone())
        out = torch.ops.dspark.decode_attention(*args.values())
        results.append((what, out, args["k_cache"], args["v_cache"]))
    for r, q, h in (("", "", ""), ("1", "", ""), ("2", "", ""), ("3", "", ""), ("4", "", ""),
                    ("9", "", ""), ("64", "", ""), ("", "1", ""), ("", "3", ""), ("", "4", ""),
                    ("9", "1", ""), ("9", "5", ""), ("2", "2", ""), ("", "", "1"),
                    ("", "", "2"), ("", "", str(G)), ("1", "", "1"), ("9", "", "1"),
                    ("2", "1", "2"), ("1", "", str(G))):
        monkeypatch.setenv("DSPARK_ATTN_ROWS_PER_BLOCK", r)
        monkeypatch.setenv("DSPARK_ATTN_PASS_Q", q)
        monkeypatch.setenv("DSPARK_ATTN_HEADS_PER_BLOCK", h)
        run(f"rows per block {r or 'auto'}, pass {q or 'auto'}, heads {h or 'auto'}")
    # one-query tiles (decode rows, one head a block) through the general tile code instead
    monkeypatch.setenv("DSPARK_ATTN_NO_COMPACT", "1")
    for r, h in (("", ""), ("", "1"), ("1", "1")):
        monkeypatch.setenv("DSPARK_ATTN_ROWS_PER_BLOCK", r)
        monkeypatch.setenv("DSPARK_ATTN_HEADS_PER_BLOCK", h)
        run(f"general tiles only, rows per block {r or 'auto'}, heads {h or 'auto'}")
    monkeypatch.setenv("DSPARK_ATTN_NO_COMPACT", "")
    monkeypatch.setenv("DSPARK_ATTN_ROWS_PER_BLOCK", "")
    monkeypatch.setenv("DSPARK_ATTN_HEADS_PER_BLOCK", "")
    for what, out, kc, vc in results[1:]:
        assert torch.equal(out, results[0][1]), what
        assert torch.equal(kc, results[0][2]) and torch.equal(vc, results[0][3])
    for name in ("DSPARK_ATTN_ROWS_PER_BLOCK", "DSPARK_ATTN_PASS_Q", "DSPARK_ATTN_HEADS_PER_BLOCK",
                 "DSPARK_ATTN_NO_COMPACT"):
        monkeypatch.setenv(name, "0")
        with pytest.raises(ValueError, match=name):
            torch.ops.dspark.decode_attention(*base.values())
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("DSPARK_ATTN_HEADS_PER_BLOCK", "3")  # divides neither G = 2 nor G = 4
    with pytest.raises(ValueError, match="must divide the query heads per KV head"):
        torch.ops.dspark.decode_attention(*base.values())


def test_wrapper_and_layers(device, gen):
    """dspark.ops.decode_attention == the op; only the chosen layer's slot is written."""
    args = to(make(2, 4, 2, 16, 16, torch.float32, gen, device, L=3), device)
    args["layer"] = 1
    before = args["k_cache"].clone()
    out = dspark.ops.decode_attention(args["qkv"], args["k_cache"], args["v_cache"], 1,
                                      args["positions"], args["inv_freq"], 4,
                                      args["q_norm_weight"], args["k_norm_weight"])
    assert out.shape == (2, 4 * 16)
    assert torch.equal(args["k_cache"][0], before[0]) and torch.equal(args["k_cache"][2], before[2])


# ---- opcheck, torch.compile, CUDA graphs ---------------------------------------------------------
@pytest.mark.parametrize("layout", ["decode", "chain", "tree"])
def test_opcheck(device, gen, layout):
    T = None if layout == "decode" else 9
    parents = [TREE, TREE] if layout == "tree" else None
    args = to(make(2, 4, 2, 140, 16, torch.float32, gen, device, T=T, parents=parents), device)
    torch.library.opcheck(torch.ops.dspark.decode_attention.default, tuple(args.values()))


def test_compile_fullgraph_block_equals_eager(device, gen):
    torch._dynamo.reset()
    args = to(make(2, 4, 2, 40, 16, torch.float32, gen, device, T=9, parents=[TREE, TREE]), device)

    def step(qkv, k, v, pos, inv, par):
        return dspark.ops.decode_attention(qkv, k, v, 1, pos, inv, 4, parents=par) + 1.0
    eager_k, eager_v = args["k_cache"].clone(), args["v_cache"].clone()
    want = step(args["qkv"], eager_k, eager_v, args["positions"], args["inv_freq"], args["parents"])
    got = torch.compile(step, fullgraph=True)(args["qkv"], args["k_cache"], args["v_cache"],
                                              args["positions"], args["inv_freq"], args["parents"])
    assert got.shape == (2, 9, 64)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(args["k_cache"], eager_k) and torch.equal(args["v_cache"], eager_v)


def test_compile_fullgraph_equals_eager(device, gen):
    torch._dynamo.reset()
    args = to(make(2, 4, 2, 24, 16, torch.float32, gen, device), device)

    def step(qkv, k, v, pos, inv):  # the cache is mutated in place: run on copies
        return dspark.ops.decode_attention(qkv, k, v, 1, pos, inv, 4) * 2.0
    eager_k, eager_v = args["k_cache"].clone(), args["v_cache"].clone()
    want = step(args["qkv"], eager_k, eager_v, args["positions"], args["inv_freq"])
    got = torch.compile(step, fullgraph=True)(args["qkv"], args["k_cache"], args["v_cache"],
                                              args["positions"], args["inv_freq"])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(args["k_cache"], eager_k) and torch.equal(args["v_cache"], eager_v)


# ---- bad input -----------------------------------------------------------------------------------
def bad_cases():
    gen = torch.Generator().manual_seed(0)
    base = make(2, 4, 2, 8, 16, torch.float32, gen, "cpu")
    cases = {
        "qkv_1d": (dict(qkv=torch.ones(10)), "qkv must be a 2-D"),
        "qkv_4d": (dict(qkv=torch.ones(2, 1, 1, 128)), "qkv must be a 2-D"),
        "qkv_f64": (dict(qkv=base["qkv"].double()), "float32, bfloat16 or float16"),
        "qkv_width": (dict(qkv=torch.ones(2, 10)), "qkv must have shape"),
        "cache_4d": (dict(k_cache=torch.ones(2, 2, 8, 16)), "k_cache must be"),
        "v_shape": (dict(v_cache=torch.ones(2, 2, 2, 9, 16)), "v_cache must have k_cache's shape"),
        "cache_dtype": (dict(k_cache=base["k_cache"].half(), v_cache=base["v_cache"].half()),
                        "k_cache must have dtype"),
        "layer": (dict(layer=2), "layer must be in"),
        "heads": (dict(num_heads=3), "multiple of the cache's kv_heads"),
        "positions_i32": (dict(positions=base["positions"].int()), "positions must have dtype"),
        "positions_len": (dict(positions=torch.zeros(3, dtype=torch.long)),
                          "positions must have size 2"),
        "inv_freq_len": (dict(inv_freq=torch.ones(7)), "inv_freq must have size 8"),
        "norm_len": (dict(q_norm_weight=torch.ones(15)), "q_norm_weight must have size 16"),
        "window": (dict(window=-1), "window must be >= 0"),
        "eps": (dict(eps=float("inf")), "eps must be finite"),
        "cache_strided": (
            dict(k_cache=base["k_cache"].transpose(3, 4).contiguous().transpose(3, 4)),
            "k_cache must be contiguous"),
        "position_past_cache": (dict(positions=torch.tensor([1, 8])),
                                r"positions must lie in \[0, S\)"),
        "position_negative": (dict(positions=torch.tensor([-1, 0])),
                              r"positions must lie in \[0, S\)"),
        "block_past_cache": (dict(qkv=torch.ones(2, 3, 128), positions=torch.tensor([5, 6])),
                             r"positions \+ rows <= S"),
        "too_many_rows": (dict(qkv=torch.ones(2, 65, 128), k_cache=torch.ones(2, 2, 2, 80, 16),
                               v_cache=torch.ones(2, 2, 2, 80, 16)), "1 to 64 rows"),
        "parents_shape": (dict(qkv=torch.ones(2, 3, 128), parents=torch.tensor([[-1, 0], [-1, 0]])),
                          r"parents must have shape \[2, 3\]"),
        "parents_dtype": (dict(qkv=torch.ones(2, 3, 128),
                               parents=torch.full((2, 3), -1, dtype=torch.int32)),
                          "parents must have dtype"),
        "parents_forward": (dict(qkv=torch.ones(2, 3, 128), positions=torch.tensor([0, 1]),
                                 parents=torch.tensor([[-1, 0, 0], [-1, 2, 0]])),
                            "parents must be -1"),
        "parents_below_minus_one": (dict(qkv=torch.ones(2, 3, 128), positions=torch.tensor([0, 1]),
                                         parents=torch.tensor([[-1, 0, -2], [-1, 0, 1]])),
                                    "parents must be -1"),
        "too_many_requests": (dict(qkv=torch.ones(65536, 128),
                                   k_cache=torch.ones(1, 65536, 2, 1, 16),
                                   v_cache=torch.ones(1, 65536, 2, 1, 16), layer=0,
                                   positions=torch.zeros(65536, dtype=torch.long)),
                              "at most 65535 requests"),
    }
    return base, cases


@pytest.mark.parametrize("case", list(bad_cases()[1]))
def test_bad_input(device, case):
    base, cases = bad_cases()
    change, message = cases[case]
    args = {**base, **change}
    args = {k: (torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).copy_(v)
                if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.dspark.decode_attention(*args.values())
