"""dspark::verify: kernel == reference exactly, edge cases with known answers, and invariants."""
import pytest
import torch

from dspark import reference

from helpers import (
    ONE_MINUS,
    assert_equal_outputs,
    keyed_uniforms,
    make_batch,
    manual_batch,
    permute_requests,
    random_draft_lengths,
    run_kernel,
    run_reference,
)

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
NEG = -float("inf")

# (R, gamma, V, layout, temperature, top_k, top_p, logits dtype, draft_probs dtype, randomness,
#  extra make_batch arguments)
CASES = [
    (1, 0, 7, "chain", "sampled", 0, 1.0, f32, None, "keyed", {}),
    (3, 1, 7, "chain", "greedy", 0, 1.0, bf16, None, "uniforms", {}),
    (64, 7, 7, "tree", "mixed", "random", "random", f32, f64, "keyed", {}),
    (64, 16, 7, "chain", "sampled", 0, 1.0, f16, f32, "uniforms", {"max_nodes": 20}),
    (3, 16, 1, "chain", "sampled", 0, 1.0, f32, f64, "keyed", {}),
    (64, 7, 1, "tree", "mixed", "random", "random", bf16, None, "uniforms", {}),
    (64, 1, 1000, "chain", "sampled", "random", "random", f32, f32, "keyed", {}),
    (64, 16, 1000, "tree", "sampled", 0, 0.9, bf16, f64, "keyed", {}),
    (3, 7, 1000, "tree", "greedy", 5, 1.0, f16, None, "keyed", {}),
    (64, 7, 1000, "chain", "mixed", "random", "random", f16, None, "uniforms", {"mask_frac": 0.3}),
    (1, 16, 1000, "tree", "sampled", 0, 1.0, f32, None, "uniforms", {"mask_frac": 0.5}),
    (64, 16, 1000, "chain", 1.0, 0, 1.0, f32, f64, "keyed", {"draft_noise": 0.05}),
    (64, 16, 32003, "chain", "mixed", "random", "random", f32, f32, "keyed", {}),
    (3, 16, 32003, "tree", "sampled", 50, 0.95, bf16, f64, "uniforms", {}),
    (64, 0, 32003, "chain", "sampled", "random", "random", f16, None, "keyed", {}),
    (1, 7, 32003, "tree", "greedy", 0, 1.0, bf16, f32, "keyed", {}),
    (64, 7, 32003, "tree", "sampled", 0, 1.0, f32, None, "keyed", {"mask_frac": 0.2}),
]


def _id(c):
    dt, qd = str(c[7])[6:], str(c[8])[6:]
    return f"R{c[0]}-g{c[1]}-V{c[2]}-{c[3]}-{c[4]}-k{c[5]}-p{c[6]}-{dt}-q{qd}-{c[9]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_equals_reference(case, device, gen):
    R, gamma, V, layout, temp, k, p, dtype, qd, rnd, extra = case
    b = make_batch(random_draft_lengths(R, gamma, gen), V, gen, layout=layout, temperature=temp,
                   top_k=k, top_p=p, dtype=dtype, q_dtype=qd, randomness=rnd, **extra)
    assert_equal_outputs(run_kernel(b, device), run_reference(b), _id(case))


@pytest.mark.parametrize("fuzz", range(64))
def test_kernel_equals_reference_fuzz(fuzz, device, gen):
    pick = lambda xs: xs[int(torch.randint(0, len(xs), (), generator=gen))]  # noqa: E731
    V, gamma = pick([2, 7, 33, 300]), pick([0, 1, 3, 7])
    b = make_batch(random_draft_lengths(pick([1, 3, 16]), gamma, gen), V, gen,
                   layout=pick(["chain", "tree"]), temperature=pick(["greedy", "sampled", "mixed"]),
                   top_k="random", top_p="random", dtype=pick([f32, bf16, f16]),
                   q_dtype=pick([None, f32, f64]), randomness=pick(["keyed", "uniforms"]),
                   scale=pick([0.5, 2.0, 6.0]), mask_frac=pick([0.0, 0.4]))
    assert_equal_outputs(run_kernel(b, device), run_reference(b), f"fuzz {fuzz}")


def check(b, device, tokens=None, count=None, nodes=None):
    """Kernel == reference, and == the expected values given."""
    got = run_kernel(b, device)
    assert_equal_outputs(got, run_reference(b))
    for want, g in zip((tokens, count, nodes), got):
        if want is not None:
            assert g.tolist() == want
    return got


