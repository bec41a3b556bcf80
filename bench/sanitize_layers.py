"""A few dspark::fused_linear / dspark::decode_attention calls over odd shapes (vector and scalar
paths, one and several K chunks / cache chunks, windows) for compute-sanitizer memcheck and
racecheck: `compute-sanitizer --tool racecheck python3 bench/sanitize_layers.py`."""
import torch

import dspark

dev, gen = "cuda", torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=gen).to(dtype).to(dev)


for M, N, K, dt in [(1, 70, 4096, torch.bfloat16), (2, 33, 13, torch.float32),
                    (8, 17, 1600, torch.float16), (3, 9, 12300, torch.bfloat16)]:
    for kind in ("plain", "norm", "gate"):
        x = rnd(M, 2 * K if kind == "gate" else K, dtype=dt)
        dspark.ops.fused_linear(x, rnd(N, K, dtype=dt), rnd(N, dtype=dt), rnd(M, N, dtype=dt),
                                rnd(K, dtype=dt) if kind == "norm" else None,
                                silu_gate=kind == "gate")
for B, H, Hkv, S, D, window, dt in [(1, 32, 8, 300, 128, 0, torch.bfloat16),
                                    (2, 6, 3, 40, 12, 5, torch.float32),
                                    (3, 16, 1, 129, 64, 0, torch.float16)]:
    k, v = rnd(2, B, Hkv, S, D, dtype=dt), rnd(2, B, Hkv, S, D, dtype=dt)
    pos = torch.randint(0, S, (B,), generator=gen).to(dev)
    inv = (1.0 / 10000 ** (torch.arange(0, D, 2) / D)).float().to(dev)
    dspark.ops.decode_attention(rnd(B, (H + 2 * Hkv) * D, dtype=dt), k, v, 1, pos, inv, H,
                                rnd(D, dtype=dt), rnd(D, dtype=dt), window=window)
torch.cuda.synchronize()
print("sanitize_layers: done")
