// csrc/registration.cpp: the only file that writes op schemas.
#include <torch/library.h>

TORCH_LIBRARY(dspark, m) {
  m.set_python_module("dspark._fake");
  // Batched chain/tree verification over packed ragged requests.
  //   target_logits [N, V] f32|bf16|f16: row i = target logits after node i (root = anchor)
  //   node_offsets  [R+1] i64: request r owns nodes node_offsets[r] .. node_offsets[r+1]-1
  //   draft_tokens  [N] i64: token of each node (roots ignored)
  //   parents       [N] i64: parent's index within the request (-1 at roots, < own index)
  //   draft_probs   [N, V] f32|f64 or None: distribution each node was drawn from (None: one-hot)
  //   temperature, top_p [R] f32; top_k [R] i64; seeds, positions [R] i64 or uniforms [N, 2] f64
  // -> out_tokens [R, W] i64 (accepted drafts, then the bonus/correction; -1 padded),
  //    accept_count [R] i64 (accepted drafts, bonus excluded),
  //    accept_nodes [R, W] i64 (flat node indices: root, then accepted nodes; -1 padded)
  m.def(
      "verify(Tensor target_logits, Tensor node_offsets, Tensor draft_tokens, Tensor parents, "
      "Tensor? draft_probs, Tensor temperature, Tensor top_k, Tensor top_p, Tensor? seeds, "
      "Tensor? positions, Tensor? uniforms, int max_nodes) -> (Tensor, Tensor, Tensor)");
  // Fused sampling with per-request temperature/top-k/top-p (T = 0: argmax).
  //   logits [R, V] f32|bf16|f16; params as in verify; uniforms [R] f64
  // -> tokens [R] i64, probs [R, V] f64 (the exact distribution sampled from; [0, V] if not asked)
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor? seeds, "
      "Tensor? positions, Tensor? uniforms, bool return_probs) -> (Tensor, Tensor)");
  // Fused skinny linear layer of decode / verify forwards: one summation order for any M (a row's
  // result does not depend on the other rows); weights streamed once per 64 rows.
  //   x [M, K] (or [M, 2K] with silu_gate), weight [N, K], bias [N]?, residual [M, N]?,
  //   norm_weight [K]? (RMSNorm of x first, with eps); all one dtype f32|bf16|f16
  // -> out [M, N] = residual + weight @ xhat + bias, xhat = x | rmsnorm(x) * norm_weight |
  //    silu(x[:, :K]) * x[:, K:]
  m.def(
      "fused_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? norm_weight, "
      "float eps, bool silu_gate) -> Tensor");
  // Attention of T new tokens per request (decode: T = 1; verify: a causal chain or a token
  // tree) with QK-norm, rotary and the KV cache write folded in.
  //   qkv [B, (H + 2 Hkv) D] (T = 1) or [B, T, (H + 2 Hkv) D]; k_cache, v_cache [L, B, Hkv, S, D]
  //   (layer `layer`: row j is written at slot positions[b] + j); positions [B] i64: slot and
  //   position of row 0; parents [B, T] i64? (local ids, -1 at roots; None = a causal chain):
  //   row j sits at position positions[b] + depth(j) and attends the cache below positions[b]
  //   and its ancestors; inv_freq [D/2] f32; q/k_norm_weight [D]?; window: sliding window
  //   (0 = none). -> out [B, H * D] or [B, T, H * D]
  m.def(
      "decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, "
      "Tensor positions, Tensor inv_freq, Tensor? q_norm_weight, Tensor? k_norm_weight, float eps, "
      "int num_heads, int window, Tensor? parents=None) -> Tensor");
}
