"""Profile speculative steps with torch.profiler: where a round's time goes, per stage.

One warm-up generate(), then one profiled generate() on the same prompts; writes the Chrome trace
(open it in Perfetto or chrome://tracing) and a JSON summary, and prints the table of
dspark.profiling.format_summary: per stage the host time per call, the GPU kernel time it
launched and its top kernels; then the GPU's busy / idle time per round and the gaps between
kernels. ``--whole-step``: the step as the engine runs it by default on a GPU (one CUDA graph per
step: kernels all belong to "step"); otherwise one graph per stage, which names each kernel's
stage at the price of slower rounds.

    python bench/profile_step.py --target out/pair/target --drafter out/pair/dspark \
        --dataset .data/humaneval.jsonl --prompts 4 --max-new-tokens 64 --out $OUT/profile
"""
import argparse
import json
import os

import torch

from dspark.benchmark import load_prompts
from dspark.drafters import NgramDrafter, load_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import load_model, load_tokenizer
from dspark.profiling import format_summary, profile_generate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafter", default=None, help="drafter dir (else --ngram or plain decoding)")
    ap.add_argument("--ngram", type=int, default=None)
    ap.add_argument("--dataset", required=True, help="DeepSpec-format jsonl prompt set")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--gamma", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--compile", action="store_true", help="compile the drafter and the target")
    ap.add_argument("--whole-step", action="store_true", help="one CUDA graph per step")
    ap.add_argument("--out", required=True, help="dir for trace.json.gz and summary.json")
    a = ap.parse_args()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(a.target, device, a.dtype)
    tok = load_tokenizer(a.target)
    drafter = None
    if a.drafter:
        drafter = load_drafter(a.drafter, model, a.gamma)
    elif a.ngram:
        drafter = NgramDrafter(a.gamma or 4, max_ngram=a.ngram)
    engine = SpeculativeEngine(model, drafter, nvtx=True, stage_times=not a.whole_step,
                               compile=a.compile)
    prompts = load_prompts(a.dataset, tok, a.prompts, a.prompt_tokens)
    os.makedirs(a.out, exist_ok=True)
    s = profile_generate(engine, prompts, os.path.join(a.out, "trace.json.gz"),
                         max_new_tokens=a.max_new_tokens, temperature=a.temperature)
    s["config"] = vars(a)
    s["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    print(format_summary(s))


if __name__ == "__main__":
    main()
