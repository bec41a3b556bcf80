"""The runner's hybrid path (dspark/models/runner.py ``hybrid``, ``Block.hybrid``): above the fused
rows, decode / verify calls keep dspark::decode_attention under the cuBLAS projections. Same model
semantics as the other two paths (chains, trees, ragged blocks, the cache write), chosen only
where the attention kernel takes the call."""
import pytest
import torch
from test_batch_invariance import ENGINE_PROMPTS, PROMPTS, random_model

from dspark.drafters import NgramDrafter
from dspark.engine import SpeculativeEngine
from dspark.models import ModelRunner
from dspark.models.transformer import HYBRID_MAX_SLOTS
from dspark.scheduler import sps_key

# request r's verify block: (tokens, local parents); the second is a tree, the third shorter
BLOCKS = [([5, 9, 13, 2, 77], [-1, 0, 1, 2, 3]), ([8, 1, 40, 41, 6], [-1, 0, 0, 2, 1]),
          ([60, 3, 4], [-1, 0, 1])]


def verify(runner, model, blocks=BLOCKS, capacity=48):
    """Prefill a prompt per block, verify ``blocks`` (packed, ragged when their lengths differ):
    logits [N, V] and the K cache after the call."""
    prompts = PROMPTS[:len(blocks)]
    runner.allocate(len(prompts), capacity)
    runner.prefill(prompts)
    dev = model.device
    toks = torch.tensor([t for ts, _ in blocks for t in ts], device=dev)
    pars = torch.tensor([p for _, ps in blocks for p in ps], device=dev)
    sizes = torch.tensor([len(t) for t, _ in blocks])
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(dev)
    start = torch.tensor([len(p) for p in prompts], device=dev)
    fwd = runner.forward_tree(toks, pars, offs, start, max_nodes=int(sizes.max()))
    return fwd.logits.clone(), runner.cache.k.clone()


def test_path_choice(monkeypatch):
    model = random_model(torch.float32, "cpu")
    runner = ModelRunner(model, fused=True, fused_max_rows=4, hybrid=True)
    runner.allocate(2, 64)
    assert runner._path(4, 4) is True and runner._path(8, 4) == "attention"
    assert runner._path(65, 65) is False  # beyond decode_attention's block
    runner.allocate(2, HYBRID_MAX_SLOTS + 1)  # long caches: SDPA is faster there
    assert runner._path(8, 4) is False
    off = ModelRunner(model, fused=True, fused_max_rows=4, hybrid=False)
    off.allocate(2, 64)
    assert off._path(8, 4) is False
    assert ModelRunner(model).hybrid is False  # off on the CPU (the default is on for CUDA)
    assert sps_key(runner)["variant"] == "fused-max4-hybrid" and "hybrid" not in sps_key(off)[
        "variant"]
    monkeypatch.setenv("DSPARK_HYBRID", "1")
    assert ModelRunner(model).hybrid is True
    assert ModelRunner(model, hybrid=False).hybrid is False  # the argument wins
    monkeypatch.setenv("DSPARK_HYBRID", "yes")
    with pytest.raises(ValueError, match="DSPARK_HYBRID must be"):
        ModelRunner(model)


@pytest.mark.parametrize("blocks", [BLOCKS, BLOCKS[:2]], ids=["ragged", "full"])
def test_logits_and_cache_match_the_other_paths(device, blocks):
    """fp32: the hybrid verify's logits and written K/V equal the cuBLAS + SDPA path's and the
    fused path's to rounding (three summation orders of the same math)."""
    model = random_model(torch.float32, device)
    hyb = ModelRunner(model, fused=True, fused_max_rows=1, hybrid=True)
    plain = ModelRunner(model, fused=False, hybrid=False)
    fused = ModelRunner(model, batch_invariant=True)
    (lh, kh), (lp, kp), (lf, kf) = (verify(r, model, blocks) for r in (hyb, plain, fused))
    scale = lp.abs().max()
    for other, name in ((lp, "cuBLAS + SDPA"), (lf, "fused")):
        err = (lh - other).abs().max() / scale
        assert err < 1e-5, f"hybrid vs {name}: relative max diff {err:.3g}"
    for b, (p, (t, _)) in enumerate(zip(PROMPTS, blocks)):  # the prompt's and the nodes' slots
        end = len(p) + len(t)  # (slots past a short request's nodes hold padding rows' K/V)
        for other in (kp, kf):
            torch.testing.assert_close(kh[:, b, :, :end], other[:, b, :, :end], rtol=1e-5,
                                       atol=1e-5)
    assert not torch.equal(lh, lp)  # (a different path did run)


@pytest.mark.cuda
def test_bf16_error_is_the_unfused_paths(device):
    """bf16 on the GPU, graph-replayed: the hybrid verify is as close to the fp32 model as the
    cuBLAS + SDPA path is (within 2x its error)."""
    if device != "cuda":
        pytest.skip("the GPU variant")
    fp32 = random_model(torch.float32, "cuda")
    ref, _ = verify(ModelRunner(fp32, fused=False, hybrid=False), fp32)
    model = random_model(torch.bfloat16, "cuda")
    hyb = ModelRunner(model, fused=True, fused_max_rows=1, hybrid=True)
    assert hyb.use_cuda_graphs
    lh, _ = verify(hyb, model)
    lp, _ = verify(ModelRunner(model, fused=False, hybrid=False), model)
    err_h, err_p = (lh - ref).abs().max(), (lp - ref).abs().max()
    assert err_h <= 2 * err_p + 1e-3, f"hybrid {err_h:.3g} vs cuBLAS + SDPA {err_p:.3g}"


def test_engine_greedy_on_the_hybrid_path(device):
    """fp32: speculation verified on the hybrid path (every verify above 2 rows) gives the
    autoregressive text (whose batch-4 decode steps take the hybrid path too)."""
    target = random_model(torch.float32, device, seed=1, vocab=128)
    runner = ModelRunner(target, fused=True, fused_max_rows=2, hybrid=True)
    eng = SpeculativeEngine(runner, NgramDrafter(4))
    spec = eng.generate(ENGINE_PROMPTS, max_new_tokens=16, stop_tokens=[])
    ar = eng.generate_autoregressive(ENGINE_PROMPTS, max_new_tokens=16, stop_tokens=[])
    assert spec.tokens == ar.tokens
