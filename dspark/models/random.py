"""Random models for demos, tests and benchmarks: a Transformer whose weights make it
"opinionated" (large logits, varied norms), optionally a noisy copy of another seed's model, which
then acts as a correlated draft model for it."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .transformer import Transformer


def random_transformer(config: ModelConfig, seed: int, noise: float = 0.0,
                       weight_std: float = 0.3) -> Transformer:
    """Norm weights U(0.5, 1.5), matrices N(0, weight_std), embeddings / biases N(0, 1); with
    ``noise`` > 0 the same model (same seed) plus relative Gaussian noise on every weight."""
    torch.manual_seed(seed)
    model = Transformer(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, weight_std if p.dim() > 1 and "embed" not in name else 1.0)
            if noise:
                p.add_(torch.randn(p.shape, generator=gen) * noise * p.std())
    return model.eval()