def argmax_chain(logits):
    return [0] + [int(torch.argmax(torch.as_tensor(row))) for row in logits[:-1]]


@pytest.mark.parametrize("with_q", [False, True])
def test_all_accepted_greedy(device, gen, with_q):
    logits = torch.randn(6, 40, generator=gen)
    toks = argmax_chain(logits)
    q = torch.softmax(torch.randn(6, 40, generator=gen), -1) if with_q else None
    b = manual_batch(logits, toks, draft_probs=q, temperature=0.0, accept_u=ONE_MINUS)
    check(b, device, [toks[1:] + [int(logits[5].argmax())]], [5], [list(range(6))])


def test_all_accepted_one_hot_target(device, gen):
    V, toks = 12, [0, 3, 7, 7, 1]
    logits = torch.full((5, V), NEG)
    for i, t in enumerate(toks[1:] + [9]):
        logits[i, t] = float(i)  # row i is one-hot at the token drafted after node i
    q = torch.softmax(torch.randn(5, V, generator=gen), -1)
    b = manual_batch(logits, toks, draft_probs=q, accept_u=ONE_MINUS, sample_u=ONE_MINUS)
    check(b, device, [[3, 7, 7, 1, 9]], [4], [[0, 1, 2, 3, 4]])


def test_first_rejected_greedy(device):
    logits = [[0.0, 2.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]
    b = manual_batch(logits, [0, 2, 2], temperature=0.0, accept_u=0.0)
    check(b, device, [[1, -1, -1]], [0], [[0, -1, -1]])


def test_q_zero_always_accepted(device):
    logits = [[0.0, 1.0, 2.0], [3.0, NEG, NEG]]
    q = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.5]]  # node 1 drafted token 1 with q(1) = 0 < p(1)
    b = manual_batch(logits, [0, 1], draft_probs=q, accept_u=ONE_MINUS)
    check(b, device, [[1, 0]], [1], [[0, 1]])


@pytest.mark.parametrize("with_q", [False, True])
def test_p_zero_always_rejected(device, with_q):
    logits = [[1.0, NEG, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]]
    q = [[0.0] * 4, [0.1, 0.8, 0.05, 0.05]] if with_q else None
    p = reference.target_probs(torch.tensor(logits[0]), 1.0)
    resid = torch.clamp(p - torch.tensor(q[1], dtype=f64), min=0) if with_q else p  # p(1) = 0
    for u in (0.1, 0.6, 0.95):  # the correction: inverse CDF of the normalized residual
        want = int(torch.nonzero(torch.cumsum(resid / resid.sum(), 0) > u)[0])
        assert want != 1
        check(manual_batch(logits, [0, 1], draft_probs=q, accept_u=0.0, sample_u=u), device,
              [[want, -1]], [0], [[0, -1]])


def test_residual_vanishes_falls_back_to_target(device):
    """When the residual has no mass left, the final token is drawn from p itself."""
    # Greedy target (argmax 2); node 1 drafted token 0 from q one-hot at 2: residual = 0.
    b = manual_batch([[0.0, 1.0, 3.0], [0.0] * 3], [0, 0], draft_probs=[[0.0] * 3, [0.0, 0.0, 1.0]],
                     temperature=0.0, accept_u=0.0)
    check(b, device, [[2, -1]], [0], [[0, -1]])
    # Unnormalized q = 2p: accept iff u < 1/2; on rejection max(p - 2p, 0) = 0 everywhere.
    row = torch.tensor([0.5, -1.0, 2.0, 0.0])
    p = reference.target_probs(row, 1.0)
    for su in (0.1, 0.5, 0.9):
        b = manual_batch(torch.stack([row, row]), [0, 2], draft_probs=torch.stack([p, 2 * p]),
                         accept_u=0.7, sample_u=su)
        want = int(torch.nonzero(torch.cumsum(p, 0) > su)[0])
        check(b, device, [[want, -1]], [0], [[0, -1]])


@pytest.mark.parametrize("T", [1e-5, 0.0])
def test_greedy_threshold(device, T):
    """T = 1e-5 (fp32) is not greedy (greedy iff T < 1e-5f): tied logits split the mass."""
    b = manual_batch([[1.0, 1.0, 0.0], [0.0] * 3], [0, 2], temperature=T, accept_u=0.0,
                     sample_u=0.9)
    check(b, device, [[0 if T == 0.0 else 1, -1]], [0], [[0, -1]])


