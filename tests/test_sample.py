"""dspark::sample: kernel == reference, greedy tie rule, top-k / top-p supports, probs."""

import pytest
import torch

import dspark
from dspark import reference

from helpers import LOGIT_DTYPES, ONE_MINUS, random_logits, sample_args

NEG = -float("inf")


def sample_on(device, args, return_probs):
    """torch.ops.dspark.sample with the tensor arguments moved to device; outputs on CPU."""
    tok, probs = torch.ops.dspark.sample(*[None if a is None else a.to(device) for a in args],
                                         return_probs)
    return tok.cpu(), probs.cpu()


def run(device, logits, temperature=1.0, top_k=0, top_p=1.0, uniforms=None, seeds=None,
        positions=None, return_probs=True):
    logits = torch.as_tensor(logits, dtype=torch.float32) if not torch.is_tensor(logits) else logits
    R = logits.shape[0]
    if uniforms is None and seeds is None:
        uniforms = torch.full((R,), 0.5, dtype=torch.float64)
    elif uniforms is not None:
        uniforms = torch.as_tensor(uniforms, dtype=torch.float64).expand(R).contiguous()
    params = dspark.ops.sampling_tensors(R, temperature, top_k, top_p)
    return sample_on(device, [logits, *params, seeds, positions, uniforms], return_probs)


@pytest.mark.parametrize("V", [1, 7, 1000, 32003])
@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("mode", ["greedy", "sampled", "topk_topp"])
def test_kernel_equals_reference(device, gen, V, dtype, mode):
    R = 16 if V > 1000 else 64
    logits = random_logits(R, V, gen, scale=3.0, mask_frac=0.2 if mode == "sampled" else 0.0,
                           dtype=dtype)
    rnd = "keyed" if mode != "sampled" else "uniforms"
    ks = torch.randint(0, V + 2, (R,), generator=gen) if mode == "topk_topp" else 0
    ps = (torch.rand(R, generator=gen) * 0.95 + 0.05) if mode == "topk_topp" else 1.0
    args = sample_args(logits, gen, temperature="greedy" if mode == "greedy" else "sampled",
                       top_k=ks, top_p=ps, randomness=rnd)
    tok, probs = sample_on(device, args, True)
    want_tok, want_probs = reference.sample(*args, return_probs=True)
    assert torch.equal(tok, want_tok)
    assert probs.dtype == torch.float64 and probs.shape == (R, V)
    torch.testing.assert_close(probs, want_probs, rtol=0, atol=1e-12)
    tok_only, no_probs = sample_on(device, args, False)
    assert torch.equal(tok_only, want_tok) and no_probs.shape == (0, V)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=["f32", "bf16", "f16"])
def test_greedy_first_index_among_ties(device, dtype):
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [NEG, 0.0, 0.0, NEG],
                           [-1.0, NEG, -1.0, -2.0], [NEG, NEG, NEG, -7.0]], dtype=dtype)
    for T in (0.0, 9e-6):
        tok, probs = run(device, logits, T, top_k=2, top_p=0.5, uniforms=ONE_MINUS)
        assert tok.tolist() == [1, 0, 1, 0, 3]
        assert torch.equal(probs, torch.nn.functional.one_hot(tok, 4).double())


def test_greedy_tie_after_bf16_rounding(device):
    logits = torch.tensor([[1.0, 1.001, 0.5]])
    assert run(device, logits.bfloat16(), 0.0)[0].tolist() == [0]  # 1.0 and 1.001 round alike
    assert run(device, logits, 0.0)[0].tolist() == [1]


def support(probs):
    return torch.nonzero(probs[0] > 0).flatten().tolist()


@pytest.mark.parametrize("k", [1, 2, 5, 9, 10, 13, 0])
def test_top_k_support(device, gen, k):
    logits = torch.randperm(10, generator=gen).float().unsqueeze(0) * 0.3
    _, probs = run(device, logits, 1.0, top_k=k)
    order = torch.argsort(logits[0], descending=True)
    want = sorted(order[:k if 0 < k < 10 else 10].tolist())
    assert support(probs) == want


@pytest.mark.parametrize("k,want", [(2, [0, 1, 2]), (1, [0]), (3, [0, 1, 2]), (4, [0, 1, 2, 3])])
def test_top_k_keeps_ties_at_the_boundary(device, k, want):
    _, probs = run(device, [[3.0, 2.0, 2.0, 1.0]], 1.0, top_k=k)
    assert support(probs) == want


def test_top_k_with_masked_entries(device):
    _, probs = run(device, [[NEG, 1.0, NEG, 2.0, 0.0]], 1.0, top_k=3)  # k = number of finite
    assert support(probs) == [1, 3, 4]
    _, probs = run(device, [[NEG, 1.0, NEG, 2.0, 0.0]], 1.0, top_k=2)
    assert support(probs) == [1, 3]


P_HALVES = [0.125, 0.5, 0.125, 0.25]  # sorted: 0.5 (idx 1), 0.25 (3), 0.125 (0, 2: a tie)
P_TIES = [0.2, 0.4, 0.2, 0.2]


