"""On the GPU: greedy speculative == greedy autoregressive (fp32, small random Qwen3 model) for
each drafter, and no host sync inside a speculative step (torch sync debug mode).

    python bench/check_engine_cuda.py [--no-compile]   (skip the torch.compile'd target cases)"""
import sys

import torch

from dspark.demo import _random_qwen3
from dspark.drafters import DraftModelDrafter, NgramDrafter
from dspark.engine import SpeculativeEngine


def main():
    V = 256
    target = _random_qwen3(V, seed=7, device="cuda")
    prompts4 = [[1, 2, 3, 4, 1, 2, 3, 4], [10, 20, 30], [5, 6, 5, 6, 5, 6], [9] * 12]
    bad = 0
    def draft_lm():
        return _random_qwen3(V, 7, 0.05, "cuda")
    chain = lambda: DraftModelDrafter(draft_lm(), gamma=4)  # noqa: E731
    cases = [("chain", chain, False),
             ("tree", lambda: DraftModelDrafter(draft_lm(), gamma=4, tree_topk=3), False),
             ("ngram", lambda: NgramDrafter(gamma=4), False),
             ("chain+compile", chain, True)]  # torch.compile'd target runner (own AR baseline)
    # Batches of 4 decode on cuBLAS + SDPA; batches of <= 2 (FUSED_MAX_ROWS) decode on
    # dspark::fused_linear + dspark::decode_attention, so both target paths are checked.
    cases = [(f"{name} B={len(p)}", make, compile, p)
             for p in (prompts4, prompts4[:2], prompts4[1:2])
             for name, make, compile in cases
             if not compile or (len(p) != 2 and "--no-compile" not in sys.argv)]
    for name, make, compile, prompts in cases:
        eng = SpeculativeEngine(target, make(), compile=compile)
        out = eng.generate(prompts, max_new_tokens=48, temperature=0.0)
        ref = eng.generate_autoregressive(prompts, max_new_tokens=48, temperature=0.0)
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
        print(f"{name}: identical={same} tau={out.metrics.tau:.2f} step_sync_free={st_ok}")
        bad += not st_ok
    print(f"check_engine_cuda: {len(cases) * 2 - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
