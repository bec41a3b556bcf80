"""Statistical exactness: verify's emitted tokens follow the target distribution.

Every test uses fixed seeds (deterministic) and rejects at p < ALPHA with a chi-square
goodness-of-fit test. The requests of one call are identical draft trees over a small vocabulary,
drafted independently per request, with keyed randomness (one seed per request).

The target model is a table: the row after a node at depth l with token x is L[l][x], so the
second token's target given the first token y1 is p2[y1] = target_probs(L[1][y1]) whichever node
emitted y1. When verify emits only one token (first draft rejected), the test draws the second
token the way the next decode step would: from p2[y1].
"""
import zlib

import numpy as np
import pytest
import torch
from scipy import stats

from dspark.reference import target_probs

ALPHA = 1e-3
V = 8
N_FAST, N_SLOW = 100_000, 1_000_000
CHUNK = 250_000
# Per structure: parents (local), depth of each node. Node 0 is the root.
STRUCTURES = {
    "chain": ([-1, 0, 1, 2], [0, 1, 2, 3]),
    "tree_iid": ([-1, 0, 0, 1, 3], [0, 1, 1, 2, 3]),  # root: 2 iid children from q1
    "tree_iid3": ([-1, 0, 0, 0, 1, 4], [0, 1, 1, 1, 2, 3]),  # root: 3 iid children
    "tree_topk": ([-1, 0, 0, 0, 1, 4], [0, 1, 1, 1, 2, 3]),  # top-3 of q1, no draft_probs
}


def chi2_pvalue(observed, expected):
    """Pearson chi-square over groups of cells (each group's expected sums to its count).

    Cells of zero probability must be empty; cells expecting < 5 are merged within a group.
    """
    stat, dof = 0.0, 0
    for o, e in zip(observed, expected):
        o, e = np.asarray(o, dtype=np.float64), np.asarray(e, dtype=np.float64)
        assert o[e == 0].sum() == 0, f"tokens of zero target probability were emitted: {o} vs {e}"
        o, e = o[e > 0], e[e > 0]
        small = e < 5
        if small.sum() > 1:
            o = np.append(o[~small], o[small].sum())
            e = np.append(e[~small], e[small].sum())
        stat += float(((o - e) ** 2 / e).sum())
        dof += len(o) - 1
    assert dof > 0
    return float(stats.chi2.sf(stat, dof))


def first_token_pvalue(tokens, p):
    return chi2_pvalue([np.bincount(tokens, minlength=V)], [len(tokens) * p])


def draw(rng, probs):
    """One token per row of probs [n, V] (inverse CDF; zero-probability entries never drawn)."""
    cdf = np.cumsum(probs, 1)
    u = rng.random(len(probs)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(1), V - 1)


def random_q(rng, rows):
    q = np.exp(rng.standard_normal((rows, V)) * 1.5)
    q[np.arange(rows), rng.integers(0, V, rows)] = 0.0  # q(x) = 0 somewhere (p(x) may be > 0)
    return q / q.sum(1, keepdims=True)


class Model:
    """Target tables L[depth][token] -> logits, draft tables Q[depth][parent token] -> q."""

    def __init__(self, seed, T, top_k, top_p):
        rng = np.random.default_rng(seed)
        self.L = [rng.standard_normal((1, V))] + [rng.standard_normal((V, V)) for _ in range(3)]
        self.Q = [None, random_q(rng, 1)] + [random_q(rng, V) for _ in range(2)]
        self.params = (T, top_k, top_p)
        self.p1 = self.probs(self.L[0][0])
        self.p2 = np.stack([self.probs(row) for row in self.L[1]])
        assert (self.p1 > 0).sum() >= 3, "degenerate target: pick another model seed"

    def probs(self, logits_row):
        return target_probs(torch.tensor(logits_row, dtype=torch.float32), *self.params).numpy()

    def verify(self, structure, n, rng, device, seed0, drafted_from=None):
        """n identical requests with independent drafts; returns out_tokens, accept_count.

        drafted_from: draft tables to draw tokens from instead of self.Q (verify is still told
        self.Q: a misreporting drafter)."""
        parents, depth = STRUCTURES[structure]
        m = len(parents)
        toks = np.zeros((n, m), dtype=np.int64)
        qrows = np.zeros((n, m, V))
        for j in range(1, m):
            par_tok = toks[:, parents[j]] if depth[j] > 1 else np.zeros(n, dtype=np.int64)
            qrows[:, j] = self.Q[depth[j]][par_tok]
            if structure == "tree_topk":  # deterministic: the k-th most likely token of q
                rank = j - 1 if depth[j] == 1 else 0
                toks[:, j] = np.argsort(-qrows[:, j], axis=1, kind="stable")[:, rank]
            else:
                src = qrows[:, j] if drafted_from is None else drafted_from[depth[j]][par_tok]
                toks[:, j] = draw(rng, src)
        logits = np.stack([self.L[d][toks[:, j]] if d else np.broadcast_to(self.L[0][0], (n, V))
                           for j, d in enumerate(depth)], 1)
        T, k, p = self.params
        args = [torch.tensor(logits.reshape(n * m, V), dtype=torch.float32),
                torch.arange(0, n * m + 1, m), torch.tensor(toks.reshape(-1)),
                torch.tensor(parents * n),
                None if structure == "tree_topk" else torch.tensor(qrows.reshape(n * m, V)),
                torch.full((n,), T, dtype=torch.float32), torch.full((n,), k),
                torch.full((n,), p, dtype=torch.float32),
                torch.arange(seed0, seed0 + n), torch.full((n,), 1234), None]
        args = [None if a is None else a.to(device) for a in args]
        out, count, _ = torch.ops.dspark.verify(*args, m)
        return out.cpu().numpy(), count.cpu().numpy()

    def first_two(self, structure, n, device, seed):
        """(y1, y2) for n requests; y2 from p2[y1] where verify emitted a single token."""
        rng = np.random.default_rng(seed)
        y1, y2 = [], []
        for c in range(0, n, CHUNK):
            out, count = self.verify(structure, min(CHUNK, n - c), rng, device, seed * 10**7 + c)
            nxt = np.where(count >= 1, out[:, 1], draw(rng, self.p2[out[:, 0]]))
            y1.append(out[:, 0])
            y2.append(nxt)
        return np.concatenate(y1), np.concatenate(y2)


