"""Target/draft model runner: HF checkpoints (Llama, Mistral, Qwen2, Qwen3), static KV cache,
packed tree verification, hidden-state taps, CUDA graphs."""
from .config import ModelConfig
from .kv import KVCache
from .loader import load_model, load_tokenizer, resolve_dtype
from .runner import Forward, ModelRunner, tree_masks
from .transformer import FUSED_MAX_ROWS, Transformer

__all__ = ["ModelConfig", "KVCache", "load_model", "load_tokenizer", "resolve_dtype",
           "Forward", "ModelRunner", "tree_masks", "Transformer",
           "FUSED_MAX_ROWS"]
