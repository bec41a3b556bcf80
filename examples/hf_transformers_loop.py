"""Speculative decoding of a Hugging Face `transformers` model with dspark's ops as the only
dspark part: prompt-lookup drafts (dspark.ops.ngram_propose), one target forward over the
anchor + drafts, dspark.ops.verify for acceptance (greedy, or exact rejection sampling: the
output has the model's distribution), and the DynamicCache cropped back after rejections.

    python examples/hf_transformers_loop.py [MODEL_DIR] [--temperature T] [--max-new-tokens N]
(default model: dspark's shipped demo target; it loads with AutoModelForCausalLM)
"""
import argparse
import inspect
import os

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import dspark


@torch.inference_mode()
def generate(model, prompt: list, max_new_tokens: int, gamma: int = 4, temperature: float = 0.0,
             seed: int = 0) -> list:
    """Up to max_new_tokens tokens after ``prompt`` (ids), stopping after the model's EOS."""
    dev, eos = model.device, model.generation_config.eos_token_id
    eos = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    tokens = list(prompt)
    cache = DynamicCache()
    # the cache argument's name: `cache` since transformers 5.2x, `past_key_values` before
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    if len(tokens) > 1:  # the cache holds every committed token but the last one (the anchor)
        model(torch.tensor([tokens[:-1]], device=dev), **{kw: cache})
    offsets, parents = dspark.ops.chain_layout([gamma], dev)  # one request: a chain of gamma
    params = dspark.ops.sampling_tensors(1, temperature, device=dev)
    new = []
    while len(new) < max_new_tokens and not eos.intersection(new):
        ctx = torch.tensor([tokens], device=dev)
        block = dspark.ops.ngram_propose(ctx, torch.tensor([len(tokens)], device=dev), gamma)[0]
        logits = model(block[None], **{kw: cache}).logits[0]  # [gamma + 1, V]
        # drafts from prompt lookup are deterministic: draft_probs=None (target-only verification)
        res = dspark.ops.verify(logits.float(), offsets, block, parents, None, params,
                                seeds=torch.tensor([seed], device=dev),
                                positions=torch.tensor([len(tokens) - 1], device=dev),
                                max_nodes=gamma + 1)
        k = int(res.accept_count[0])
        if k < gamma:  # drop the rejected drafts' K/V: keep the anchor and the k accepted
            cache.crop(k - gamma)  # (a negative count removes entries, in transformers 4 and 5)
        kept = res.out_tokens[0, :k + 1].tolist()
        tokens += kept
        new += kept
    new = new[:max_new_tokens]
    for i, t in enumerate(new):  # end at the first EOS, like model.generate
        if t in eos:
            return new[:i + 1]
    return new


def main() -> None:
    here = os.path.dirname(os.path.abspath(dspark.__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=os.path.join(here, "demo_models", "target"))
    p.add_argument("--prompt", default="def read_config(path):\n")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    out = generate(model, tok.encode(args.prompt).ids, args.max_new_tokens,
                   temperature=args.temperature)
    print(args.prompt + tok.decode(out))


if __name__ == "__main__":
    main()
