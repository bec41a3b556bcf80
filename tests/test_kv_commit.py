"""dspark::kv_commit against dspark.reference.kv_commit: contiguous and paged caches, odd sizes
and dtypes (vector widths 16 down to 1 byte), random tree paths with page boundaries, inactive
requests, zero / all accepted, maximally overlapping moves, paths longer than one batch of
rows, K and V as strided views of one buffer; opcheck, torch.compile, CUDA-graph replay, empty
batches and bad input (named one-line errors, nothing written on CPU)."""
import random

import pytest
import torch

import dspark
from dspark import reference as ref
from dspark.timing import capture_graph

I64 = dict(dtype=torch.long)
ARGS = ["start", "accept_nodes", "accept_count", "node_offsets", "block_table"]


def make_case(B, W, layout, rnd, L=2, H=3, S=24, D=8, dtype=torch.float32, page_size=4,
              paths=None, sizes=None, inactive=0.15, dev="cpu"):
    """A verified batch: request b has n_b in [1, W] nodes (``sizes[b]`` if given) at slots
    start + j, a root-first path of increasing local ids (``paths[b]`` if given) and start
    anywhere that fits (page boundaries at random). Paged: each request owns pages_per_request
    distinct pages of a pool with spare pages, so entries past the block and pages of other
    requests stay untouched."""
    node_counts, nodes, counts, starts = [], [], [], []
    for b in range(B):
        path = paths[b] if paths is not None else None
        n = max(path) + 1 if path else sizes[b] if sizes else rnd.randint(1, W)
        if path is None:
            c = rnd.randint(0, n - 1)
            path = [0] + sorted(rnd.sample(range(1, n), c))
            if rnd.random() < inactive:
                path = None
        node_counts.append(n)
        counts.append(len(path) - 1 if path else -1)
        nodes.append(path or [rnd.randint(-3, 9) for _ in range(rnd.randint(0, W))])
        starts.append(rnd.randint(0, S - n) if path else rnd.randint(-5, 99))
    offsets = [0]
    for n in node_counts:
        offsets.append(offsets[-1] + n)
    flat = torch.full((B, W), -1, **I64)
    for b, path in enumerate(nodes):
        ids = [u + offsets[b] if counts[b] >= 0 else u for u in path[:W]]
        flat[b, :len(ids)] = torch.tensor(ids, **I64)
    case = dict(start=torch.tensor(starts, **I64), accept_nodes=flat,
                accept_count=torch.tensor(counts, **I64),
                node_offsets=torch.tensor(offsets, **I64), block_table=None)
    if layout == "contiguous":
        shape = (L, B, H, S, D)
    else:
        per = -(-S // page_size)
        P = B * per + 3
        pages = list(range(P))
        rnd.shuffle(pages)
        case["block_table"] = torch.tensor(pages[:B * per], dtype=torch.int32).view(B, per)
        shape = (L, P, page_size, H, D)
    if dtype.is_floating_point:
        k, v = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    else:
        k, v = torch.randint(0, 100, shape).to(dtype), torch.randint(0, 100, shape).to(dtype)
    case.update(k_cache=k, v_cache=v)
    return {key: (t.to(dev) if t is not None else None) for key, t in case.items()}


def run_both(case, device):
    """The op on a device copy, the reference on a CPU copy: (caches, lengths, freed) each."""
    got = {k: (v.clone().to(device) if v is not None else None) for k, v in case.items()}
    want = {k: (v.clone() if v is not None else None) for k, v in case.items()}
    out = torch.ops.dspark.kv_commit(got["k_cache"], got["v_cache"], *[got[k] for k in ARGS])
    exp = ref.kv_commit(want["k_cache"], want["v_cache"], *[want[k] for k in ARGS])
    return (got, [t.cpu() for t in out]), (want, list(exp))


def assert_same(got, want, what=""):
    (gc, gout), (wc, wout) = got, want
    for name in ("k_cache", "v_cache"):
        assert torch.equal(gc[name].cpu(), wc[name]), f"{what} {name} differs"
    for name, g, w in zip(("lengths", "freed"), gout, wout):
        assert g.dtype == w.dtype and torch.equal(g, w), f"{what} {name}:\n{g}\n{w}"


LAYOUTS = ["contiguous", "paged"]
# (B, W, L, H, S, D, dtype, page_size): 16-byte rows and odd rows (vectors of 8, 4, 2, 1 bytes)
SHAPES = [(1, 1, 1, 1, 4, 8, torch.bfloat16, 1), (1, 2, 2, 2, 9, 8, torch.bfloat16, 2),
          (3, 8, 3, 2, 20, 16, torch.bfloat16, 4), (5, 8, 2, 3, 17, 3, torch.float32, 3),
          (7, 5, 1, 1, 13, 5, torch.float16, 16), (4, 9, 2, 2, 30, 7, torch.uint8, 5),
          (2, 6, 2, 1, 11, 4, torch.float16, 1), (33, 8, 2, 4, 40, 64, torch.bfloat16, 16),
          (9, 40, 1, 2, 64, 8, torch.float32, 8)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B,W,L,H,S,D,dtype,page_size", SHAPES)
def test_matches_reference(device, seed, layout, B, W, L, H, S, D, dtype, page_size):
    rnd = random.Random(seed)
    for trial in range(4):
        case = make_case(B, W, layout, rnd, L=L, H=H, S=S, D=D, dtype=dtype,
                         page_size=page_size)
        assert_same(*run_both(case, device), f"trial {trial}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("page_size", [1, 2, 5])
def test_edge_paths(device, seed, layout, page_size):
    """Zero accepted, a full chain (nothing moves), a whole tree path, the path that overlaps
    most (node d + 1 to slot d: each source is the next destination), a single-node request,
    gamma = 1 and inactive requests, beside each other."""
    W = 7
    paths = [[0], list(range(W)), [0, 2, 4, 6], [0, 2, 3, 4, 5, 6], [0, 6], [0, 1, 2, 5],
             [0], [0, 1], None, [0, 3, 5]]
    rnd = random.Random(seed)
    case = make_case(len(paths), W, layout, rnd, page_size=page_size, paths=paths)
    case["accept_count"][8] = -1  # inactive, with garbage nodes and start
    case["start"][8] = 10**9
    got, want = run_both(case, device)
    assert_same(got, want)
    lengths = got[1][0].tolist()
    assert lengths[8] == 10**9 and lengths[0] == int(case["start"][0]) + 1
    assert lengths[1] == int(case["start"][1]) + W


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chain_moves_nothing(device, seed, layout):
    """A chain's accepted nodes already sit at slots start + depth: the caches stay bit-equal
    and only the lengths change (rollback = the shorter length)."""
    rnd = random.Random(seed)
    paths = [list(range(rnd.randint(1, 8))) for _ in range(6)]
    case = make_case(6, 8, layout, rnd, paths=paths, dtype=torch.bfloat16)
    (got, out), _ = run_both(case, device)
    assert torch.equal(got["k_cache"].cpu(), case["k_cache"])
    assert torch.equal(got["v_cache"].cpu(), case["v_cache"])
    assert out[0].tolist() == [int(s) + len(p) for s, p in zip(case["start"], paths)]


def test_freed_pages(device):
    """The pages the block used past the new length, in logical order, as block-table entries."""
    case = make_case(3, 9, "paged", random.Random(0), S=16, page_size=2,
                     paths=[[0, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8], [0]])
    case["start"] = torch.tensor([1, 0, 7])  # request 0: slots 1..9 used, 1..2 kept
    case["node_offsets"] = torch.tensor([0, 9, 18, 27])  # request 2: 9 nodes, 1 kept
    got, want = run_both(case, device)
    assert_same(got, want)
    bt = case["block_table"]
    freed = got[1][1]
    assert freed.shape == (3, 4) and freed.dtype == torch.int32
    assert freed[0].tolist() == bt[0, 2:5].tolist() + [-1]  # slots 4..9: pages 2, 3, 4
    assert freed[1].tolist() == [-1] * 4  # all accepted: pages 0..4 kept
    assert freed[2].tolist() == bt[2, 4:8].tolist()  # slots 8..15 after the kept slot 7


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_layer_strided_views_and_table_dtypes(device, seed, table_dtype):
    """K and V as views of one [L, 2, P, page_size, H, D] buffer (layer stride twice a layer)."""
    rnd = random.Random(seed)
    case = make_case(5, 6, "paged", rnd, L=3, dtype=torch.bfloat16, D=16)
    both = torch.stack([case["k_cache"], case["v_cache"]], 1)
    case["block_table"] = case["block_table"].to(table_dtype)
    got, want = {}, {}
    for out, dev, fn in ((got, device, torch.ops.dspark.kv_commit), (want, "cpu", ref.kv_commit)):
        buf = both.clone().to(dev)
        args = [case[k].to(dev) for k in ARGS]
        out["res"] = [t.cpu() for t in fn(buf[:, 0], buf[:, 1], *args)]
        out["buf"] = buf.cpu()
    assert torch.equal(got["buf"], want["buf"])
    assert all(torch.equal(g, w) for g, w in zip(got["res"], want["res"]))
    assert got["res"][1].dtype == table_dtype


def test_empty_batch(device):
    for layout in LAYOUTS:
        case = make_case(0, 4, layout, random.Random(0), dev=device)
        lengths, freed = torch.ops.dspark.kv_commit(case["k_cache"], case["v_cache"],
                                                    *[case[k] for k in ARGS])
        assert lengths.shape == (0,) and freed.shape[0] == 0 and lengths.device.type == device


# ---- opcheck, torch.compile, CUDA graphs ---------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, seed, layout):
    case = make_case(4, 5, layout, random.Random(seed), dev=device)
    torch.library.opcheck(torch.ops.dspark.kv_commit.default,
                          (case["k_cache"], case["v_cache"], *[case[k] for k in ARGS]))


def commit_and_read(k, v, start, nodes, count, offsets, table):
    """A commit followed by a read of the committed rows (what the next decode step does)."""
    lengths, freed = dspark.ops.kv_commit(k, v, start, nodes, count, offsets, table)
    return lengths, freed, k * 2 - v  # exact: compiled and eager agree bit for bit


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compile_fullgraph_equals_eager(device, seed, layout):
    torch._dynamo.reset()
    compiled = torch.compile(commit_and_read, fullgraph=True)
    rnd = random.Random(seed)
    for _ in range(2):
        case = make_case(6, 5, layout, rnd, dev=device)
        eager = {k: (v.clone() if v is not None else None) for k, v in case.items()}
        comp = {k: (v.clone() if v is not None else None) for k, v in case.items()}
        want = commit_and_read(eager["k_cache"], eager["v_cache"], *[eager[k] for k in ARGS])
        got = compiled(comp["k_cache"], comp["v_cache"], *[comp[k] for k in ARGS])
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        assert torch.equal(comp["k_cache"], eager["k_cache"])
        assert torch.equal(comp["v_cache"], eager["v_cache"])


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_replay_equals_eager(device, seed, layout):
    """Captured once; replays with new paths, starts and caches copied into the captured
    buffers equal eager calls."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    rnd = random.Random(seed)
    sizes = [3, 6, 1, 5, 6, 2, 4]  # one node layout for every replay (verify's max_nodes = 6)
    cases = [make_case(7, 6, layout, rnd, dtype=torch.bfloat16, D=16, sizes=sizes)
             for _ in range(4)]
    static = {k: v.clone().cuda() for k, v in cases[0].items() if v is not None}
    static.setdefault("block_table", None)
    call = lambda: torch.ops.dspark.kv_commit(  # noqa: E731
        static["k_cache"], static["v_cache"], *[static[k] for k in ARGS])
    graph, (lengths, freed) = capture_graph(call)
    for c in cases:
        for k, v in c.items():
            if v is not None:
                static[k].copy_(v)
        graph.replay()
        (got, out), (want, exp) = run_both(c, "cuda")
        torch.cuda.synchronize()
        assert torch.equal(static["k_cache"].cpu(), want["k_cache"])
        assert torch.equal(static["v_cache"].cpu(), want["v_cache"])
        assert torch.equal(lengths.cpu(), exp[0]) and torch.equal(freed.cpu(), exp[1])


# ---- bad input -----------------------------------------------------------------------------------
def bad_base(layout):
    """Three valid requests (paths 0 -> 2, 0 -> 1 -> 3, the root alone) and their pages."""
    c = make_case(3, 4, layout, random.Random(0), paths=[[0, 2], [0, 1, 3], [0]], S=8,
                  page_size=2)
    c["start"] = torch.tensor([1, 3, 7])  # slots 1..3, 3..6, 7 (node_offsets [0, 3, 7, 8])
    return c


def paths(*rows, W=4):
    """accept_nodes [3, W] from flat-id rows (-1 padded); missing rows keep the base's."""
    base = [[0, 2], [3, 4, 6], [7]]
    rows = list(rows) + base[len(rows):]
    return torch.tensor([r + [-1] * (W - len(r)) for r in rows])


def bad_cases(layout):
    c = bad_base(layout)
    k, B = c["k_cache"], 3
    cases = {
        "k_cache_4d": (dict(k_cache=k[0], v_cache=c["v_cache"][0]), "k_cache must be a 5-D"),
        "v_cache_shape": (dict(v_cache=c["v_cache"][:, :, :, :1]),
                          "v_cache must have the shape of k_cache"),
        "v_cache_dtype": (dict(v_cache=c["v_cache"].double()),
                          "v_cache must have the dtype of k_cache"),
        "k_cache_strided": (dict(k_cache=k.transpose(3, 4).contiguous().transpose(3, 4)),
                            "k_cache must be contiguous past its layer dim"),
        "v_cache_layers_overlap": (dict(v_cache=lambda a: a["v_cache"][:1].expand(k.shape)),
                                   "v_cache's layer stride must be >="),
        "same_tensor": (dict(v_cache=lambda a: a["k_cache"]),
                        "k_cache and v_cache must be different tensors"),
        "start_i32": (dict(start=c["start"].int()), "start must have dtype"),
        "start_2d": (dict(start=c["start"][:, None]), "start must be a 1-D"),
        "nodes_1d": (dict(accept_nodes=c["accept_nodes"][0]), "accept_nodes must be a 2-D"),
        "nodes_rows": (dict(accept_nodes=c["accept_nodes"][:2]),
                       f"accept_nodes must have size {B}"),
        "nodes_no_columns": (dict(accept_nodes=torch.zeros(B, 0, **I64)), "at least one column"),
        "nodes_strided": (dict(accept_nodes=c["accept_nodes"].t().contiguous().t()),
                          "accept_nodes must be contiguous"),
        "count_len": (dict(accept_count=c["accept_count"][:2]), f"accept_count must have size {B}"),
        "count_f32": (dict(accept_count=c["accept_count"].float()),
                      "accept_count must have dtype"),
        "offsets_len": (dict(node_offsets=c["node_offsets"][:B]),
                        f"node_offsets must have size {B + 1}"),
        # data, read by the kernels
        "id_out_of_range": (dict(accept_nodes=paths([0, 9], [3, 4, 6])), "root-to-node path"),
        "id_of_other_request": (dict(accept_nodes=paths([0, 3], [3, 4, 6])), "root-to-node"),
        "ids_not_increasing": (dict(accept_nodes=paths([0, 2], [3, 6, 4])), "root-to-node"),
        "root_not_first": (dict(accept_nodes=paths([1, 2], [3, 4, 6])), "root-to-node path"),
        "padding_in_path": (dict(accept_count=torch.tensor([2, 2, 0])), "root-to-node path"),
        "count_past_nodes": (dict(accept_count=torch.tensor([1, 2, 1])),
                             r"accept_count must lie in \[-1, n - 1\]"),
        "count_below_minus_one": (dict(accept_count=torch.tensor([1, -2, 0])),
                                  "accept_count must lie in"),
        "offsets_decreasing": (dict(node_offsets=torch.tensor([0, 3, 2, 7])),
                               "node_offsets must give each request 1 to W nodes"),
        "more_nodes_than_width": (dict(node_offsets=torch.tensor([0, 5, 6, 7]),
                                       accept_nodes=paths([0, 2], [5], [6]),
                                       accept_count=torch.tensor([1, 0, 0])), "1 to W nodes"),
        "start_negative": (dict(start=torch.tensor([0, -1, 0])), "start must be >= 0"),
    }
    if layout == "contiguous":
        cases.update({
            "cache_batch": (dict(k_cache=k[:, :2], v_cache=c["v_cache"][:, :2]),
                            f"k_cache must have size {B} in dim 1"),
            "block_past_slots": (dict(start=torch.tensor([0, 5, 0])),
                                 r"start \+ n <= S, the cache's slots"),
        })
    else:
        bt = c["block_table"]
        cases.update({
            "table_f32": (dict(block_table=bt.float()), "block_table must have dtype int32 or"),
            "table_rows": (dict(block_table=bt[:2]), f"block_table must have size {B}"),
            "table_1d": (dict(block_table=bt[0]), "block_table must be a 2-D"),
            "page_size_0": (dict(k_cache=k[:, :, :0], v_cache=c["v_cache"][:, :, :0]),
                            r"page_size \(k_cache.size\(2\)\) must be >= 1"),
            "table_too_short": (dict(block_table=bt[:, :1].contiguous()),
                                "block_table too short"),
            "start_past_table": (dict(start=torch.tensor([0, 5, 0])), "block_table too short"),
            "page_id_too_large": (dict(block_table=torch.where(bt == bt[1, 1], k.shape[1], bt)),
                                  r"page id outside \[0, P\)"),
            "page_id_negative": (dict(block_table=torch.where(bt == bt[0, 0], -1, bt)),
                                 r"page id outside \[0, P\)"),
        })
    return c, cases


CASES = [(layout, name) for layout in LAYOUTS for name in bad_cases(layout)[1]]


@pytest.mark.parametrize("layout,case", CASES)
def test_bad_input(device, layout, case):
    base, cases = bad_cases(layout)
    change, message = cases[case]
    args = {k: (torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).copy_(v)
                if isinstance(v, torch.Tensor) else v) for k, v in {**base, **change}.items()}
    for k, v in change.items():  # views of the other (device) arguments
        if callable(v):
            args[k] = v({**args, k: base[k].to(device)})
    before = [args[k].clone() for k in ("k_cache", "v_cache")]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message) as err:
        torch.ops.dspark.kv_commit(args["k_cache"], args["v_cache"], *[args[k] for k in ARGS])
    assert len(str(err.value).strip().splitlines()) == 1  # one line, naming the argument
    if device == "cpu":  # the CPU raises before moving anything
        assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_without_read_back_skips_invalid_requests(device, layout):
    """With sync checks off, a request with bad data is not touched and gets length -1 (and no
    freed pages); the others are committed as the reference commits them."""
    if device != "cuda":
        pytest.skip("needs a GPU")
    base = bad_base(layout)
    bad = {k: (v.clone() if v is not None else None) for k, v in base.items()}
    bad["accept_nodes"][1, 2] = 99  # request 1: an id outside its tree
    (got, out), _ = run_both(base, "cpu")  # what requests 0 and 2 become
    args = {k: (v.cuda() if v is not None else None) for k, v in bad.items()}
    with dspark.ops.sync_checks(False):
        lengths, freed = torch.ops.dspark.kv_commit(args["k_cache"], args["v_cache"],
                                                    *[args[k] for k in ARGS])
    assert lengths.tolist() == [out[0][0].item(), -1, out[0][2].item()]
    assert (freed[1] == -1).all()
    for name in ("k_cache", "v_cache"):
        cache = args[name].cpu()
        if layout == "contiguous":  # request 1's planes untouched, the others committed
            assert torch.equal(cache[:, 1], base[name][:, 1])
            assert torch.equal(cache[:, 0::2], got[name][:, 0::2])
        else:  # request 1's pages untouched; every other page as the commit left it
            pages = base["block_table"][1].long()
            pages = pages[pages >= 0]
            assert torch.equal(cache[:, pages], base[name][:, pages])
            others = torch.ones(cache.shape[1], dtype=torch.bool)
            others[pages] = False
            assert torch.equal(cache[:, others], got[name][:, others])


@pytest.mark.cuda
def test_device_mismatch(device):
    if device != "cuda":
        pytest.skip("needs a GPU")
    c = bad_base("contiguous")
    with pytest.raises(RuntimeError, match="start must be on cuda"):
        torch.ops.dspark.kv_commit(c["k_cache"].cuda(), c["v_cache"].cuda(),
                                   *[c[k] for k in ARGS])
    with pytest.raises(RuntimeError, match="v_cache must be on cuda"):
        torch.ops.dspark.kv_commit(c["k_cache"].cuda(), c["v_cache"],
                                   *[c[k].cuda() if c[k] is not None else None for k in ARGS])
