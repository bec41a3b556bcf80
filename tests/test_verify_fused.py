"""The fused CUDA verify/sample kernel (include/dspark/verify_fused.cuh) on inputs that exercise
its machinery: rows split over several blocks and slices, vocabularies at and around the vector
width and the 1024-entry warp chunk, unaligned rows (scalar loads), the residual blocks and their
tickets (draft_probs given), per-request counters across repeated launches and CUDA-graph replays,
and the fused kernel against the staged pipeline it replaces (dspark.ops._verify_impl).
Every case holds the kernel to dspark.reference like test_verify.py. Large vocabularies run on
CUDA only (the CPU kernel is the same code at every V and test_verify.py covers it)."""
import pytest
import torch

import dspark
from dspark import reference
from dspark.timing import capture_graph

from helpers import (
    assert_equal_outputs,
    make_batch,
    manual_batch,
    random_draft_lengths,
    random_logits,
    run_kernel,
    run_reference,
    sample_args,
)

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
NEG = -float("inf")
QWEN_V = 151936


@pytest.fixture(autouse=True)
def fused_impl():
    """Every CUDA verify / sample call here runs the fused kernel (the default, pinned here so
    that DSPARK_VERIFY_IMPL=staged in the environment cannot turn this suite into the staged
    one; test_fused_equals_staged switches explicitly for its comparison)."""
    with dspark.ops._verify_impl("fused"):
        yield


def cuda_only(device):
    if device != "cuda":
        pytest.skip("a CUDA-kernel shape (the CPU kernel does not split rows)")


def check(b, device, what=""):
    got = run_kernel(b, device)
    assert_equal_outputs(got, run_reference(b), what)
    return got


# ---- rows over several blocks, requests over several block counts --------------------------
# (R, gamma, V, dtype, q dtype, temperature): V = 151936 is 149 warp chunks = 19 slices per row;
# 8 * 1024 * 2 + 5 leaves a 5-entry last chunk in a third slice.
BIG = [
    (1, 1, QWEN_V, bf16, None, "greedy"),
    (1, 7, QWEN_V, bf16, f32, "sampled"),
    (3, 4, QWEN_V, f32, None, "mixed"),
    (13, 7, 8 * 1024 * 2 + 5, bf16, f32, "mixed"),
    (5, 7, 8 * 1024 * 2 + 8, f16, f64, 1.0),
    (2, 1, 40000, f32, f32, 0.7),
]


@pytest.mark.parametrize("case", BIG, ids=[f"R{c[0]}-g{c[1]}-V{c[2]}-{str(c[3])[6:]}-q{c[4]}-{c[5]}"
                                           for c in BIG])
def test_multi_slice_rows(device, gen, case):
    cuda_only(device)
    R, gamma, V, dtype, qd, temp = case
    b = make_batch(random_draft_lengths(R, gamma, gen), V, gen, dtype=dtype, q_dtype=qd,
                   temperature=temp, scale=4.0)
    check(b, device, str(case))


@pytest.mark.parametrize("V", [1, 2, 7, 8, 9, 1000, 1023, 1024, 1025, 8191, 8192, 8193])
@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=["f32", "bf16", "f16"])
def test_vocab_edges(device, gen, V, dtype):
    """V around the 16-byte vector width (4 or 8 entries), the warp chunk and the slice."""
    R = 7  # odd on purpose
    for qd, temp in ((None, "mixed"), (f32, "sampled")):
        b = make_batch(random_draft_lengths(R, 3, gen), V, gen, dtype=dtype, q_dtype=qd,
                       temperature=temp, top_k="random", top_p="random", mask_frac=0.2)
        check(b, device, f"V={V} q={qd}")


