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

// The speculative step's bookkeeping, one kernel each (a fragment of the same library, so this
// block merges as an append).
TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.set_python_module("dspark._fake");
  // Commit verified tokens to the per-request state and log the round (in place), as
  // SpecState.append then log_round (dspark/reference.py: commit_tokens).
  //   tokens [B, C] i64, n_tokens [B] i64, active [B] bool: the state (updated)
  //   out_tokens [B, W] i64 (W >= 1), accept_count [B] i64: verify's outputs; an active request
  //     commits clamp(accept_count + 1, 0, W) tokens
  //   stop_tokens [B, S] i64 (-1 padded), prompt_lens, max_new [B] i64: when a request ends
  //   round_active [Rmax, B] bool, round_accepts [Rmax, B] i64: row min(rounds, Rmax - 1) gets the
  //     active flags before the commit and accept_count; rounds [] i64 += 1;
  //   any_active [] bool <- any(active) after the commit
  m.def(
      "commit_tokens(Tensor(a!) tokens, Tensor(b!) n_tokens, Tensor(c!) active, Tensor out_tokens, "
      "Tensor accept_count, Tensor stop_tokens, Tensor prompt_lens, Tensor max_new, "
      "Tensor(d!) round_active, Tensor(e!) round_accepts, Tensor(f!) rounds, "
      "Tensor(g!) any_active) -> ()");
  // Prompt-lookup (n-gram) drafts, as NgramDrafter.propose (dspark/reference.py: ngram_propose).
  //   tokens [B, C] i64, n_tokens [B] i64 in [1, C]: committed tokens tokens[b, :n_tokens[b]]
  // -> drafts [B, gamma + 1] i64: the anchor tokens[b, n - 1], then gamma drafts
  m.def(
      "ngram_propose(Tensor tokens, Tensor n_tokens, int gamma, int max_ngram, int min_ngram) -> "
      "Tensor");
}

// The prefix scheduler (docs/method.md "Scheduling"; dspark/reference.py: schedule_prefix,
// schedule_budget): per-request verify lengths, static shapes, no host sync.
TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.set_python_module("dspark._fake");
  // Verify lengths from calibrated confidences and the steps-per-second table.
  //   confidences [R, gamma] f32 in [0, 1]: c[r, j] = P(draft j accepted | drafts < j accepted)
  //   draft_lengths [R] i64 in [0, gamma]; sps [Bmax] f32 > 0: steps/s of a verify forward of
  //   B = index + 1 tokens (required in sync mode); mode: 'sync' (Algorithm 1, early stop),
  //   'async' (the top `budget` candidates: budget [] i64), 'threshold' (leading c >= threshold),
  //   'fixed' (every draft)
  // -> lengths [R] i64 in [0, draft_lengths[r]]
  m.def(
      "schedule_prefix(Tensor confidences, Tensor draft_lengths, Tensor? sps, str mode, "
      "float threshold=0., Tensor? budget=None) -> Tensor");
  // The asynchronous variant's token budget: the first argmax over n of Theta_n on the whole
  // greedy path (no early stop), from confidences two steps old.
  //   confidences [R, gamma] f32, draft_lengths [R] i64, sps [Bmax] f32 -> budget [] i64
  m.def("schedule_budget(Tensor confidences, Tensor draft_lengths, Tensor sps) -> Tensor");
}

// KV-cache compaction after verify (dspark/reference.py: kv_commit): the accepted path's K/V
// moved to the slots right after the committed prefix, every layer, K and V in one launch.
TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.set_python_module("dspark._fake");
  //   k_cache, v_cache (updated): [L, B, H, S, D] (contiguous; the layer stride may be any), or
  //     [L, P, page_size, H, D] (paged: P pages of page_size token rows) with block_table
  //   start [B] i64: slot of each request's root (node j of its verified tree sits at start + j)
  //   accept_nodes [B, W] i64, accept_count [B] i64, node_offsets [B + 1] i64: verify's outputs
  //     (flat node ids, root first) and node layout; accept_count -1 = inactive (nothing moved)
  //   block_table [B, pages_per_request] i32|i64 or None: physical page of each logical page
  // -> lengths [B] i64 (start + accept_count + 1: the cache length after the commit),
  //    freed [B, F] (block_table's dtype, F = ceil((W - 1) / page_size); [B, 0] i64 when
  //    contiguous): pages the verified block used past the new length, -1 padded
  m.def(
      "kv_commit(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor start, Tensor accept_nodes, "
      "Tensor accept_count, Tensor node_offsets, Tensor? block_table=None) -> (Tensor, Tensor)");
}

// DSpark's sequential draft stage (docs/method.md "Drafter"; dspark/reference.py: markov_draft):
// for k = 1..gamma, z_k = U_k + W1[x_{k-1}] W2 (bias rounded to the weights' dtype), x_k drawn
// from z_k exactly as sample draws (keyed by seed, positions + k - 1), conf_k = w.[h_k;
// W1[x_{k-1}]] + b. Static shapes, no host sync inside (capturable).
//   base_logits [R, gamma, V] f32 or the weights' dtype; anchors [R] i64 (x_0)
//   w1 [V, rank], w2 [rank, V] f32|bf16|f16 (one dtype); hidden [R, gamma, d], conf_weight
//   [d + rank], conf_bias [1] (the weights' dtype; all three or none); temperature, top_p [R] f32,
//   top_k [R] i64; seeds, positions [R] i64 (positions: the anchor's)
// -> tokens [R, gamma] i64, conf_logits [R, gamma] f32 ([0, gamma] without the head),
//    probs [R, gamma, V] f64: the distribution each token was drawn from ([0, gamma, V] if not
//    asked)
TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.set_python_module("dspark._fake");
  m.def(
      "markov_draft(Tensor base_logits, Tensor anchors, Tensor w1, Tensor w2, Tensor? hidden, "
      "Tensor? conf_weight, Tensor? conf_bias, Tensor temperature, Tensor top_k, Tensor top_p, "
      "Tensor seeds, Tensor positions, bool return_probs) -> (Tensor, Tensor, Tensor)");
}
