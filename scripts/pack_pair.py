"""Pack a trained benchmark pair so that a later GPU session can carry it instead of training it.

    python3 scripts/pack_pair.py PAIR_DIR OUT_DIR [--part-mib 15] [--drafters dspark dflash eagle3]

Writes OUT_DIR/pair.tgz.part-00, -01, ... (a gzipped tar of pair/target and pair/<drafter> split
into parts the device tool brings back: at most 16 MiB a file). The drafters' weights go in bf16:
load_drafter casts them to the target's dtype, and the pair's target is bf16, so nothing a run
computes changes, and target + three drafters fit the 64 MiB a device call can carry (the
DSpark drafter's fp32 file alone took that total to 64.1 MiB on 2026-12-06). gzip because the
repo grew: the plain tar (58 MiB) plus the tracked tree passed the 64 MiB on 2026-12-06 s13;
gzip -6 takes the pair to 46 MiB. Training leftovers (checkpoint/, data/, logs) stay out.
Reassemble with `cat pair.tgz.part-* | tar -C DIR -xzf -` (scripts/gpu_session.sh does, from
.data/).
"""
import argparse
import io
import os
import tarfile

import torch
from safetensors import safe_open
from safetensors.torch import save

WEIGHTS = "model.safetensors"


def bf16_weights(path: str) -> bytes:
    """The safetensors file with its floating tensors in bf16 (metadata kept)."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return save({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                 for k, v in tensors.items()}, metadata=meta)


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pair")
    ap.add_argument("out")
    ap.add_argument("--part-mib", type=int, default=15)
    ap.add_argument("--drafters", nargs="+", default=["dspark", "dflash", "eagle3"])
    args = ap.parse_args()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        target = os.path.join(args.pair, "target")
        for name in sorted(os.listdir(target)):  # config, tokenizer, bf16 weights: as they are
            tar.add(os.path.join(target, name), f"pair/target/{name}")
        for m in args.drafters:
            d = os.path.join(args.pair, m)
            if not os.path.isdir(d):
                continue  # a pair trained without it
            for name in sorted(os.listdir(d)):
                src = os.path.join(d, name)
                if name == WEIGHTS:
                    add_bytes(tar, f"pair/{m}/{name}", bf16_weights(src))
                elif name.endswith(".json") and os.path.isfile(src):
                    tar.add(src, f"pair/{m}/{name}")
    data, step = buf.getvalue(), args.part_mib << 20
    os.makedirs(args.out, exist_ok=True)
    for i in range(0, len(data), step):
        with open(os.path.join(args.out, f"pair.tgz.part-{i // step:02d}"), "wb") as f:
            f.write(data[i:i + step])
    print(f"packed {len(data) / 2**20:.1f} MiB into {-(-len(data) // step)} parts in {args.out}")


if __name__ == "__main__":
    main()
