"""dspark::markov_draft (DSpark's sequential draft stage): kernel == reference over odd sizes and
edge cases (rank 1, gamma 1, greedy rows beside sampled and top-k/top-p rows, masked entries,
every weight dtype), every token is dspark::sample's draw from the corrected logits, the drafts'
distribution (chi-square), opcheck / torch.compile / CUDA graphs, bad input, and the DSpark
drafter with the op == with the Python loop."""
import pytest
import torch

import dspark
from dspark import reference
from dspark.drafters import DrafterSpec, build_draft_model, make_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import load_model
from dspark.timing import capture_graph

from helpers import chi2_pvalue, make_checkpoint, random_logits

ARGS = ["base_logits", "anchors", "w1", "w2", "hidden", "conf_weight", "conf_bias", "temperature",
        "top_k", "top_p", "seeds", "positions"]
DTYPES = {"f32": (torch.float32, torch.float32), "bf16_u32": (torch.bfloat16, torch.float32),
          "bf16": (torch.bfloat16, torch.bfloat16), "f16": (torch.float16, torch.float16)}


def make_args(R, G, V, rank, d, gen, *, dtypes="f32", temperature="mixed", filtered=False,
              mask_frac=0.0, bias_scale=1.0):
    """Arguments of torch.ops.dspark.markov_draft (a dict in schema order, return_probs apart).
    temperature: "mixed" (per request greedy or one of 0.6 / 1.0 / 1.4) or a number; filtered:
    per-request top-k / top-p (some off); d = 0: no confidence head."""
    wdt, udt = DTYPES[dtypes]
    U = random_logits(R * G, V, gen, scale=2.0, mask_frac=mask_frac).view(R, G, V).to(udt)
    w1 = torch.randn(V, rank, generator=gen).to(wdt)
    w2 = (torch.randn(rank, V, generator=gen) * bias_scale * rank ** -0.5).to(wdt)
    def pick(choices):  # one of `choices` per request
        return [choices[int(i)] for i in torch.randint(0, len(choices), (R,), generator=gen)]
    temps = pick((0.0, 0.6, 1.0, 1.4)) if temperature == "mixed" else [float(temperature)] * R
    ks = torch.tensor(pick((0, 0, 1, 3, V // 2))) if filtered else 0
    ps = torch.tensor(pick((1.0, 1.0, 0.9, 0.5))) if filtered else 1.0
    params = dspark.ops.sampling_tensors(R, temps, ks, ps)
    a = dict(base_logits=U, anchors=torch.randint(0, V, (R,), generator=gen), w1=w1, w2=w2,
             hidden=None, conf_weight=None, conf_bias=None, temperature=params.temperature,
             top_k=params.top_k, top_p=params.top_p,
             seeds=torch.randint(-(2**63), 2**63 - 1, (R,), generator=gen, dtype=torch.int64),
             positions=torch.randint(0, 1 << 40, (R,), generator=gen, dtype=torch.int64))
    if d > 0:
        a.update(hidden=torch.randn(R, G, d, generator=gen).to(wdt),
                 conf_weight=(torch.randn(d + rank, generator=gen) * 0.3).to(wdt),
                 conf_bias=torch.randn(1, generator=gen).to(wdt))
    return a


def run(device, a, return_probs=True):
    """The op on `device`; outputs on CPU."""
    args = [None if a[k] is None else a[k].to(device) for k in ARGS]
    return tuple(t.cpu() for t in torch.ops.dspark.markov_draft(*args, return_probs))


def assert_matches_reference(got, a, return_probs=True):
    want = reference.markov_draft(*[a[k] for k in ARGS], return_probs)
    assert got[0].dtype == torch.int64 and torch.equal(got[0], want[0]), (got[0], want[0])
    assert got[1].dtype == torch.float32 and torch.equal(got[1], want[1])  # bit for bit
    assert got[2].dtype == torch.float64 and got[2].shape == want[2].shape
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-12)


# ---- reference equality ------------------------------------------------------------------------
SHAPES = [(1, 1, 7, 1, 3), (3, 4, 129, 5, 8), (2, 7, 1000, 16, 40), (17, 2, 600, 3, 5),
          (5, 3, 513, 256, 32), (33, 2, 64, 8, 0), (1, 7, 2051, 24, 16), (8, 1, 4, 2, 1)]


@pytest.mark.parametrize("R,G,V,rank,d", SHAPES)
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("filtered", [False, True], ids=["plain", "topk_topp"])
def test_matches_reference(device, gen, R, G, V, rank, d, dtypes, filtered):
    a = make_args(R, G, V, rank, d, gen, dtypes=dtypes, filtered=filtered,
                  mask_frac=0.2 if V > 8 else 0.0)
    assert_matches_reference(run(device, a), a)
    tokens, conf, probs = run(device, a, return_probs=False)
    assert torch.equal(tokens, reference.markov_draft(*[a[k] for k in ARGS])[0])
    assert probs.shape == (0, G, V) and conf.shape == ((R if d else 0), G)


@pytest.mark.cuda
@pytest.mark.parametrize("R,G,V,rank,d", [(1, 7, 2051, 24, 16), (6, 5, 1000, 256, 8),
                                         (64, 3, 1000, 8, 0)])
def test_plain_stream_order_same_bits(device, gen, monkeypatch, R, G, V, rank, d):
    """DSPARK_MARKOV_PDL=off (each step's kernels in plain stream order instead of launched
    early) gives the same outputs; with return_probs the chain has three kernels a step."""
    if device != "cuda":
        pytest.skip("programmatic launch is the CUDA launcher's")
    a = make_args(R, G, V, rank, d, gen, dtypes="bf16", filtered=True)
    on = run(device, a)
    monkeypatch.setenv("DSPARK_MARKOV_PDL", "off")
    off = run(device, a)
    assert all(torch.equal(x, y) for x, y in zip(on, off))
    assert_matches_reference(off, a)


@pytest.mark.cuda
def test_pdl_switch_bad_value(device, gen, monkeypatch):
    if device != "cuda":
        pytest.skip("the switch is the CUDA launcher's")
    monkeypatch.setenv("DSPARK_MARKOV_PDL", "no")
    with pytest.raises(ValueError, match="DSPARK_MARKOV_PDL must be on or off"):
        run(device, make_args(2, 2, 30, 3, 4, gen))


def prev_tokens(a, tokens):
    return torch.cat([a["anchors"][:, None], tokens[:, :-1]], 1)


@pytest.mark.parametrize("dtypes", ["f32", "bf16"])
def test_each_token_is_samples_draw(device, gen, dtypes):
    """x_k is what dspark::sample draws (same device) from the corrected logits z_k with the key
    (seed, positions + k - 1), and probs[:, k] is the distribution sample returns."""
    a = make_args(24, 5, 700, 12, 0, gen, dtypes=dtypes, filtered=True, mask_frac=0.1)
    tokens, _, probs = run(device, a)
    z = reference.markov_logits(a["base_logits"], prev_tokens(a, tokens), a["w1"], a["w2"])
    for k in range(5):
        args = [z[:, k].contiguous(), a["temperature"], a["top_k"], a["top_p"], a["seeds"],
                a["positions"] + k, None]
        tok, q = torch.ops.dspark.sample(*[t.to(device) if t is not None else None for t in args],
                                         True)
        assert torch.equal(tok.cpu(), tokens[:, k])
        torch.testing.assert_close(q.cpu(), probs[:, k], rtol=0, atol=1e-12)


def test_greedy_is_the_first_argmax(device):
    """T = 0: x_k is the first maximal corrected logit; the bias moves the argmax."""
    U = torch.tensor([[[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])  # ties at 1, 2; then all 0
    w1 = torch.tensor([[0.0], [2.0], [-1.0], [0.0]])  # bias row of token t: w1[t] * w2
    w2 = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    a = dict(base_logits=U, anchors=torch.tensor([0]), w1=w1, w2=w2, hidden=None,
             conf_weight=None, conf_bias=None, **dspark.ops.sampling_tensors(1, 0.0)._asdict(),
             seeds=torch.tensor([0]), positions=torch.tensor([0]))
    tokens, _, probs = run(device, a)
    assert tokens.tolist() == [[1, 3]]  # step 1: bias 0 -> first of the tie; step 2: 2 * w2
    assert torch.equal(probs, torch.nn.functional.one_hot(tokens, 4).double())
    a["anchors"] = torch.tensor([2])  # bias -w2 at step 1: [1, 3, 2.5, -1] -> 1
    assert run(device, a)[0].tolist() == [[1, 3]]


def test_prefix_and_batch_position_invariance(device, gen):
    """A request's drafts depend neither on its place in the batch nor on the steps after them:
    gamma = 3 gives the first 3 drafts of gamma = 6; a permuted batch gives permuted rows."""
    a = make_args(9, 6, 300, 7, 10, gen, filtered=True)
    tokens, conf, probs = run(device, a)
    short = dict(a, base_logits=a["base_logits"][:, :3].contiguous(),
                 hidden=a["hidden"][:, :3].contiguous())
    t3, c3, p3 = run(device, short)
    assert torch.equal(t3, tokens[:, :3]) and torch.equal(c3, conf[:, :3])
    torch.testing.assert_close(p3, probs[:, :3], rtol=0, atol=0)
    perm = torch.randperm(9, generator=gen)
    moved = {k: (v[perm].contiguous() if v is not None and k not in ("w1", "w2", "conf_weight",
                                                                       "conf_bias") else v)
             for k, v in a.items()}
    tp, cp, _ = run(device, moved)
    assert torch.equal(tp, tokens[perm]) and torch.equal(cp, conf[perm])


def test_empty_batch(device, gen):
    a = make_args(1, 3, 50, 4, 6, gen)
    a = {k: (v[:0] if v is not None and k not in ("w1", "w2", "conf_weight", "conf_bias") else v)
         for k, v in a.items()}
    tokens, conf, probs = run(device, a)
    assert tokens.shape == (0, 3) and conf.shape == (0, 3) and probs.shape == (0, 3, 50)


# ---- the distribution of the drafts --------------------------------------------------------------
@pytest.mark.parametrize("T,k,p", [(1.0, 0, 1.0), (0.7, 4, 0.9)])
def test_drafts_follow_the_markov_chain(device, gen, T, k, p):
    """(x_1, x_2) over many seeds fits P(x_1) Q(x_2 | x_1) of the corrected logits (chi-square),
    and not the chain without the bias (the test has power)."""
    pytest.importorskip("scipy")
    n, V = 6000, 6
    one = make_args(1, 2, V, 2, 0, gen, temperature=T, bias_scale=3.0)
    a = {key: v for key, v in one.items()}
    for key in ("base_logits", "anchors", "temperature", "positions"):
        a[key] = one[key].expand(n, *one[key].shape[1:]).contiguous()
    a["top_k"], a["top_p"] = torch.full((n,), k), torch.full((n,), p)
    a["seeds"] = torch.arange(n) * 7919 + 3
    tokens, _, _ = run(device, a, return_probs=False)
    counts = torch.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V)

    def joint(w1, w2):
        z1 = reference.markov_logits(one["base_logits"][0, 0], one["anchors"][0], w1, w2)
        p1 = reference.target_probs(z1, T, k, p)
        q2 = [reference.target_probs(reference.markov_logits(one["base_logits"][0, 1],
                                                             torch.tensor(x), w1, w2), T, k, p)
              for x in range(V)]
        return p1[:, None] * torch.stack(q2)
    assert chi2_pvalue(counts, joint(one["w1"], one["w2"])) > 1e-3
    assert chi2_pvalue(counts, joint(one["w1"], torch.zeros_like(one["w2"]))) < 1e-6


# ---- opcheck, torch.compile, CUDA graphs ---------------------------------------------------------
def contract_cases():
    gen = torch.Generator().manual_seed(4)
    return {"f32_conf": make_args(3, 4, 37, 5, 6, gen, filtered=True),
            "bf16_noconf": make_args(2, 2, 64, 3, 0, gen, dtypes="bf16"),
            "f16_u32": make_args(4, 3, 50, 2, 3, gen, dtypes="f16", temperature=1.0)}


@pytest.mark.parametrize("case", ["f32_conf", "bf16_noconf", "f16_u32"])
@pytest.mark.parametrize("return_probs", [False, True])
def test_opcheck(device, case, return_probs):
    a = contract_cases()[case]
    if case == "f16_u32":
        a["base_logits"] = a["base_logits"].float()
    args = tuple(None if a[k] is None else a[k].to(device) for k in ARGS)
    torch.library.opcheck(torch.ops.dspark.markov_draft.default, (*args, return_probs))


def draft_step(*args):
    """A drafter's use: the op, then the proposal's packing around it (exact torch ops, so
    compiled and eager agree bit for bit)."""
    tokens, conf, probs = torch.ops.dspark.markov_draft(*args, True)
    anchors = args[1]
    return torch.cat([anchors[:, None], tokens], 1), conf.neg(), probs[:, 1:] * 2.0


def test_compile_fullgraph_equals_eager(device, gen):
    torch._dynamo.reset()
    compiled = torch.compile(draft_step, fullgraph=True)
    for _ in range(2):  # same shapes, new contents
        a = make_args(5, 4, 90, 6, 8, gen, filtered=True)
        args = tuple(a[k].to(device) for k in ARGS)
        for e, c in zip(draft_step(*args), compiled(*args)):
            assert e.dtype == c.dtype and e.device == c.device and torch.equal(e, c)


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager(device, gen):
    """The op captures into a CUDA graph (no host sync inside); replays with new inputs copied
    into the captured buffers equal eager calls."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    inputs = [make_args(6, 5, 1000, 16, 12, gen, dtypes="bf16", filtered=True) for _ in range(3)]
    static = [inputs[0][k].cuda().clone() for k in ARGS]
    graph, outs = capture_graph(lambda: draft_step(*static))
    for a in inputs:
        for dst, k in zip(static, ARGS):
            dst.copy_(a[k])
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, draft_step(*[a[k].cuda() for k in ARGS])):
            assert torch.equal(got, want)


# ---- bad input -----------------------------------------------------------------------------------
def _set(**kw):
    return lambda a: a.update(kw)


BAD = {
    "rank_mismatch": (lambda a: a.update(w2=a["w2"][:-1].contiguous()), "w2 must be \\[rank, V\\]"),
    "w2_vocab": (lambda a: a.update(w2=a["w2"][:, :-1].contiguous()), "w2 must be \\[rank, V\\]"),
    "w1_vocab": (lambda a: a.update(w1=a["w1"][:-1].contiguous()), "w1 must be \\[V, rank\\]"),
    "w2_transposed": (lambda a: a.update(w2=a["w2"].t().contiguous().t()), "w2 must be"),
    "w2_dtype": (lambda a: a.update(w2=a["w2"].double()), "w2 must have the dtype of w1"),
    "w1_int": (lambda a: a.update(w1=a["w1"].long()), "w1 must be float32, bfloat16 or float16"),
    "u_f16": (lambda a: a.update(base_logits=a["base_logits"].half()),
              "base_logits must be float32 or the dtype of w1"),
    "u_2d": (lambda a: a.update(base_logits=a["base_logits"][:, 0]), "base_logits must be a 3-D"),
    "anchor_ge_v": (lambda a: a["anchors"].__setitem__(1, 29), "anchors must be token ids"),
    "anchor_neg": (lambda a: a["anchors"].__setitem__(0, -1), "anchors must be token ids"),
    "anchors_i32": (lambda a: a.update(anchors=a["anchors"].int()), "anchors must have dtype"),
    "anchors_len": (lambda a: a.update(anchors=a["anchors"][:2]), "anchors must have size"),
    "hidden_only": (_set(conf_weight=None, conf_bias=None), "must be given together"),
    "hidden_shape": (lambda a: a.update(hidden=a["hidden"][:, :1].contiguous()),
                     "hidden must be \\[R, gamma, d\\]"),
    "hidden_dtype": (lambda a: a.update(hidden=a["hidden"].double()), "hidden must have the dtype"),
    "conf_weight_size": (lambda a: a.update(conf_weight=a["conf_weight"][1:].contiguous()),
                         "conf_weight must be \\[d \\+ rank\\]"),
    "conf_bias_size": (lambda a: a.update(conf_bias=torch.zeros(2)), "conf_bias must hold one"),
    "temperature": (lambda a: a["temperature"].__setitem__(0, -1.0), "temperature must be"),
    "top_p": (lambda a: a["top_p"].__setitem__(1, 1.5), "top_p must be in"),
    "top_k": (lambda a: a["top_k"].__setitem__(2, -3), "top_k must be >= 0"),
    "temperature_len": (lambda a: a.update(temperature=a["temperature"][:1]), "temperature must"),
    "seeds_dtype": (lambda a: a.update(seeds=a["seeds"].float()), "seeds must have dtype"),
    "nan_logit": (lambda a: a["base_logits"].__setitem__((1, 1, 3), float("nan")),
                  "contain NaN or \\+inf"),
    "inf_logit": (lambda a: a["base_logits"].__setitem__((0, 0, 0), float("inf")),
                  "contain NaN or \\+inf"),
    "empty_row": (lambda a: a["base_logits"][2, 1].fill_(-float("inf")),
                  "no finite entry"),
    "zero_gamma": (lambda a: a.update(base_logits=a["base_logits"][:, :0],
                                      hidden=a["hidden"][:, :0]), "gamma >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises(device, gen, case):
    a = make_args(3, 2, 29, 4, 5, gen)
    mutate, match = BAD[case]
    mutate(a)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        run(device, a)


@pytest.mark.cuda
def test_wrong_device(device, gen):
    if device != "cuda":
        pytest.skip("needs a second device type")
    a = make_args(2, 2, 30, 3, 4, gen)
    for name in ("w2", "anchors", "hidden", "seeds"):
        args = [None if a[k] is None else (a[k] if k == name else a[k].cuda()) for k in ARGS]
        with pytest.raises(RuntimeError, match=f"{name} must be on cuda"):
            torch.ops.dspark.markov_draft(*args, False)


@pytest.mark.cuda
def test_cuda_without_read_back_stays_in_bounds(device, gen):
    """sync_checks(False): no host sync, no error; a request with a bad anchor or an empty row
    gets -1 tokens from there on, the others their usual drafts."""
    if device != "cuda":
        pytest.skip("CUDA only")
    a = make_args(4, 3, 100, 5, 6, gen)
    want = run("cuda", a)[0]
    a["anchors"][1] = 100
    a["base_logits"][2, 1].fill_(-float("inf"))
    with dspark.ops.sync_checks(False):
        got = run("cuda", a)[0]
    assert got[1].tolist() == [-1, -1, -1] and got[2, 0] == want[2, 0]
    assert got[2, 1:].tolist() == [-1, -1]
    assert torch.equal(got[[0, 3]], want[[0, 3]])


# ---- the DSpark drafter: the op == the Python loop -----------------------------------------------
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mtarget"))
    make_checkpoint(path, "qwen3", vocab=48, hidden=32, layers=3, init=0.3, seed=7, head_dim=8)
    return load_model(path, dtype=torch.float32)


@pytest.mark.parametrize("params", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 6, 0.9)])
def test_drafter_op_equals_python_loop(device, target, params, monkeypatch):
    """Generation with the fused op equals generation with the Python loop (same tokens, same
    acceptance, confidences to fp32 rounding): the op is a drop-in for the reference loop."""
    T, k, p = params
    calls = []
    op = dspark.ops.markov_draft
    monkeypatch.setattr(dspark.ops, "markov_draft",
                        lambda *a, **kw: calls.append(1) or op(*a, **kw))
    spec = DrafterSpec.for_target(target.config, "dspark", gamma=4, mask_token_id=47,
                                  num_draft_layers=1, markov_rank=8, head_type="markov")
    target_dev = target.to(device)  # (the module fixture moves: the drafter shares its weights)
    torch.manual_seed(3)
    model = build_draft_model(spec, target_dev)
    with torch.no_grad():  # an opinionated drafter: the bias and the confidences matter
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.mul_(3.0)
    model = model.eval().requires_grad_(False)
    runs = []
    for fused in (True, False):
        drafter = make_drafter(model)
        drafter.markov_op = fused
        drafter.recorder = []
        before = len(calls)
        out = SpeculativeEngine(target_dev, drafter).generate(
            [[1, 5, 7, 9], [3, 4], [10, 11, 12, 13, 14]], max_new_tokens=12, temperature=T,
            top_k=k, top_p=p, seed=[1, 2, 3], stop_tokens=[])
        assert (len(calls) > before) == fused  # the op drafts every round, the loop never
        runs.append((out, drafter.recorder))
    (a, rec_a), (b, rec_b) = runs
    assert a.tokens == b.tokens and a.metrics.accept_hist == b.metrics.accept_hist
    assert len(rec_a) == len(rec_b) > 0
    for (za, la, aa), (zb, lb, ab) in zip(rec_a, rec_b):
        torch.testing.assert_close(za, zb, rtol=1e-5, atol=1e-5)
        assert torch.equal(la, lb) and torch.equal(aa, ab)


def test_drafter_built_under_inference_mode(device, target):
    """Weights made under torch.inference_mode keep no version counter: the op path keys its
    transposed W2 copy without one and drafts the same tokens as the Python loop."""
    spec = DrafterSpec.for_target(target.config, "dspark", gamma=3, mask_token_id=47,
                                  num_draft_layers=1, markov_rank=8, head_type="markov")
    target_dev = target.to(device)
    outs = []
    for fused in (True, False):
        torch.manual_seed(5)
        with torch.inference_mode():
            model = build_draft_model(spec, target_dev).eval()
            assert model.head.w2.weight.is_inference()
            drafter = make_drafter(model)
            drafter.markov_op = fused
            outs.append(SpeculativeEngine(target_dev, drafter).generate(
                [[1, 5, 7, 9], [3, 4]], max_new_tokens=8, temperature=0.0, stop_tokens=[]))
    assert outs[0].tokens == outs[1].tokens