@pytest.mark.parametrize("probs,T,top_k,top_p,want", [
    (P_HALVES, 1.0, 0, 1e-6, [1]),
    (P_HALVES, 1.0, 0, 0.3, [1]),
    (P_HALVES, 1.0, 0, 0.6, [1, 3]),
    (P_HALVES, 1.0, 0, 0.8, [0, 1, 2, 3]),  # the 0.125 tie is kept together
    (P_HALVES, 1.0, 0, 0.9, [0, 1, 2, 3]),
    (P_TIES, 1.0, 0, 0.5, [0, 1, 2, 3]),  # 0.4 < 0.5: the whole 0.2 tie group joins
    (P_TIES, 1.0, 0, 0.35, [1]),
    (P_HALVES, 1.0, 2, 0.6, [1]),  # top-p is relative to the top-k mass: 0.5 / 0.75 >= 0.6
    (P_HALVES, 1.0, 2, 0.7, [1, 3]),
    (P_HALVES, 2.0, 0, 0.6, [1, 3]),  # T = 2: p ~ sqrt: cum 0.369, 0.630, then the tie
    (P_HALVES, 2.0, 0, 0.65, [0, 1, 2, 3]),
    (P_HALVES, 0.5, 0, 0.75, [1, 3]),  # T = 0.5: p ~ p^2: 0.727, 0.182 (cum 0.909), ...
    (P_HALVES, 0.5, 0, 0.95, [0, 1, 2, 3]),
])
def test_top_p_support(device, probs, T, top_k, top_p, want):
    logits = torch.tensor([probs]).log()
    tok, got = run(device, logits, T, top_k=top_k, top_p=top_p)
    assert support(got) == want and int(tok) in want
    assert abs(float(got.sum()) - 1.0) < 1e-12
    masked = torch.full_like(logits, NEG)
    masked[0, want] = logits[0, want]
    torch.testing.assert_close(got[0], torch.softmax(masked[0].double() / T, 0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("T", [0.3, 0.7, 1.0, 2.5])
def test_probs_match_softmax_and_sum_to_one(device, gen, T):
    logits = random_logits(32, 5000, gen, scale=2.0, mask_frac=0.1)
    tok, probs = run(device, logits, T, seeds=torch.arange(32), positions=torch.arange(32))
    torch.testing.assert_close(probs.sum(1), torch.ones(32, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    want = torch.softmax(logits.double() / T, -1)
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-300)
    assert (probs[torch.arange(32), tok] > 0).all()


def test_inverse_cdf_in_index_order(device):
    logits = [[NEG, 0.0, 0.0, NEG, 0.0]]
    for u, want in ((0.0, 1), (0.3, 1), (0.34, 2), (0.5, 2), (0.7, 4), (ONE_MINUS, 4)):
        assert run(device, logits, 1.0, uniforms=u)[0].tolist() == [want]
    # u * Z landing exactly on a CDF step (Z = 4, steps at 1, 2, 3) takes the next token.
    for u, want in ((0.25, 1), (0.5, 2), (0.75, 3)):
        assert run(device, [[0.0] * 4], 1.0, uniforms=u)[0].tolist() == [want]


def test_keyed_equals_uniforms_and_permutation(device, gen):
    logits = random_logits(64, 300, gen)
    args = sample_args(logits, gen, randomness="keyed")
    seeds, positions = args[4], args[5]
    tok, _ = sample_on(device, args, False)
    u = torch.tensor([reference.keyed_uniform(int(s), int(p), 0, 1)
                      for s, p in zip(seeds, positions)], dtype=torch.float64)
    assert torch.equal(sample_on(device, [*args[:4], None, None, u], False)[0], tok)
    perm = torch.randperm(64, generator=gen)
    permuted = [a[perm].contiguous() for a in args[:6]]
    assert torch.equal(sample_on(device, [*permuted, None], False)[0], tok[perm])
    reseeded = sample_on(device, [*args[:4], seeds + 7, positions, None], False)[0]
    assert not torch.equal(reseeded, tok)


F32_1E5 = float(torch.tensor(1e-5, dtype=torch.float32))  # kGreedyTemperature = 1e-5f
BELOW_1E5 = float(torch.nextafter(torch.tensor(1e-5), torch.tensor(0.0)))


@pytest.mark.parametrize("T,want", [(F32_1E5, 0), (BELOW_1E5, 1), (0.0, 1)])
def test_greedy_threshold(device, T, want):
    """Greedy iff T < 1e-5f (fp32): T = 1e-5f samples from p = softmax([0, 1.4427] * ln 2)."""
    logits = torch.tensor([[0.0, 1e-5]])  # at T = 1e-5: p = [0.269, 0.731]; argmax 1
    u = torch.tensor([0.1], dtype=torch.float64)
    assert run(device, logits, T, uniforms=u)[0].tolist() == [want]
    ref, _ = reference.sample(logits, *dspark.ops.sampling_tensors(1, T), None, None, u)
    assert ref.tolist() == [want]