SETTINGS = [(T, k, p) for T in (0.5, 1.0, 1.5) for k, p in ((0, 1.0), (0, 0.9))] + [(1.0, 4, 0.9)]


def check_first_two(structure, T, k, p, n, device):
    model = Model(seed=zlib.crc32(repr((structure, T, k, p)).encode()), T=T, top_k=k, top_p=p)
    y1, y2 = model.first_two(structure, n, device, seed=int(T * 10 + k + p * 100))
    assert first_token_pvalue(y1, model.p1) >= ALPHA
    joint = [np.bincount(y2[y1 == x], minlength=V) for x in range(V)]
    expected = [np.bincount(y1, minlength=V)[x] * model.p2[x] for x in range(V)]
    assert chi2_pvalue([np.concatenate(joint)], [np.concatenate(expected)]) >= ALPHA


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("T,k,p", SETTINGS)
def test_first_two_tokens_follow_target(device, structure, T, k, p):
    check_first_two(structure, T, k, p, N_FAST, device)


@pytest.mark.slow
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("T,k,p", SETTINGS)
def test_first_two_tokens_follow_target_1e6(device, structure, T, k, p):
    check_first_two(structure, T, k, p, N_SLOW, device)


@pytest.mark.parametrize("T,k,p", [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.5, 0, 0.7)])
@pytest.mark.parametrize("n", [N_FAST, pytest.param(N_SLOW, marks=pytest.mark.slow)])
def test_sample_follows_target(device, T, k, p, n):
    rng = np.random.default_rng(7)
    logits = torch.tensor(rng.standard_normal(V) * 1.5, dtype=torch.float32)
    args = [logits.expand(n, V).contiguous(), torch.full((n,), T), torch.full((n,), k),
            torch.full((n,), p), torch.arange(n) * 7919 - 5, torch.full((n,), 99), None]
    tok, _ = torch.ops.dspark.sample(*[None if a is None else a.to(device) for a in args], False)
    assert first_token_pvalue(tok.cpu().numpy(), target_probs(logits, T, k, p).numpy()) >= ALPHA


# ---- teeth: the same test rejects wrong samplers -------------------------------------------
def inverse_cdf(rows, u):
    cdf = np.cumsum(rows, 1)
    return np.minimum((cdf <= (u * cdf[:, -1])[:, None]).sum(1), V - 1)


def numpy_tree_verify(rng, p, q, n, children, bug=None):
    """First token of recursive rejection sampling over `children` iid drafts x_i ~ q (numpy).

    bug: None (correct); "correction_from_p" (the classic mistake: resample from p, not from the
    residual); "siblings_vs_p" (each sibling tested against p instead of the residual);
    "coin_reuse" (the last accept coin reused to draw the correction)."""
    resid = np.tile(p, (n, 1))
    out = np.full(n, -1)
    for _ in range(children):
        x = draw(rng, np.broadcast_to(q, (n, V)))
        u = rng.random(n)
        against = np.tile(p, (n, 1)) if bug == "siblings_vs_p" else resid
        z = against.sum(1)
        accept = (out < 0) & (u * q[x] * z < against[np.arange(n), x])
        out[accept] = x[accept]
        resid = np.maximum(resid - q[None, :] * z[:, None], 0.0)
    empty = resid.sum(1) == 0
    resid[empty] = p  # the residual vanished: p itself
    fix = inverse_cdf(np.tile(p, (n, 1)) if bug == "correction_from_p" else resid,
                      u if bug == "coin_reuse" else rng.random(n))
    return np.where(out >= 0, out, fix)


@pytest.mark.parametrize("bug,children", [(None, 1), (None, 3), ("correction_from_p", 1),
                                          ("siblings_vs_p", 2), ("coin_reuse", 1)])
def test_teeth_numpy_samplers(bug, children):
    """The correct numpy sampler passes the chi-square test and each wrong one is rejected."""
    model = Model(seed=3, T=1.0, top_k=0, top_p=1.0)
    p, q = model.p1, model.Q[1][0]
    tokens = numpy_tree_verify(np.random.default_rng(11), p, q, N_FAST, children, bug=bug)
    pvalue = first_token_pvalue(tokens, p)
    assert pvalue >= ALPHA if bug is None else pvalue < ALPHA


def test_teeth_rejects_misreported_draft_probs(device):
    """Drafts drawn from one q but verify told another: the output is no longer p."""
    model = Model(seed=5, T=1.0, top_k=0, top_p=1.0)
    real = [None] + [random_q(np.random.default_rng(d), len(model.Q[d])) for d in (1, 2, 3)]
    out, _ = model.verify("chain", N_FAST, np.random.default_rng(2), device, 0, drafted_from=real)
    assert first_token_pvalue(out[:, 0], model.p1) < ALPHA
    out, _ = model.verify("chain", N_FAST, np.random.default_rng(2), device, 0)
    assert first_token_pvalue(out[:, 0], model.p1) >= ALPHA  # control: honest drafter
