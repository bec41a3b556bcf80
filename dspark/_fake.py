"""Fake (meta) kernels: output shapes depend only on input shapes and int/bool arguments."""
import torch


def _same_device(ref, **tensors):
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device,
                         lambda: f"{name} must be on {ref.device} like the logits, got {t.device}")


@torch.library.register_fake("dspark::verify")
def _verify_fake(target_logits, node_offsets, draft_tokens, parents, draft_probs, temperature,
                 top_k, top_p, seeds, positions, uniforms, max_nodes):
    torch._check(node_offsets.dim() == 1 and node_offsets.shape[0] >= 1,
                 lambda: "node_offsets must be [R + 1] with R >= 0")
    torch._check(target_logits.dim() == 2, lambda: "target_logits must be [N, V]")
    _same_device(target_logits, node_offsets=node_offsets, draft_tokens=draft_tokens,
                 parents=parents, draft_probs=draft_probs, temperature=temperature, top_k=top_k,
                 top_p=top_p, seeds=seeds, positions=positions, uniforms=uniforms)
    r = node_offsets.shape[0] - 1
    new = draft_tokens.new_empty
    return new((r, max_nodes)), new((r,)), new((r, max_nodes))


@torch.library.register_fake("dspark::sample")
def _sample_fake(logits, temperature, top_k, top_p, seeds, positions, uniforms, return_probs):
    torch._check(logits.dim() == 2, lambda: "logits must be [R, V]")
    _same_device(logits, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                 positions=positions, uniforms=uniforms)
    r, v = logits.shape
    tokens = logits.new_empty((r,), dtype=torch.long)
    probs = logits.new_empty((r if return_probs else 0, v), dtype=torch.float64)
    return tokens, probs


@torch.library.register_fake("dspark::fused_linear")
def _fused_linear_fake(x, weight, bias, residual, norm_weight, eps, silu_gate):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
    k = weight.shape[1] * (2 if silu_gate else 1)
    torch._check(x.shape[1] == k, lambda: f"x must have {k} features, got {x.shape[1]}")
    _same_device(x, weight=weight, bias=bias, residual=residual, norm_weight=norm_weight)
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("dspark::decode_attention")
def _decode_attention_fake(qkv, k_cache, v_cache, layer, positions, inv_freq, q_norm_weight,
                           k_norm_weight, eps, num_heads, window, parents=None):
    torch._check(qkv.dim() in (2, 3) and k_cache.dim() == 5,
                 lambda: "qkv must be 2-D or 3-D, k_cache 5-D")
    _same_device(qkv, k_cache=k_cache, v_cache=v_cache, positions=positions, inv_freq=inv_freq,
                 q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, parents=parents)
    return qkv.new_empty((*qkv.shape[:-1], num_heads * k_cache.shape[4]))


@torch.library.register_fake("dspark::commit_tokens")
def _commit_tokens_fake(tokens, n_tokens, active, out_tokens, accept_count, stop_tokens,
                        prompt_lens, max_new, round_active, round_accepts, rounds, any_active):
    torch._check(tokens.dim() == 2 and out_tokens.dim() == 2,
                 lambda: "tokens and out_tokens must be 2-D")
    _same_device(tokens, n_tokens=n_tokens, active=active, out_tokens=out_tokens,
                 accept_count=accept_count, stop_tokens=stop_tokens, prompt_lens=prompt_lens,
                 max_new=max_new, round_active=round_active, round_accepts=round_accepts,
                 rounds=rounds, any_active=any_active)
    return None  # in place


@torch.library.register_fake("dspark::ngram_propose")
def _ngram_propose_fake(tokens, n_tokens, gamma, max_ngram, min_ngram):
    torch._check(tokens.dim() == 2, lambda: "tokens must be [B, C]")
    torch._check(1 <= gamma <= 4095, lambda: f"gamma must be in [1, 4095], got {gamma}")
    _same_device(tokens, n_tokens=n_tokens)
    return tokens.new_empty((tokens.shape[0], gamma + 1))


@torch.library.register_fake("dspark::schedule_prefix")
def _schedule_prefix_fake(confidences, draft_lengths, sps, mode, threshold=0.0, budget=None):
    torch._check(confidences.dim() == 2, lambda: "confidences must be [R, gamma]")
    torch._check(draft_lengths.dim() == 1 and draft_lengths.shape[0] == confidences.shape[0],
                 lambda: "draft_lengths must be [R]")
    _same_device(confidences, draft_lengths=draft_lengths, sps=sps, budget=budget)
    return draft_lengths.new_empty((confidences.shape[0],))


@torch.library.register_fake("dspark::schedule_budget")
def _schedule_budget_fake(confidences, draft_lengths, sps):
    torch._check(confidences.dim() == 2, lambda: "confidences must be [R, gamma]")
    _same_device(confidences, draft_lengths=draft_lengths, sps=sps)
    return draft_lengths.new_empty(())


@torch.library.register_fake("dspark::kv_commit")
def _kv_commit_fake(k_cache, v_cache, start, accept_nodes, accept_count, node_offsets,
                    block_table=None):
    torch._check(k_cache.dim() == 5 and accept_nodes.dim() == 2,
                 lambda: "k_cache must be 5-D and accept_nodes [B, W]")
    _same_device(k_cache, v_cache=v_cache, start=start, accept_nodes=accept_nodes,
                 accept_count=accept_count, node_offsets=node_offsets, block_table=block_table)
    B, W = accept_nodes.shape
    lengths = start.new_empty((B,))
    if block_table is None:
        return lengths, start.new_empty((B, 0))
    page_size = k_cache.shape[2]
    return lengths, block_table.new_empty((B, (W - 1 + page_size - 1) // page_size))


@torch.library.register_fake("dspark::markov_draft")
def _markov_draft_fake(base_logits, anchors, w1, w2, hidden, conf_weight, conf_bias, temperature,
                       top_k, top_p, seeds, positions, return_probs):
    torch._check(base_logits.dim() == 3, lambda: "base_logits must be [R, gamma, V]")
    torch._check(w1.dim() == 2 and w2.dim() == 2, lambda: "w1 and w2 must be 2-D")
    _same_device(base_logits, anchors=anchors, w1=w1, w2=w2, hidden=hidden,
                 conf_weight=conf_weight, conf_bias=conf_bias, temperature=temperature,
                 top_k=top_k, top_p=top_p, seeds=seeds, positions=positions)
    r, g, v = base_logits.shape
    tokens = base_logits.new_empty((r, g), dtype=torch.long)
    conf = base_logits.new_empty((r if conf_weight is not None else 0, g), dtype=torch.float32)
    probs = base_logits.new_empty((r if return_probs else 0, g, v), dtype=torch.float64)
    return tokens, conf, probs