def offset_copy(t: torch.Tensor, elements: int) -> torch.Tensor:
    """A contiguous copy of t whose data starts `elements` past a fresh allocation (so its rows
    are not 16-byte aligned when elements * itemsize is not a multiple of 16)."""
    flat = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    out = flat[elements:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("dtype,qd", [(bf16, f32), (f32, f64), (f16, None)])
def test_unaligned_rows(device, gen, dtype, qd):
    """Logits and draft_probs starting off a 16-byte boundary: scalar loads, same tokens."""
    V = 4096
    b = make_batch(random_draft_lengths(9, 5, gen), V, gen, dtype=dtype, q_dtype=qd,
                   temperature="mixed")
    want = run_reference(b)
    d = b.to(device)
    moved = d.replace(target_logits=offset_copy(d.target_logits, 1),
                      draft_probs=None if qd is None else offset_copy(d.draft_probs, 1))
    got = tuple(t.cpu() for t in torch.ops.dspark.verify(*moved.args()))
    assert_equal_outputs(got, want)


# ---- accept paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [300, QWEN_V])
@pytest.mark.parametrize("with_q", [False, True])
def test_all_accepted_and_none_accepted(device, gen, V, with_q):
    """Chains of 7 drafts, R = 5: q = p and accept coins <= 0.5 accept every draft (the bonus is
    drawn from the last row); a draft masked out of its parent row (p = 0) is always rejected
    (the correction is drawn at the root, from the residual when q is given)."""
    if V == QWEN_V:
        cuda_only(device)
    R, n = 5, 8
    logits = random_logits(R * n, V, gen, scale=3.0)
    toks, q = [], torch.zeros(R * n, V, dtype=f64)
    for r in range(R):
        toks.append(0)
        for j in range(1, n):
            p = reference.target_probs(logits[r * n + j - 1], 1.0)
            toks.append(int(torch.multinomial(p, 1, generator=gen)))
            q[r * n + j] = p
    offsets = list(range(0, R * n + 1, n))
    u = torch.rand(R * n, generator=gen, dtype=f64) * 0.5
    b = manual_batch(logits, toks, draft_probs=q if with_q else None, accept_u=u, offsets=offsets,
                     sample_u=torch.rand(R * n, generator=gen, dtype=f64))
    if not with_q:  # one-hot drafts: accept iff u < p(x); make every draft the row's argmax
        for r in range(R):
            for j in range(1, n):
                b.target_logits[r * n + j - 1, toks[r * n + j]] = 50.0
    _, count, _ = check(b, device)
    assert count.tolist() == [n - 1] * R
    for r in range(R):  # now mask every first draft out of the root row
        b.target_logits[r * n, toks[r * n + 1]] = NEG
    out, count, nodes = check(b, device)
    assert count.tolist() == [0] * R and (out[:, 1:] == -1).all()
    assert all(out[r, 0] != toks[r * n + 1] for r in range(R))


@pytest.mark.parametrize("V", [1000, 50000])
def test_rejected_siblings_full_q(device, gen, V):
    """Trees whose root has 4 children drawn from one q, first ones often rejected: the walk
    re-totals residuals after each rejection and the residual blocks sum over several rejected
    q rows (the general residual path)."""
    if V > 1000:
        cuda_only(device)
    R = 6
    logits = random_logits(R * 6, V, gen, scale=2.0)
    parents = [-1, 0, 0, 0, 0, 1] * R
    q = torch.zeros(R * 6, V, dtype=f64)
    toks = []
    for r in range(R):
        qr = torch.softmax(torch.randn(V, generator=gen, dtype=f64) * 2, 0)
        toks += [0] + [int(torch.multinomial(qr, 1, generator=gen)) for _ in range(4)] + [1]
        q[r * 6 + 1:r * 6 + 5] = qr
        q[r * 6 + 5] = torch.softmax(torch.randn(V, generator=gen, dtype=f64), 0)
    b = manual_batch(logits, toks, parents, draft_probs=q, offsets=list(range(0, R * 6 + 1, 6)),
                     accept_u=torch.rand(R * 6, generator=gen, dtype=f64),
                     sample_u=torch.rand(R * 6, generator=gen, dtype=f64))
    check(b, device)


def test_wide_request(device, gen):
    """One request of 600 nodes (statistics blocks loop over more slices than there are
    blocks; node facts in the workspace, not shared memory) beside small ones."""
    b = make_batch([599, 0, 3, 1], 700, gen, layout="tree", q_dtype=f32, temperature="mixed")
    check(b, device)


def test_many_requests(device, gen):
    """Thousands of tickets, more blocks than fit on the GPU at once: R = 1501 small requests
    with full q (residual blocks waiting behind the statistics blocks) and without."""
    cuda_only(device)
    for qd in (None, f32):
        b = make_batch(random_draft_lengths(1501, 3, gen), 40, gen, q_dtype=qd, temperature="mixed",
                       randomness="uniforms")
        check(b, device, f"q={qd}")


def test_large_scaled_logits(device, gen):
    """T just above the greedy threshold: |t| far beyond 2^21, the per-entry formula."""
    b = make_batch(random_draft_lengths(5, 3, gen), 3000, gen, q_dtype=f64, temperature=1.5e-5,
                   scale=60.0)
    check(b, device)


def test_overflow_beside_masked_entry(device):
    """A finite logit whose w / T overflows, in the same lane as a -inf: bad input either way."""
    logits = torch.zeros(2, 64)
    logits[0, 3] = -3e38
    logits[0, 2] = NEG  # entries 0..3: one lane's 16-byte group on CUDA
    b = manual_batch(logits, [0, 1], temperature=0.5)
    with pytest.raises((RuntimeError, ValueError), match="logits"):
        run_kernel(b, device)


# ---- sample through the fused kernel ---------------------------------------------------------
@pytest.mark.parametrize("V", [5, 1031, QWEN_V])
@pytest.mark.parametrize("mode", ["greedy", "sampled", "topk_topp"])
def test_sample_large_and_odd(device, gen, V, mode):
    if V == QWEN_V:
        cuda_only(device)
    R = 11
    logits = random_logits(R, V, gen, scale=3.0, dtype=bf16)
    ks = torch.randint(0, min(V, 60) + 2, (R,), generator=gen) if mode == "topk_topp" else 0
    ps = (torch.rand(R, generator=gen) * 0.9 + 0.1) if mode == "topk_topp" else 1.0
    args = sample_args(logits, gen, temperature="greedy" if mode == "greedy" else "sampled",
                       top_k=ks, top_p=ps, randomness="keyed" if V > 5 else "uniforms")
    tok, probs = torch.ops.dspark.sample(*[None if a is None else a.to(device) for a in args],
                                         True)
    want_tok, want_probs = reference.sample(*args, return_probs=True)
    assert torch.equal(tok.cpu(), want_tok)
    torch.testing.assert_close(probs.cpu(), want_probs, rtol=0, atol=1e-12)


# ---- launches: repeated, captured, replayed; fused against staged -----------------------------
def verify_call(b):
    return torch.ops.dspark.verify(*b.args())


@pytest.mark.cuda
@pytest.mark.parametrize("qd", [None, f32])
def test_repeated_launches_and_replays(device, gen, qd):
    """The per-request counters and the ticket are cleared for every launch: eager calls
    repeat, and a captured graph replayed many times with new inputs gives each input's eager
    result (one graph per implementation)."""
    cuda_only(device)
    batches = [make_batch([7, 0, 3, 5, 2, 7, 1], 20000, gen, q_dtype=qd, temperature="mixed",
                          dtype=bf16, max_nodes=8) for _ in range(4)]
    cuda = [b.to("cuda") for b in batches]
    first = verify_call(cuda[0])
    for _ in range(3):
        for x, y in zip(verify_call(cuda[0]), first):
            assert torch.equal(x, y)
    assert_equal_outputs(tuple(t.cpu() for t in first), run_reference(batches[0]))
    for impl in ("fused", "staged"):
        with dspark.ops._verify_impl(impl):
            static = [a.clone() if isinstance(a, torch.Tensor) else a for a in cuda[0].args()]
            graph, outs = capture_graph(lambda: torch.ops.dspark.verify(*static))
            for rep in range(6):
                src = cuda[rep % len(cuda)]
                for dst, a in zip(static, src.args()):
                    if isinstance(dst, torch.Tensor):
                        dst.copy_(a)
                graph.replay()
                torch.cuda.synchronize()
                for got, want in zip(outs, verify_call(src)):
                    assert torch.equal(got, want), (impl, rep)


@pytest.mark.cuda
def test_sample_graph_replays(device, gen):
    cuda_only(device)
    logits = [random_logits(9, 5000, gen, dtype=bf16).cuda() for _ in range(3)]
    args = [a.cuda() if isinstance(a, torch.Tensor) else a
            for a in sample_args(logits[0].cpu(), gen, randomness="keyed")]
    static = [logits[0].clone(), *args[1:]]
    graph, (tok, probs) = capture_graph(lambda: torch.ops.dspark.sample(*static, True))
    for rep in range(5):
        static[0].copy_(logits[rep % 3])
        graph.replay()
        torch.cuda.synchronize()
        want_tok, want_probs = torch.ops.dspark.sample(logits[rep % 3], *args[1:], True)
        assert torch.equal(tok, want_tok) and torch.equal(probs, want_probs)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["chain", "tree"])
@pytest.mark.parametrize("qd", [None, f32, f64])
def test_fused_equals_staged(device, gen, layout, qd):
    cuda_only(device)
    b = make_batch(random_draft_lengths(23, 7, gen), 33000, gen, layout=layout, q_dtype=qd,
                   temperature="mixed", top_k="random", top_p="random", dtype=bf16,
                   mask_frac=0.1)
    fused = run_kernel(b, "cuda")
    with dspark.ops._verify_impl("staged"):
        staged = run_kernel(b, "cuda")
    assert_equal_outputs(fused, staged)
    assert_equal_outputs(fused, run_reference(b))
