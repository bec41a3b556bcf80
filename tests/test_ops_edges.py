"""The ops' contract at its edges (issue 15): greedy calls need no randomness, empty batches,
what verify ignores (the root's token and draft_probs row), wrapper errors that name the
argument, and data-check messages that list only what the input has."""
import os

import pytest
import torch

import dspark

from helpers import make_batch, run_reference

ERRORS = (RuntimeError, ValueError, TypeError)


def greedy_batch(V=7, seed=0, **kw):
    return make_batch([3, 0, 2], V, torch.Generator().manual_seed(seed), temperature="greedy",
                      **kw)


@pytest.mark.parametrize("q_dtype", [None, torch.float32])
def test_greedy_verify_needs_no_randomness(device, q_dtype):
    """All-greedy: neither seeds/positions nor uniforms; the result is the keyed call's."""
    b = greedy_batch(q_dtype=q_dtype)
    keyed = torch.ops.dspark.verify(*b.to(device).args())
    bare = b.replace(seeds=None, positions=None)
    got = torch.ops.dspark.verify(*bare.to(device).args())
    for g, k, r in zip(got, keyed, run_reference(bare)):
        assert torch.equal(g.cpu(), k.cpu()) and torch.equal(g.cpu(), r)
    res = dspark.ops.verify(*[getattr(bare, n) for n in ("target_logits", "node_offsets",
                                                         "draft_tokens", "parents",
                                                         "draft_probs")],
                            dspark.ops.sampling_tensors(3, 0.0))
    assert torch.equal(res.out_tokens, got[0].cpu())


def test_greedy_sample_needs_no_randomness(device):
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(1)).to(device)
    tok, probs = dspark.ops.sample(logits, dspark.ops.sampling_tensors(5, 0.0, device=device),
                                   return_probs=True)
    assert torch.equal(tok.cpu(), logits.argmax(-1).cpu())
    assert torch.equal(probs.cpu(), torch.nn.functional.one_hot(tok.cpu(), 11).double())


@pytest.mark.parametrize("op", ["verify", "sample"])
def test_sampled_request_without_randomness_names_it(device, op):
    """One sampled request among greedy ones: the error says randomness is needed, and only
    that."""
    temps = [0.0, 0.7, 0.0]
    params = dspark.ops.sampling_tensors(3, temps, device=device)
    with pytest.raises(ValueError, match="needs randomness") as err:
        if op == "sample":
            dspark.ops.sample(torch.randn(3, 5, device=device), params)
        else:
            b = greedy_batch().to(device)
            dspark.ops.verify(b.target_logits, b.node_offsets, b.draft_tokens, b.parents, None,
                              params)
    assert "temperature must" not in str(err.value)


