"""Property-based fuzzing of every op's argument space (issue 15), with hypothesis.

Each example builds a valid call of one op (small sizes; empty batches, a one-token vocabulary
and a one-slot cache among them), then changes at most one argument: its dtype, rank or one size,
an empty, non-contiguous, stride-0 or other-device version, None, out-of-range or non-finite
entries, a bad int / float / str scalar. The op must either raise an exception whose message
names one of its arguments, or return results of the documented shapes and ranges; a call left
unchanged must succeed. A crash aborts the run and a hang stalls it: both are failures.

The examples are derandomized (the same ones on every run, so CI is reproducible);
DSPARK_FUZZ_EXAMPLES=N draws N fresh random examples per op instead. On a GPU the cuda variant
runs the same examples through the CUDA kernels, synchronizing after each call so an
asynchronous fault is charged to its example; run it under compute-sanitizer to catch
out-of-bounds accesses that do not fault (README: Tests).
"""
import math
import os

import pytest
import torch

pytest.importorskip("hypothesis")  # a test tool (scripts/setup.sh installs it)
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_ops import I64, OPS, torch_args  # noqa: E402

EXAMPLES = int(os.environ.get("DSPARK_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 120, derandomize=not EXAMPLES, deadline=None,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


# ---- one change ----------------------------------------------------------------------------------
INTS = [-(2**63), -2, -1, 0, 1, 3, 40, 65, 4097, 2**31, 2**62]
FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-45, 0.5, 1.0, 2.0, 1e30, -1e30]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, I64,
          torch.bool]


def changed_tensor(draw, t: torch.Tensor, device: str):
    kinds = ["dtype", "rank+", "none", "huge"]
    if t.dim():
        kinds += ["rank-", "grow", "shrink", "empty", "strided"]
    if t.numel():
        kinds += ["value", "expanded"]
    if device != "cpu":
        kinds += ["cpu"]
    kind = draw(st.sampled_from(kinds))
    d = draw(st.integers(0, t.dim() - 1)) if t.dim() else 0
    if kind == "dtype":
        return t.to(draw(st.sampled_from([x for x in DTYPES if x != t.dtype])))
    if kind == "rank+":
        return t.unsqueeze(draw(st.integers(0, t.dim())))
    if kind == "rank-":
        return t.reshape(-1) if t.dim() > 1 else (t[0] if t.numel() else t.sum())
    if kind == "none":
        return None
    if kind == "expanded":  # stride 0: the same shape, every entry the first one
        return t.reshape(-1)[:1].reshape([1] * t.dim()).expand(t.shape)
    if kind == "huge":  # a stride-0 view with 10^12 entries along one dim: nothing allocated,
        if t.dim() == 0:  # and nothing may be (a copy or a sized output would be terabytes)
            return t.reshape(1).expand(10**12)
        shape = list(t.shape)
        shape[d] = 1
        one = t.narrow(d, 0, 1) if t.shape[d] else t.new_zeros(shape)
        shape[d] = 10**12
        return one.expand(shape)
    if kind in ("grow", "shrink", "empty"):
        if kind == "grow":
            pad = list(t.shape)
            pad[d] = draw(st.sampled_from([1, 70]))
            return torch.cat([t, torch.zeros(pad, dtype=t.dtype, device=t.device)], d)
        return t.narrow(d, 0, max(t.shape[d] - 1, 0) if kind == "shrink" else 0)
    if kind == "strided":  # the same values in a non-contiguous view
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "cpu":
        return t.cpu()
    new = t.clone().reshape(-1)  # "value": some entries out of range or non-finite
    if draw(st.booleans()):
        idx = slice(None)
    else:
        idx = draw(st.integers(0, new.numel() - 1))
    if t.dtype == torch.bool:
        new[idx] = ~new[idx]
    elif t.dtype.is_floating_point:
        new[idx] = draw(st.sampled_from(FLOATS))
    else:
        new[idx] = draw(st.sampled_from([v for v in INTS if torch.iinfo(t.dtype).min <= v
                                         <= torch.iinfo(t.dtype).max]))
    return new.reshape(t.shape)


def change_one(draw, args: dict, device: str):
    """At most one argument changed; returns (args, what changed)."""
    name = draw(st.sampled_from([None, *args]))
    if name is None:
        return args, None
    v = args[name]
    if isinstance(v, torch.Tensor):
        new = changed_tensor(draw, v, device)
    elif v is None:  # an optional argument given: a tensor of some wrong or right shape
        new = draw(st.sampled_from([torch.ones(()), torch.ones(3), torch.zeros(2, 2, dtype=I64)]))
        new = new.to(device)
    elif isinstance(v, bool):
        new = not v
    elif isinstance(v, int):
        new = draw(st.sampled_from(INTS))
    elif isinstance(v, float):
        new = draw(st.sampled_from(FLOATS))
    else:
        new = draw(st.sampled_from(["", "bogus", "SYNC"]))
    return {**args, name: new}, f"{name}: {describe(v)} -> {describe(new)}"


def describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{v.dtype} {list(v.shape)} stride {list(v.stride())} on {v.device}"
    return repr(v)


# ---- the property --------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
@FUZZ
@given(data=st.data())
def test_fuzz_op(device, op, data):
    build, call, check, aliases = OPS[op]
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in build(data.draw).items()}
    args, change = change_one(data.draw, args, device)
    note(f"change: {change}")
    # what an in-place op had before the call (stride-0 views of 10^12 entries are not copied)
    before = {k: v.clone() for k, v in args.items()
              if isinstance(v, torch.Tensor) and v.numel() < 2**20}
    try:
        result = call(args)
        if device != "cpu":
            torch.cuda.synchronize()  # an asynchronous fault belongs to this example
    except ERRORS as exc:
        msg = str(exc).strip()
        assert change is not None, f"a valid call failed: {msg}"
        names = torch_args(op) + aliases
        assert any(n in msg for n in names), f"no argument named in: {msg}"
        return
    if op in ("commit_tokens", "kv_commit"):  # in place: checked against what came in
        check(args, before, result)
    else:
        check(args, result)
