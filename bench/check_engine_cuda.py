"""On the GPU: greedy speculative == greedy autoregressive for each drafter, and no host sync
inside a speculative step (torch sync debug mode).

fp32 (small random Qwen3 model): draft-model chain / tree, n-gram, the torch.compile'd target,
and the cuBLAS path (fused=False). bf16 (the batch-invariance property, docs/DESIGN.md 6): the
same drafters and the shipped DSpark pair on the runner's default path (dspark kernels up to
FUSED_MAX_ROWS rows), and batch_invariant=True at 16 requests (80 verify rows, above the
threshold).

    python bench/check_engine_cuda.py [--no-compile]   (skip the torch.compile'd target cases)"""
import os
import sys

import torch

from dspark.demo import DEMO_MODELS, _random_qwen3
from dspark.drafters import DraftModelDrafter, NgramDrafter, load_drafter
from dspark.engine import SpeculativeEngine
from dspark.models import load_model


def main():
    V = 256
    prompts4 = [[1, 2, 3, 4, 1, 2, 3, 4], [10, 20, 30], [5, 6, 5, 6, 5, 6], [9] * 12]
    prompts16 = [[(7 * i + j) % V for j in range(3 + i % 5)] + [1, 2, 1, 2] for i in range(16)]
    demo_prompts = [[5, 80, 17, 301, 44, 9], [12, 13, 14], [700, 31, 2, 2, 2, 8, 1000], [3]]
    bad, total = 0, 0
    models = {}

    def rq(dtype, noise=0.0):
        key = (dtype, noise)
        if key not in models:
            models[key] = _random_qwen3(V, 7, noise, "cuda").to(dtype)
        return models[key]

    def demo():
        if "demo" not in models:
            target = load_model(os.path.join(DEMO_MODELS, "target"), "cuda", torch.bfloat16)
            models["demo"] = (target, load_drafter(os.path.join(DEMO_MODELS, "dspark"), target))
        return models["demo"]

    f32, bf16 = torch.float32, torch.bfloat16
    chain = lambda dt: DraftModelDrafter(rq(dt, 0.05), gamma=4)  # noqa: E731
    tree = lambda dt: DraftModelDrafter(rq(dt, 0.05), gamma=4, tree_topk=3)  # noqa: E731
    ngram = lambda dt: NgramDrafter(gamma=4)  # noqa: E731
    cases = []  # (name, target, drafter factory, engine kwargs, prompts)
    for p in (prompts4, prompts4[:2], prompts4[1:2]):
        for name, make in (("chain", chain), ("tree", tree), ("ngram", ngram)):
            cases.append((f"f32 {name} B={len(p)}", lambda: rq(f32), lambda m=make: m(f32), {}, p))
        if len(p) != 2 and "--no-compile" not in sys.argv:
            cases.append((f"f32 chain+compile B={len(p)}", lambda: rq(f32), lambda: chain(f32),
                          dict(compile=True), p))
        cases.append((f"f32 chain cuBLAS B={len(p)}", lambda: rq(f32), lambda: chain(f32),
                      dict(fused=False), p))
    for p in (prompts4, prompts4[1:2]):
        for name, make in (("chain", chain), ("tree", tree), ("ngram", ngram)):
            cases.append((f"bf16 {name} B={len(p)}", lambda: rq(bf16), lambda m=make: m(bf16),
                          {}, p))
    for b in (4, 1):
        cases.append((f"bf16 dspark-demo B={b}", lambda: demo()[0], lambda: demo()[1], {},
                      demo_prompts[:b]))
    cases.append(("bf16 chain batch_invariant B=16", lambda: rq(bf16), lambda: chain(bf16),
                  dict(batch_invariant=True), prompts16))
    for name, target, make, kw, prompts in cases:
        eng = SpeculativeEngine(target(), make(), **kw)
        out = eng.generate(prompts, max_new_tokens=48, temperature=0.0, stop_tokens=[])
        ref = eng.generate_autoregressive(prompts, max_new_tokens=48, temperature=0.0,
                                          stop_tokens=[])
        same = out.tokens == ref.tokens
        bad += not same
        # A third call with the same shapes, with sync debugging: the step stages replay the
        # graphs the first call captured, and any host sync inside the step raises.
        st_ok = True
        try:
            orig = eng._step
            def checked(st, timer, _orig=orig):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return _orig(st, timer)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            eng._step = checked
            eng.generate(prompts, max_new_tokens=48, temperature=1.0, seed=1)
        except RuntimeError as e:
            st_ok = False
            print("  sync inside step:", str(e).splitlines()[0])
        print(f"{name}: identical={same} tau={out.metrics.tau:.2f} step_sync_free={st_ok}",
              flush=True)
        bad += not st_ok
        total += 2
    print(f"check_engine_cuda: {total - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
