"""dspark::fused_linear against dspark.reference.fused_linear (odd sizes, every prologue, dtypes,
the k-split / multi-chunk / unaligned kernel paths), the one-summation-order property (a row's
bits do not depend on the other rows), opcheck, torch.compile, and bad input."""
import pytest
import torch

import dspark
from dspark import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(M, N, K, dtype, kind, bias, residual, gen, device):
    """Random inputs of the op's scale: x ~ N(0, 1), weight ~ N(0, 1/K) (outputs ~ N(0, 1))."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)
    x = rnd(M, 2 * K if kind == "gate" else K)
    return dict(x=x, weight=rnd(N, K, scale=K ** -0.5), bias=rnd(N) if bias else None,
                residual=rnd(M, N) if residual else None,
                norm_weight=(torch.rand(K, generator=gen) + 0.5).to(dtype).to(device)
                if kind == "norm" else None,
                eps=1e-6, silu_gate=kind == "gate")


def check(args):
    got = torch.ops.dspark.fused_linear(*args.values())
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    want = ref.fused_linear(**cpu)
    assert got.shape == want.shape and got.dtype == want.dtype
    # Kernels and reference differ in the order of the fp32 sums (and, on the GPU, in the last
    # bit of expf/rsqrtf, which can move a rounded intermediate by one unit). Allowed: two units
    # of the output dtype on the terms of the final roundings (GEMM result, residual) plus the
    # fp32 summation error on sum_k |w x| (1e-5; for 16-bit dtypes eps/16 for those flips).
    dt = args["x"].dtype
    xhat = ref.fused_linear_input(cpu["x"], cpu["weight"], cpu["norm_weight"], cpu["eps"],
                                  cpu["silu_gate"]).float()
    y = xhat @ cpu["weight"].float().t() + (cpu["bias"].float() if cpu["bias"] is not None else 0)
    abs_dot = xhat.abs() @ cpu["weight"].float().abs().t()
    res = cpu["residual"].float().abs() if cpu["residual"] is not None else 0
    eps_dt = torch.finfo(dt).eps
    bound = (2 * eps_dt * (y.abs() + res) + (1e-5 if dt == torch.float32 else eps_dt / 16) * abs_dot
             + 1e-30)
    err = (got.cpu().float() - want.float()).abs()
    assert bool((err <= bound).all()), (
        f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}")


# ---- reference equality --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "norm", "gate"])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 7, 3), (2, 33, 64), (3, 257, 13),
                                   (5, 100, 200), (8, 65, 1000), (9, 17, 40), (17, 3, 24),
                                   (1, 300, 512), (1, 33, 4096), (16, 129, 1000), (33, 300, 300),
                                   (65, 40, 4099), (3, 128, 96)])
def test_matches_reference(device, gen, dtype, kind, M, N, K):
    check(make(M, N, K, dtype, kind, bias=N % 2 == 1, residual=M % 2 == 1, gen=gen, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K", [(1, 12300), (8, 1600), (4, 3100)])
def test_k_larger_than_one_staged_chunk(device, gen, dtype, M, K):
    """K beyond what one block stages in shared memory (12288 floats per M tile): K chunks."""
    check(make(M, 40, K, dtype, "norm", bias=True, residual=True, gen=gen, device=device))


# (N, K): the CUDA kernel's k split into 1 / 4 / 8 slices with partial last slices and several
# staged chunks per slice, element loads (K odd), one and several row blocks.
SPLIT_SHAPES = [(7, 13), (100, 1000), (300, 300), (33, 4096), (40, 12300), (257, 40)]


def call_rows(args, idx):
    """fused_linear over rows `idx` of args' x / residual only."""
    sub = dict(args, x=args["x"][idx].contiguous())
    if args["residual"] is not None:
        sub["residual"] = args["residual"][idx].contiguous()
    return torch.ops.dspark.fused_linear(*sub.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "norm", "gate"])
