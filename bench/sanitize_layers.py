"""A few dspark::fused_linear / dspark::decode_attention calls over odd shapes for
compute-sanitizer memcheck and racecheck: `compute-sanitizer --tool racecheck python3
bench/sanitize_layers.py`. Linear: every column-tile count (1, 2, 4, 8 and two 64-row groups),
1 / 4 / 8 k slices (clusters), several staged chunks per slice, vector and element loads, every
prologue. Attention: decode rows, chains and trees (extra roots, a block across a chunk edge),
one and several chunks, windows, 16 heads per KV head, scalar loads."""
import torch

import dspark

dev, gen = "cuda", torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen).to(dtype).to(dev)


for M, N, K, dt in [(1, 70, 4096, torch.bfloat16),
                    (2, 33, 13, torch.float32),
                    (9, 17, 1600, torch.float16),
                    (3, 9, 12300, torch.bfloat16),
                    (33, 300, 300, torch.bfloat16),
                    (70, 129, 1000, torch.float16),
                    (17, 40, 516, torch.float32),
                    (64, 257, 40, torch.bfloat16)]:
    for kind in ("plain", "norm", "gate"):
        x = rnd(M, 2 * K if kind == "gate" else K, dtype=dt)
        dspark.ops.fused_linear(x, rnd(N, K, dtype=dt), rnd(N, dtype=dt), rnd(M, N, dtype=dt),
                                rnd(K, dtype=dt) if kind == "norm" else None,
                                silu_gate=kind == "gate")
torch.cuda.synchronize()
print("sanitize_layers: linear done", flush=True)

TREE = [-1, 0, 0, 1, 2, 2, 4, -1, 7]
for B, T, H, Hkv, S, D, window, dt, tree in [
        (1, None, 32, 8, 300, 128, 0, torch.bfloat16, False),
        (2, None, 6, 3, 40, 12, 5, torch.float32, False),
        (3, None, 16, 1, 129, 64, 0, torch.float16, False),
        (2, 9, 8, 2, 300, 64, 0, torch.bfloat16, True),
        (2, 9, 4, 2, 140, 16, 3, torch.float32, True),
        (1, 16, 32, 8, 4100, 128, 0, torch.bfloat16, False),
        (2, 5, 6, 3, 40, 12, 0, torch.float16, True)]:
    rows = 1 if T is None else T
    k, v = rnd(2, B, Hkv, S, D, dtype=dt), rnd(2, B, Hkv, S, D, dtype=dt)
    pos = torch.randint(0, S - rows + 1, (B,), generator=gen).to(dev)
    inv = (1.0 / 10000 ** (torch.arange(0, D, 2) / D)).float().to(dev)
    qkv = (rnd(B, (H + 2 * Hkv) * D, dtype=dt) if T is None
           else rnd(B, T, (H + 2 * Hkv) * D, dtype=dt))
    parents = torch.tensor([TREE[:T]] * B, device=dev) if tree else None
    dspark.ops.decode_attention(qkv, k, v, 1, pos, inv, H, rnd(D, dtype=dt), rnd(D, dtype=dt),
                                window=window, parents=parents)
torch.cuda.synchronize()
print("sanitize_layers: done")