def test_empty_batch_every_op(device):
    """R = 0 on every op: empty results of the documented shapes, no launch of an empty grid."""
    V = 6
    empty_params = dspark.ops.sampling_tensors(0, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    res = dspark.ops.verify(torch.zeros(0, V, device=device), torch.zeros(1, **i64),
                            torch.zeros(0, **i64), torch.zeros(0, **i64), None, empty_params,
                            max_nodes=4)
    assert [tuple(t.shape) for t in res] == [(0, 4), (0,), (0, 4)]
    for randomness in ({}, {"seeds": torch.zeros(0, **i64), "positions": torch.zeros(0, **i64)},
                       {"uniforms": torch.zeros(0, dtype=torch.float64, device=device)}):
        tok, probs = dspark.ops.sample(torch.zeros(0, V, device=device), empty_params,
                                       return_probs=True, **randomness)
        assert tok.shape == (0,) and probs.shape == (0, V)
    out = dspark.ops.fused_linear(torch.zeros(0, 8, device=device), torch.randn(4, 8).to(device))
    assert out.shape == (0, 4)
    qkv = torch.zeros(0, (2 + 2) * 8, device=device)
    cache = torch.zeros(1, 0, 1, 4, 8, device=device)
    att = dspark.ops.decode_attention(qkv, cache, cache.clone(), 0, torch.zeros(0, **i64),
                                      torch.ones(4, device=device), 2)
    assert att.shape == (0, 16)
    drafts = dspark.ops.ngram_propose(torch.zeros(0, 8, **i64), torch.zeros(0, **i64), 3)
    assert drafts.shape == (0, 4)
    rounds, any_active = torch.zeros((), **i64), torch.ones((), dtype=torch.bool, device=device)
    dspark.ops.commit_tokens(torch.zeros(0, 8, **i64), torch.zeros(0, **i64),
                             torch.zeros(0, dtype=torch.bool, device=device),
                             torch.zeros(0, 2, **i64), torch.zeros(0, **i64),
                             torch.zeros(0, 1, **i64), torch.zeros(0, **i64),
                             torch.zeros(0, **i64), torch.zeros(2, 0, dtype=torch.bool,
                                                                 device=device),
                             torch.zeros(2, 0, **i64), rounds, any_active)
    assert int(rounds) == 1 and not bool(any_active)
    conf, lengths = torch.zeros(0, 3, device=device), torch.zeros(0, **i64)
    sps = torch.ones(4, device=device)
    assert dspark.ops.schedule_prefix(conf, lengths, sps).shape == (0,)
    assert int(dspark.ops.schedule_budget(conf, lengths, sps)) == 0
    kv = torch.zeros(1, 0, 1, 4, 8, device=device)
    res = dspark.ops.kv_commit(kv, kv.clone(), torch.zeros(0, **i64), torch.zeros(0, 3, **i64),
                               torch.zeros(0, **i64), torch.zeros(1, **i64))
    assert res.lengths.shape == (0,) and res.freed_pages.shape[0] == 0
    draft = dspark.ops.markov_draft(torch.zeros(0, 3, V, device=device), torch.zeros(0, **i64),
                                    torch.zeros(V, 2, device=device),
                                    torch.zeros(2, V, device=device), empty_params,
                                    torch.zeros(0, **i64), torch.zeros(0, **i64),
                                    return_probs=True)
    assert draft.tokens.shape == (0, 3) and draft.probs.shape == (0, 3, V)


def test_empty_batch_needs_empty_rows():
    with pytest.raises(ValueError, match="node_offsets gives no request"):
        dspark.ops.verify(torch.zeros(2, 5), torch.zeros(1, dtype=torch.int64),
                          torch.zeros(2, dtype=torch.int64), torch.tensor([-1, -1]), None,
                          dspark.ops.sampling_tensors(0))


@pytest.mark.parametrize("root", [-1, 10**12, -(2**63)])
def test_root_token_and_root_q_row_are_not_read(device, root):
    """The root's draft token and draft_probs row are documented as ignored: garbage there
    (-1, out of range, NaN probabilities) gives the same result as the anchor token."""
    b = make_batch([3, 2], 9, torch.Generator().manual_seed(5), q_dtype=torch.float64)
    want = torch.ops.dspark.verify(*b.to(device).args())
    roots = b.node_offsets[:-1]
    tokens, q = b.draft_tokens.clone(), b.draft_probs.clone()
    tokens[roots] = root
    q[roots] = float("nan")
    got = torch.ops.dspark.verify(*b.replace(draft_tokens=tokens, draft_probs=q).to(device)
                                  .args())
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.cpu())


def test_a_non_root_minus_one_token_is_rejected(device):
    b = make_batch([3], 9, torch.Generator().manual_seed(6))
    tokens = b.draft_tokens.clone()
    tokens[2] = -1
    with pytest.raises(ValueError, match="draft_tokens"):
        torch.ops.dspark.verify(*b.replace(draft_tokens=tokens).to(device).args())