@pytest.mark.parametrize("N,K", SPLIT_SHAPES)
def test_row_bits_do_not_depend_on_other_rows(device, gen, dtype, kind, N, K):
    """One summation order for every row count (batch invariance): each row of a 70-row call
    (two 64-row groups on CUDA) equals, bit for bit, the same row computed alone (decode), in a
    pair, and among 9, 17 or 33 other rows in another order (1, 2, 4 and 8 column tiles)."""
    M = 70
    a = make(M, N, K, dtype, kind, bias=True, residual=kind != "norm", gen=gen, device=device)
    full = torch.ops.dspark.fused_linear(*a.values())
    perm = torch.randperm(M, generator=gen)
    for idx in ([5], [69], [0, 1], perm[:9], perm[9:26], perm[26:59]):
        idx = torch.as_tensor(idx, device=device)
        got, want = call_rows(a, idx), full[idx]
        assert torch.equal(got, want), (
            f"rows {idx.tolist()}: max diff {(got.float() - want.float()).abs().max():.3g}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["norm", "gate"])
def test_load_alignment_does_not_change_bits(device, gen, dtype, kind):
    """x or weight starting mid-vector (element loads) give the bits of aligned tensors (16-byte
    loads): the same values feed the same sums."""
    a = make(5, 70, 256, dtype, kind, bias=False, residual=True, gen=gen, device=device)
    want = torch.ops.dspark.fused_linear(*a.values())
    for name in ("x", "weight"):
        flat = torch.empty(a[name].numel() + 1, dtype=dtype, device=device)
        view = flat[1:].view_as(a[name])
        view.copy_(a[name])
        assert torch.equal(torch.ops.dspark.fused_linear(*dict(a, **{name: view}).values()), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "norm", "gate"])
@pytest.mark.parametrize("M,N,K", [(1, 300, 4099), (8, 130, 12300), (16, 40, 3100), (70, 257, 300)])
def test_stage_budget_does_not_change_bits(device, gen, monkeypatch, dtype, kind, M, N, K):
    """How much of a slice a CUDA block stages at once (DSPARK_LINEAR_STAGE_BYTES: the default,
    the rule before it (-1), a tiny budget of one weight batch per chunk, a huge one) is a launch
    choice: the same bits. (The CPU kernel stages nothing: there the call checks it is unaffected.)
    """
    a = make(M, N, K, dtype, kind, bias=True, residual=True, gen=gen, device=device)
    monkeypatch.delenv("DSPARK_LINEAR_STAGE_BYTES", raising=False)
    want = torch.ops.dspark.fused_linear(*a.values())
    for budget in ("-1", "64", "1048576"):
        monkeypatch.setenv("DSPARK_LINEAR_STAGE_BYTES", budget)
        assert torch.equal(torch.ops.dspark.fused_linear(*a.values()), want), budget


