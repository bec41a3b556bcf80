"""A vectorized plain-PyTorch chain verifier (GPU-capable), the yardstick bench_ops.py compares
dspark::verify against. It does what engines do without a fused kernel: softmax(logits / T) in
fp32 over every row, gather p(x) and q(x), accept the leading run of u < p/q, then sample the
correction from normalize(max(p - q, 0)) (or the bonus from p) with torch.multinomial-free
inverse CDF. Same work as our op, but no fusion; randomness differs, so only timing compares.
"""
import torch


def chain_verify_torch(target_logits, draft_tokens, draft_probs, temperature, gamma, uniforms):
    """target_logits [R*(g+1), V]; draft_tokens [R, g]; draft_probs [R*(g+1), V] (row i+1 = q of
    draft i) or None (greedy); temperature [R]; uniforms [R, g+1]
    -> (tokens [R, g+1], count [R])."""
    R = draft_tokens.shape[0]
    V = target_logits.shape[-1]
    logits = target_logits.view(R, gamma + 1, V).float()
    if draft_probs is None:  # greedy: accept while the draft equals the target argmax
        best = logits.argmax(-1)  # [R, g+1]
        match = (best[:, :gamma] == draft_tokens).int()
        count = torch.cumprod(match, 1).sum(1)
        out = torch.cat([draft_tokens, best[:, -1:]], 1)
        idx = torch.arange(gamma + 1, device=out.device)
        fixed = best.gather(1, count[:, None])
        out = torch.where(idx[None] == count[:, None], fixed, out)
        return torch.where(idx[None] <= count[:, None], out, -1), count
    p = torch.softmax(logits / temperature.view(R, 1, 1), -1)  # [R, g+1, V]
    q = draft_probs.view(R, gamma + 1, V)[:, 1:]
    px = p[:, :gamma].gather(2, draft_tokens[..., None])[..., 0]
    qx = q.gather(2, draft_tokens[..., None])[..., 0]
    accept = (uniforms[:, :gamma] * qx < px).int()
    count = torch.cumprod(accept, 1).sum(1)
    rows = torch.arange(R, device=p.device)
    p_final = p[rows, count]  # [R, V]
    q_final = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, count]
    resid = torch.clamp(p_final - q_final, min=0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_final)
    cdf = torch.cumsum(resid, -1)
    pick = torch.searchsorted(cdf, (uniforms[:, -1:] * cdf[:, -1:]).contiguous()).clamp(max=V - 1)
    idx = torch.arange(gamma + 1, device=p.device)
    out = torch.cat([draft_tokens, pick], 1)
    out = torch.where(idx[None] == count[:, None], pick, out)
    return torch.where(idx[None] <= count[:, None], out, -1), count