def test_top_k_excluded_draft_rejected(device):
    logits = [[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    b = manual_batch(logits, [0, 2], top_k=2, accept_u=0.0, sample_u=ONE_MINUS)
    check(b, device, [[1, -1]], [0], [[0, -1]])


@pytest.mark.parametrize("same", [False, True])
def test_one_hot_rows(device, same):
    logits = [[NEG, NEG, 4.0, NEG], [NEG, 1.0, NEG, NEG]]
    q = [[0.0] * 4, [0.0, 0.0, 1.0, 0.0] if same else [1.0, 0.0, 0.0, 0.0]]
    b = manual_batch(logits, [0, 2 if same else 0], draft_probs=q, accept_u=0.5)
    if same:
        check(b, device, [[2, 1]], [1], [[0, 1]])
    else:
        check(b, device, [[2, -1]], [0], [[0, -1]])


def test_duplicate_sibling_tokens(device):
    logits = [[1.0, 1.5, 0.5, 1.0]] + [[0.0] * 4] * 3
    # Root with children [1, 1, 3]: the first 1 is rejected, so the duplicate (coin 0) must be.
    b = manual_batch(logits, [0, 1, 1, 3], [-1, 0, 0, 0], accept_u=[0.0, ONE_MINUS, 0.0, ONE_MINUS],
                     sample_u=0.0)
    check(b, device, [[0, -1, -1, -1]], [0], [[0, -1, -1, -1]])


@pytest.mark.parametrize("with_q", [False, True])
def test_duplicate_sibling_tokens_random(device, gen, with_q):
    V, R = 5, 64
    logits = torch.randn(R * 4, V, generator=gen)
    toks = torch.randint(0, 2, (R * 4,), generator=gen)  # siblings often share a token
    q = torch.softmax(torch.randn(R * 4, V, generator=gen), -1) if with_q else None
    b = manual_batch(logits, toks, [-1, 0, 0, 0] * R, draft_probs=q, offsets=range(0, 4 * R + 1, 4),
                     accept_u=torch.rand(4 * R, generator=gen, dtype=f64),
                     sample_u=torch.rand(4 * R, generator=gen, dtype=f64))
    check(b, device)


@pytest.mark.parametrize("layout", ["chain", "tree"])
@pytest.mark.parametrize("qd", [None, f64])
def test_invariants(device, gen, layout, qd):
    b = make_batch(random_draft_lengths(64, 7, gen), 50, gen, layout=layout, q_dtype=qd,
                   temperature="mixed", top_k="random", top_p="random", mask_frac=0.3)
    toks, count, nodes = run_kernel(b, device)
    off, par = b.node_offsets.tolist(), b.parents.tolist()
    for r in range(b.num_requests):
        n, c = off[r + 1] - off[r], int(count[r])
        assert 0 <= c <= n - 1
        assert (toks[r, c + 1:] == -1).all() and (nodes[r, c + 1:] == -1).all()
        path = nodes[r, :c + 1].tolist()
        assert path[0] == off[r]
        for k in range(1, c + 1):
            assert par[path[k]] == path[k - 1] - off[r], "accept_nodes is not a root-to-node path"
            assert toks[r, k - 1] == b.draft_tokens[path[k]]
        last = reference.target_probs(b.target_logits[path[c]], float(b.temperature[r]),
                                      int(b.top_k[r]), float(b.top_p[r]))
        assert last[int(toks[r, c])] > 0, "final token outside the target's support"


@pytest.mark.parametrize("dead_first", [False, True])
def test_chain_embedded_in_tree(device, gen, dead_first):
    """A chain plus a dead branch (root child with p = 0, one-hot drafts) == the chain alone."""
    V, dead_tok = 20, 5
    if dead_first:  # nodes: root, dead (1), dead child (2), chain 1..6 (-> 3..8)
        order, parents = [0, None, None, 1, 2, 3, 4, 5, 6], [-1, 0, 1, 0, 3, 4, 5, 6, 7]
    else:  # nodes: root, chain 1..6, dead (7), dead child (8)
        order, parents = [0, 1, 2, 3, 4, 5, 6, None, None], [-1, 0, 1, 2, 3, 4, 5, 0, 7]
    remap = torch.tensor([order.index(i) for i in range(7)])  # chain node -> tree node
    accepted = []
    for _ in range(12):
        chain = make_batch([6], V, gen, temperature=1.0, randomness="uniforms", scale=5.0)
        chain.target_logits[0, dead_tok] = NEG
        lg, tk, u = chain.target_logits, chain.draft_tokens.tolist(), chain.uniforms
        dead = iter([(torch.zeros(V), dead_tok), (torch.zeros(V), 2)])
        rows, toks, us = [], [], []
        for o in order:
            row, tok = next(dead) if o is None else (lg[o], tk[o])
            rows.append(row), toks.append(tok)
            us.append(torch.rand(2, generator=gen, dtype=f64) if o is None else u[o])
        tree = chain.replace(target_logits=torch.stack(rows), draft_tokens=torch.tensor(toks),
                             parents=torch.tensor(parents), uniforms=torch.stack(us),
                             node_offsets=torch.tensor([0, 9]), max_nodes=9)
        ct, cc, cn = check(chain, device)
        tt, tc, tn = check(tree, device)
        assert torch.equal(tt[:, :7], ct) and (tt[:, 7:] == -1).all() and torch.equal(tc, cc)
        assert torch.equal(tn[0, :int(cc) + 1], remap[cn[0, :int(cc) + 1]])
        accepted.append(int(cc))
    assert min(accepted) == 0 and max(accepted) >= 2, accepted  # both paths were exercised


def test_root_token_ignored(device, gen):
    b = make_batch([3, 0, 5], 30, gen, temperature="mixed")
    want = run_kernel(b, device)
    for root_tok in (-1, 29, 10**9):
        toks = b.draft_tokens.clone()
        toks[b.node_offsets[:-1]] = root_tok
        assert_equal_outputs(run_kernel(b.replace(draft_tokens=toks), device), want)


@pytest.mark.parametrize("layout", ["chain", "tree"])
def test_batch_permutation_invariance(device, gen, layout):
    b = make_batch(random_draft_lengths(16, 7, gen), 100, gen, layout=layout, q_dtype=f32,
                   temperature="mixed", top_k="random", top_p="random")
    perm = torch.randperm(16, generator=gen).tolist()
    pb = permute_requests(b, perm)
    toks, count, nodes = run_kernel(b, device)
    ptoks, pcount, pnodes = run_kernel(pb, device)
    assert torch.equal(ptoks, toks[perm]) and torch.equal(pcount, count[perm])
    shift = (pb.node_offsets[:-1] - b.node_offsets[:-1][perm]).unsqueeze(1)
    assert torch.equal(pnodes, torch.where(nodes[perm] >= 0, nodes[perm] + shift, -1))


def test_seed_reproducibility(device, gen):
    b = make_batch(random_draft_lengths(64, 7, gen), 1000, gen, layout="tree", q_dtype=f64)
    first = run_kernel(b, device)
    assert_equal_outputs(run_kernel(b, device), first)
    other = run_kernel(b.replace(seeds=b.seeds + 1), device)
    assert not torch.equal(other[0], first[0])
    moved = run_kernel(b.replace(positions=b.positions + 1), device)
    assert not torch.equal(moved[0], first[0])


@pytest.mark.parametrize("qd", [None, f64])
def test_keyed_equals_uniform_table(device, gen, qd):
    b = make_batch(random_draft_lengths(16, 7, gen), 200, gen, layout="tree", q_dtype=qd)
    table = b.replace(seeds=None, positions=None, uniforms=keyed_uniforms(b))
    assert_equal_outputs(run_kernel(table, device), run_kernel(b, device))


@pytest.mark.parametrize("randomness", ["keyed", "uniforms"])
def test_zero_drafts_equals_sample(device, gen, randomness):
    b = make_batch([0] * 64, 500, gen, temperature="mixed", top_k="random", top_p="random",
                   randomness=randomness, dtype=bf16)
    toks, count, nodes = run_kernel(b, device)
    u = None if b.uniforms is None else b.uniforms[:, 1].contiguous()
    d = b.to(device)
    sampled, _ = torch.ops.dspark.sample(d.target_logits, d.temperature, d.top_k, d.top_p, d.seeds,
                                         d.positions, None if u is None else u.to(device), False)
    assert torch.equal(toks[:, 0], sampled.cpu()) and (count == 0).all()
    assert torch.equal(nodes[:, 0], b.node_offsets[:-1])


def test_readme_ops_example_runs_as_written():
    """The README's `verify` example defines every variable it uses and runs as written."""
    import os
    import re
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(readme) as f:
        block = re.search(r"```python\n(import torch, dspark\n.*?)```", f.read(), re.S).group(1)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    res = scope["res"]
    assert res.out_tokens.shape == (3, 4) and res.accept_count.shape == (3,)
    assert (res.out_tokens[:, 0] >= 0).all() and (res.accept_count <= torch.tensor([3, 0, 2])).all()