def test_stage_budget_bad_value_is_named(device, gen, monkeypatch):
    if device != "cuda":
        pytest.skip("only the CUDA launcher stages activations")
    a = make(2, 8, 16, torch.bfloat16, "plain", bias=False, residual=False, gen=gen,
             device=device)
    for bad in ("x", "-2", "99999999"):
        monkeypatch.setenv("DSPARK_LINEAR_STAGE_BYTES", bad)
        with pytest.raises(ValueError, match="DSPARK_LINEAR_STAGE_BYTES"):
            torch.ops.dspark.fused_linear(*a.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_prologue_bits_equal_the_unfused_ops(device, gen, dtype):
    """The SiLU-gate prologue's last multiply runs on packed pairs (one rounding each, exact
    because the fp32 product of two 16-bit values is exact): through an identity weight the
    output is xhat itself, equal bit for bit to PyTorch's CUDA ops doing the same roundings
    (silu in fp32 with the same expf and IEEE division, stored, times up, stored). CUDA only:
    the CPU kernel's exp is the C library's, PyTorch's CPU exp is vectorised."""
    if device != "cuda":
        pytest.skip("bitwise against PyTorch's CUDA exp only")
    K = 264  # 16-byte groups and a partial last slab
    x = (torch.randn(5, 2 * K, generator=gen) * 3).to(dtype).to(device)
    eye = torch.eye(K, dtype=dtype, device=device)
    got = torch.ops.dspark.fused_linear(x, eye, None, None, None, 1e-6, True)
    a, u = x[:, :K].float(), x[:, K:].float()
    want = ((a / (1.0 + torch.exp(-a))).to(dtype).float() * u).to(dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_weight(device, gen, dtype):
    """A weight that starts mid-vector (offset view of a flat buffer): the scalar-load path."""
    args = make(2, 21, 64, dtype, "gate", bias=True, residual=True, gen=gen, device=device)
    flat = torch.empty(21 * 64 + 1, dtype=dtype, device=device)
    w = flat[1:].view(21, 64)
    w.copy_(args["weight"])
    args["weight"] = w
    check(args)


def test_large_values_and_zero_rows(device, gen):
    """Zero rows normalise to zero (eps keeps rsqrt finite); big activations stay finite in fp32
    accumulation (bf16 range)."""
    args = make(3, 50, 96, torch.bfloat16, "norm", bias=False, residual=False, gen=gen,
                device=device)
    args["x"][0] = 0
    args["x"][1] *= 1e30
    check(args)
    assert torch.equal(torch.ops.dspark.fused_linear(*args.values())[0].float().cpu(),
                       torch.zeros(50))


def test_empty_shapes(device):
    x = torch.zeros(0, 8, device=device)
    assert torch.ops.dspark.fused_linear(x, torch.ones(4, 8, device=device), None, None, None,
                                         1e-6, False).shape == (0, 4)
    x = torch.ones(2, 8, device=device)
    assert torch.ops.dspark.fused_linear(x, torch.ones(0, 8, device=device), None, None, None,
                                         1e-6, False).shape == (2, 0)


def test_wrapper_keeps_leading_dims(device, gen):
    a = make(6, 10, 16, torch.float32, "norm", bias=True, residual=True, gen=gen, device=device)
    out = dspark.ops.fused_linear(a["x"].view(2, 3, 16), a["weight"], a["bias"],
                                  a["residual"].view(2, 3, 10), a["norm_weight"])
    assert out.shape == (2, 3, 10)
    torch.testing.assert_close(out.view(6, 10), torch.ops.dspark.fused_linear(*a.values()))


# ---- opcheck, torch.compile, CUDA graphs ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["plain", "norm", "gate"])
@pytest.mark.parametrize("dtype,M", [(torch.float32, 3), (torch.bfloat16, 70)])
def test_opcheck(device, gen, kind, dtype, M):
    a = make(M, 9, 16, dtype, kind, bias=True, residual=kind != "plain", gen=gen, device=device)
    torch.library.opcheck(torch.ops.dspark.fused_linear.default, tuple(a.values()))


def test_compile_fullgraph_equals_eager(device, gen):
    torch._dynamo.reset()

    def mlp(x, w_up, w_down, g):
        return dspark.ops.fused_linear(dspark.ops.fused_linear(x, w_up, norm_weight=g), w_down,
                                       residual=x, silu_gate=True)
    x = torch.randn(2, 32, generator=gen).to(device)
    w_up = (torch.randn(96, 32, generator=gen) / 6).to(device)
    w_down = (torch.randn(32, 48, generator=gen) / 7).to(device)
    g = torch.rand(32, generator=gen).to(device)
    torch.testing.assert_close(torch.compile(mlp, fullgraph=True)(x, w_up, w_down, g),
                               mlp(x, w_up, w_down, g), atol=0, rtol=0)


# ---- bad input -----------------------------------------------------------------------------------
def bad_cases():
    f32 = dict(dtype=torch.float32)
    x, w = torch.ones(2, 8), torch.ones(4, 8)
    base = dict(x=x, weight=w, bias=None, residual=None, norm_weight=None, eps=1e-6,
                silu_gate=False)
    return {
        "x_1d": ({**base, "x": torch.ones(8)}, "x must be a 2-D"),
        "weight_3d": ({**base, "weight": torch.ones(1, 4, 8)}, "weight must be a 2-D"),
        "x_f64": ({**base, "x": x.double()}, "float32, bfloat16 or float16"),
        "weight_dtype": ({**base, "weight": w.half()}, "weight must have the dtype of x"),
        "features": ({**base, "x": torch.ones(2, 7)}, "x must have 8 features"),
        "gate_features": ({**base, "silu_gate": True}, "x must have 16 features"),
        "k_zero": ({**base, "x": torch.ones(2, 0), "weight": torch.ones(4, 0)},
                   "at least one input"),
        "both_prologues": ({**base, "x": torch.ones(2, 16), "silu_gate": True,
                            "norm_weight": torch.ones(8)}, "not both"),
        "bias_shape": ({**base, "bias": torch.ones(5)}, "bias must have size 4"),
        "residual_shape": ({**base, "residual": torch.ones(2, 5)},
                           r"residual must have shape \[2, 4\]"),
        "residual_dtype": ({**base, "residual": torch.ones(2, 4, dtype=torch.half)},
                           "residual must have the dtype"),
        "norm_shape": ({**base, "norm_weight": torch.ones(7, **f32)},
                       "norm_weight must have size 8"),
        "eps_nan": ({**base, "norm_weight": torch.ones(8), "eps": float("nan")},
                    "eps must be finite"),
        "eps_negative": ({**base, "norm_weight": torch.ones(8), "eps": -1.0}, "eps must be finite"),
        "x_strided": ({**base, "x": torch.ones(8, 2).t()}, "x must be contiguous"),
        "weight_strided": ({**base, "weight": torch.ones(8, 4).t()}, "weight must be contiguous"),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_input(device, case):
    args, message = bad_cases()[case]
    args = {k: (torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device).copy_(v)
                if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        torch.ops.dspark.fused_linear(*args.values())


@pytest.mark.cuda
def test_device_mismatch(device):
    if device != "cuda":
        pytest.skip("needs two devices")
    with pytest.raises(RuntimeError, match="weight must be on cuda"):
        torch.ops.dspark.fused_linear(torch.ones(2, 8, device="cuda"), torch.ones(4, 8), None,
                                      None, None, 1e-6, False)