@pytest.mark.parametrize("temperature", ["greedy", "sampled"])
@pytest.mark.parametrize("V", [1, 3, 700])
def test_nan_row_is_reported_as_nan_only(device, temperature, V):
    """A row holding NaN (and otherwise -inf) is bad logits; the message must not also claim
    the row is all -inf."""
    b = make_batch([1], V, torch.Generator().manual_seed(7), temperature=temperature)
    logits = b.target_logits.clone()
    logits[0] = -float("inf")
    logits[0, V // 2] = float("nan")
    with pytest.raises(ValueError, match="NaN") as err:
        torch.ops.dspark.verify(*b.replace(target_logits=logits).to(device).args())
    assert "-inf" not in str(err.value).replace("+inf", "")


@pytest.mark.parametrize("offsets", [torch.tensor(3), torch.zeros(0, dtype=torch.int64),
                                     torch.zeros(1, dtype=torch.int64).expand(10**12),
                                     torch.tensor([0.0, 2.0]), torch.tensor([[0, 2]])])
def test_verify_wrapper_names_node_offsets(offsets):
    """What the wrapper reads to size the output must not fail on its own terms (or allocate
    terabytes for a stride-0 view): the op's check names node_offsets."""
    logits = torch.zeros(2, 4)
    with pytest.raises(ERRORS, match="node_offsets"):
        dspark.ops.verify(logits, offsets, torch.zeros(2, dtype=torch.int64),
                          torch.tensor([-1, 0]), None, dspark.ops.sampling_tensors(1, 0.0))


@pytest.mark.parametrize("x,residual,match", [
    (torch.tensor(1.0), None, "x must be"),
    (torch.zeros(2, 3, 8), torch.zeros(3, 2, 4), "residual"),
    (torch.zeros(2, 3, 8), torch.tensor(0.0), "residual"),
    # stride-0 views of 3 * 10^12 rows: refused before the wrapper's reshape copies terabytes
    # (found by the fuzz tests under memcheck on an H100: a CUDA out-of-memory, 2026-12-06)
    (torch.zeros(1, 3, 8).expand(10**12, 3, 8), None, "x has 3000000000000 rows"),
    (torch.zeros(3, 1, 8).expand(3, 10**12, 8), None, "x has 3000000000000 rows"),
])
def test_fused_linear_wrapper_names_the_argument(x, residual, match):
    with pytest.raises(ERRORS, match=match):
        dspark.ops.fused_linear(x, torch.zeros(4, 8), residual=residual)


def test_fused_linear_wrapper_keeps_leading_dims():
    x, w = torch.randn(2, 3, 8), torch.randn(4, 8)
    assert dspark.ops.fused_linear(x, w).shape == (2, 3, 4)
    assert dspark.ops.fused_linear(x[0, 0], w).shape == (4,)
    assert dspark.ops.fused_linear(torch.zeros(0, 3, 8), w).shape == (0, 3, 4)


def test_cuda_kernel_switch_from_environment():
    """DSPARK_CUDA_KERNELS=name,... turns callers' use of those CUDA kernels on for a process
    (since 2026-12-07 every entry is on by default: naming one is accepted and changes nothing);
    an unknown name is a clear error at import, not a silent no-op."""
    import subprocess
    import sys
    code = "import dspark.ops as o; print(sorted(k for k, v in o.CUDA_KERNEL_TESTED.items() if v))"
    env = {k: v for k, v in os.environ.items() if k != "DSPARK_CUDA_KERNELS"}
    base = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**env, "DSPARK_CUDA_KERNELS": "markov_draft"})
    assert base.returncode == 0 and base.stdout.split() == ["['kv_commit',", "'markov_draft']"]
    assert on.returncode == 0 and on.stdout == base.stdout
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "DSPARK_CUDA_KERNELS": "kv_comit"})
    assert bad.returncode != 0 and "DSPARK_CUDA_KERNELS: unknown op 'kv_comit'" in bad.stderr
