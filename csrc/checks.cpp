// csrc/checks.cpp: every caller error gets a message that names the argument.
#include "checks.h"

#include <cmath>
#include <cstdlib>
#include <string>

#include "dspark/common.h"

namespace dspark {
namespace {

void check_common_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  DSPARK_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(),
               " like the logits, got ", t.device());
  DSPARK_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_logits(const at::Tensor& logits, const char* name) {
  DSPARK_CHECK_DIM(logits, 2, name);
  const auto dt = logits.scalar_type();
  DSPARK_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                    " must be float32, bfloat16 or float16, got ", dt);
  DSPARK_CHECK(logits.is_contiguous(), name, " must be contiguous");
  DSPARK_CHECK_VALUE(logits.size(1) >= 1 && logits.size(1) <= kMaxVocab, name,
                     " vocabulary size must be in [1, ", kMaxVocab, "], got ", logits.size(1));
}

}  // namespace

// Shared by every op that samples (verify, sample, markov_draft): per-request parameters [R]
// and the randomness (keyed seeds + positions, or the caller's uniforms).
void check_request_params(const at::Tensor& ref, int64_t R, const at::Tensor& temperature,
                          const at::Tensor& top_k, const at::Tensor& top_p,
                          const std::optional<at::Tensor>& seeds,
                          const std::optional<at::Tensor>& positions, bool has_uniforms) {
  DSPARK_CHECK_DIM(temperature, 1, "temperature");
  DSPARK_CHECK_SIZE(temperature, 0, R, "temperature");
  DSPARK_CHECK_DTYPE(temperature, at::kFloat, "temperature");
  DSPARK_CHECK_DIM(top_k, 1, "top_k");
  DSPARK_CHECK_SIZE(top_k, 0, R, "top_k");
  DSPARK_CHECK_DTYPE(top_k, at::kLong, "top_k");
  DSPARK_CHECK_DIM(top_p, 1, "top_p");
  DSPARK_CHECK_SIZE(top_p, 0, R, "top_p");
  DSPARK_CHECK_DTYPE(top_p, at::kFloat, "top_p");
  check_common_device(ref, temperature, "temperature");
  check_common_device(ref, top_k, "top_k");
  check_common_device(ref, top_p, "top_p");
  DSPARK_CHECK_VALUE(seeds.has_value() == positions.has_value(),
                     "seeds and positions must be given together (or neither)");
  // Neither seeds nor uniforms is fine for greedy requests; a sampled one raises kNoRandomness
  // (a data check: the temperatures live on the device).
  if (seeds.has_value()) {
    for (const auto& [t, name] : {std::pair{*seeds, "seeds"}, std::pair{*positions, "positions"}}) {
      DSPARK_CHECK_DIM(t, 1, name);
      DSPARK_CHECK_SIZE(t, 0, R, name);
      DSPARK_CHECK_DTYPE(t, at::kLong, name);
      check_common_device(ref, t, name);
    }
  }
}

VerifyDims check_verify_args(const at::Tensor& target_logits, const at::Tensor& node_offsets,
                             const at::Tensor& draft_tokens, const at::Tensor& parents,
                             const std::optional<at::Tensor>& draft_probs,
                             const at::Tensor& temperature, const at::Tensor& top_k,
                             const at::Tensor& top_p, const std::optional<at::Tensor>& seeds,
                             const std::optional<at::Tensor>& positions,
                             const std::optional<at::Tensor>& uniforms, int64_t max_nodes) {
  check_logits(target_logits, "target_logits");
  const int64_t N = target_logits.size(0), V = target_logits.size(1);
  DSPARK_CHECK_DIM(node_offsets, 1, "node_offsets");
  DSPARK_CHECK_DTYPE(node_offsets, at::kLong, "node_offsets");
  DSPARK_CHECK(node_offsets.size(0) >= 1, "node_offsets must hold R + 1 >= 1 entries, got ",
               node_offsets.size(0));
  const int64_t R = node_offsets.size(0) - 1;
  DSPARK_CHECK_VALUE(N >= R, "node_offsets gives ", R, " requests but target_logits has ", N,
                     " rows (each request needs at least its root row)");
  DSPARK_CHECK_VALUE(R > 0 || N == 0, "target_logits has ", N,
                     " rows but node_offsets gives no request (an empty batch has 0 rows)");
  DSPARK_CHECK_VALUE(max_nodes >= 1 && max_nodes <= 4096, "max_nodes must be in [1, 4096], got ",
                     max_nodes);
  for (const auto& [t, name] :
       {std::pair{draft_tokens, "draft_tokens"}, std::pair{parents, "parents"}}) {
    DSPARK_CHECK_DIM(t, 1, name);
    DSPARK_CHECK_SIZE(t, 0, N, name);
    DSPARK_CHECK_DTYPE(t, at::kLong, name);
    check_common_device(target_logits, t, name);
  }
  check_common_device(target_logits, node_offsets, "node_offsets");
  if (draft_probs.has_value()) {
    const auto& q = *draft_probs;
    DSPARK_CHECK_DIM(q, 2, "draft_probs");
    DSPARK_CHECK(q.size(0) == N && q.size(1) == V, "draft_probs must have shape [", N, ", ", V,
                 "] like target_logits, got ", q.sizes());
    DSPARK_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                      "draft_probs must be float32 or float64, got ", q.scalar_type());
    check_common_device(target_logits, q, "draft_probs");
  }
  if (uniforms.has_value()) {
    const auto& u = *uniforms;
    DSPARK_CHECK_DIM(u, 2, "uniforms");
    DSPARK_CHECK(u.size(0) == N && u.size(1) == 2, "uniforms must have shape [", N,
                 ", 2] (accept coin, sampling coin per node), got ", u.sizes());
    DSPARK_CHECK_DTYPE(u, at::kDouble, "uniforms");
    check_common_device(target_logits, u, "uniforms");
  }
  check_request_params(target_logits, R, temperature, top_k, top_p, seeds, positions,
                       uniforms.has_value());
  return {R, N, V, max_nodes, !draft_probs.has_value(), uniforms.has_value()};
}

SampleDims check_sample_args(const at::Tensor& logits, const at::Tensor& temperature,
                             const at::Tensor& top_k, const at::Tensor& top_p,
                             const std::optional<at::Tensor>& seeds,
                             const std::optional<at::Tensor>& positions,
                             const std::optional<at::Tensor>& uniforms) {
  check_logits(logits, "logits");
  const int64_t R = logits.size(0), V = logits.size(1);
  if (uniforms.has_value()) {
    DSPARK_CHECK_DIM(*uniforms, 1, "uniforms");
    DSPARK_CHECK_SIZE(*uniforms, 0, R, "uniforms");
    DSPARK_CHECK_DTYPE(*uniforms, at::kDouble, "uniforms");
    check_common_device(logits, *uniforms, "uniforms");
  }
  check_request_params(logits, R, temperature, top_k, top_p, seeds, positions,
                       uniforms.has_value());
  return {R, V, uniforms.has_value()};
}

LinearDims check_fused_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& residual,
                                   const std::optional<at::Tensor>& norm_weight, double eps,
                                   bool silu_gate) {
  DSPARK_CHECK_DIM(x, 2, "x");
  DSPARK_CHECK_DIM(weight, 2, "weight");
  const auto dt = x.scalar_type();
  DSPARK_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "x must be float32, bfloat16 or float16, got ", dt);
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  DSPARK_CHECK_VALUE(K >= 1, "weight must have at least one input feature, got shape ",
                     weight.sizes());
  DSPARK_CHECK_VALUE(x.size(1) == (silu_gate ? 2 * K : K), "x must have ", (silu_gate ? 2 * K : K),
                     " features for a weight of shape ", weight.sizes(),
                     (silu_gate ? " (silu_gate: gate and up halves)" : ""), ", got shape ",
                     x.sizes());
  DSPARK_CHECK_VALUE(!(silu_gate && norm_weight.has_value()),
                     "fused_linear takes one prologue: norm_weight or silu_gate, not both");
  DSPARK_CHECK_VALUE(M <= kLinearMaxRows, "x has ", M, " rows; at most ", kLinearMaxRows,
                     " are supported");
  DSPARK_CHECK_VALUE(K <= int64_t(1) << 30, "weight has ", K,
                     " input features; at most 2^30 are supported");
  DSPARK_CHECK_VALUE((N + 127) / 128 * ((M + 63) / 64) * 8 < (int64_t(1) << 31), "fused_linear of ",
                     M, " rows and ", N, " outputs exceeds the CUDA grid (2^31 blocks)");
  auto same = [&](const at::Tensor& t, const char* name) {
    DSPARK_CHECK_TYPE(t.scalar_type() == dt, name, " must have the dtype of x (", dt, "), got ",
                      t.scalar_type());
    DSPARK_CHECK(t.device() == x.device(), name, " must be on ", x.device(), " like x, got ",
                 t.device());
    DSPARK_CHECK(t.is_contiguous(), name, " must be contiguous");
  };
  same(x, "x");
  same(weight, "weight");
  if (bias) {
    DSPARK_CHECK_DIM(*bias, 1, "bias");
    DSPARK_CHECK_SIZE(*bias, 0, N, "bias");
    same(*bias, "bias");
  }
  if (residual) {
    DSPARK_CHECK_DIM(*residual, 2, "residual");
    DSPARK_CHECK(residual->size(0) == M && residual->size(1) == N, "residual must have shape [", M,
                 ", ", N, "] like the output, got ", residual->sizes());
    same(*residual, "residual");
  }
  if (norm_weight) {
    DSPARK_CHECK_DIM(*norm_weight, 1, "norm_weight");
    DSPARK_CHECK_SIZE(*norm_weight, 0, K, "norm_weight");
    same(*norm_weight, "norm_weight");
    DSPARK_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got ",
                       std::to_string(eps));
  }
  return {M, N, K, silu_gate ? 2 : norm_weight ? 1 : 0};
}

AttnDims check_decode_attention_args(const at::Tensor& qkv, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, int64_t layer,
                                     const at::Tensor& positions, const at::Tensor& inv_freq,
                                     const std::optional<at::Tensor>& q_norm_weight,
                                     const std::optional<at::Tensor>& k_norm_weight, double eps,
                                     int64_t num_heads, int64_t window,
                                     const std::optional<at::Tensor>& parents) {
  DSPARK_CHECK(qkv.dim() == 2 || qkv.dim() == 3,
               "qkv must be a 2-D [batch, width] or 3-D [batch, rows, width] tensor, got shape ",
               qkv.sizes());
  const auto dt = qkv.scalar_type();
  DSPARK_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "qkv must be float32, bfloat16 or float16, got ", dt);
  DSPARK_CHECK(k_cache.dim() == 5,
               "k_cache must be [layers, batch, kv_heads, slots, head_dim], got shape ",
               k_cache.sizes());
  DSPARK_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape ",
               k_cache.sizes(), ", got ", v_cache.sizes());
  const bool three_d = qkv.dim() == 3;
  const int64_t L = k_cache.size(0), B = k_cache.size(1), Hkv = k_cache.size(2),
                S = k_cache.size(3), D = k_cache.size(4), H = num_heads,
                T = three_d ? qkv.size(1) : 1;
  DSPARK_CHECK_VALUE(layer >= 0 && layer < L, "layer must be in [0, ", L, "), got ", layer);
  DSPARK_CHECK_VALUE(H >= 1 && Hkv >= 1 && H % Hkv == 0 && H / Hkv <= 16, "num_heads (", H,
                     ") must be a multiple of the cache's kv_heads (", Hkv,
                     "), at most 16 per KV head");
  DSPARK_CHECK_VALUE(D >= 2 && D <= 256 && D % 2 == 0,
                     "head_dim must be even and in [2, 256], got ", D);
  DSPARK_CHECK_VALUE(S >= 1, "the cache must have at least one slot");
  DSPARK_CHECK_VALUE(T >= 1 && T <= 64, "qkv must have 1 to 64 rows per request (dim 1), got ", T);
  // CUDA grid limits (requests on grid y, 128-slot chunks on grid z); the same contract on CPU.
  DSPARK_CHECK_VALUE(B <= 65535, "at most 65535 requests per call, got ", B);
  DSPARK_CHECK_VALUE(S <= int64_t(65535) * 128, "at most ", int64_t(65535) * 128,
                     " cache slots, got ", S);
  const int64_t width = (H + 2 * Hkv) * D;
  DSPARK_CHECK(qkv.size(0) == B && qkv.size(-1) == width, "qkv must have shape [", B,
               three_d ? ", rows, " : ", ", width, "] ((num_heads + 2 kv_heads) * head_dim), got ",
               qkv.sizes());
  DSPARK_CHECK_VALUE(window >= 0, "window must be >= 0 (0 = no sliding window), got ", window);
  auto same = [&](const at::Tensor& t, const char* name, at::ScalarType want) {
    DSPARK_CHECK_TYPE(t.scalar_type() == want, name, " must have dtype ", want, ", got ",
                      t.scalar_type());
    DSPARK_CHECK(t.device() == qkv.device(), name, " must be on ", qkv.device(), " like qkv, got ",
                 t.device());
    DSPARK_CHECK(t.is_contiguous(), name, " must be contiguous");
  };
  same(qkv, "qkv", dt);
  same(k_cache, "k_cache", dt);
  same(v_cache, "v_cache", dt);
  DSPARK_CHECK_DIM(positions, 1, "positions");
  DSPARK_CHECK_SIZE(positions, 0, B, "positions");
  same(positions, "positions", at::kLong);
  if (parents) {
    DSPARK_CHECK(parents->dim() == 2 && parents->size(0) == B && parents->size(1) == T,
                 "parents must have shape [", B, ", ", T,
                 "] (a parent id per row, -1 at roots), got ", parents->sizes());
    same(*parents, "parents", at::kLong);
  }
  DSPARK_CHECK_DIM(inv_freq, 1, "inv_freq");
  DSPARK_CHECK_SIZE(inv_freq, 0, D / 2, "inv_freq");
  same(inv_freq, "inv_freq", at::kFloat);
  for (const auto& [t, name] :
       {std::pair{q_norm_weight, "q_norm_weight"}, std::pair{k_norm_weight, "k_norm_weight"}}) {
    if (!t) continue;
    DSPARK_CHECK_DIM(*t, 1, name);
    DSPARK_CHECK_SIZE(*t, 0, D, name);
    same(*t, name, dt);
  }
  DSPARK_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps must be finite and >= 0, got ",
                     std::to_string(eps));
  return {B, T, H, Hkv, S, D, L, three_d};
}

bool& cuda_sync_checks() {
  static bool enabled = true;
  return enabled;
}

// CUDA verify / sample implementation: 0 = the one-launch fused kernel (default: its CUDA suites,
// memcheck and racecheck passed on an H100 on 2026-12-06, and it was faster than the staged
// pipeline in 22 of 24 bench_ops shapes, bench/RESULTS.md), 1 = the staged kernels
// (DSPARK_VERIFY_IMPL=staged, dspark.ops._verify_impl: the A/B reference).
int& cuda_verify_impl() {
  static int impl = [] {
    const char* env = std::getenv("DSPARK_VERIFY_IMPL");
    return env != nullptr && std::string(env) == "staged" ? 1 : 0;
  }();
  return impl;
}

void raise_on_status(int32_t status, const char* op, const StatusWording& wording) {
  if (status == 0) return;
  // A NaN or +inf logit also spoils its row's maximum, so the CUDA statistics may flag that row
  // as having no finite entry too: report what the input has (the CPU stops at the bad logit).
  if (status & kBadLogits) status &= ~kEmptyRow;
  std::string msg = std::string("dspark::") + op + ": bad input:";
  if (status & kBadLogits) msg += wording.logits;
  if (status & kEmptyRow) msg += wording.empty_row;
  if (status & kBadToken) msg += wording.token;
  if (status & kBadParent) msg += " parents must be -1 at each root and in [0, node) elsewhere;";
  if (status & kBadOffsets)
    msg +=
        " node_offsets must start at 0, end at N, increase strictly, and give <= max_nodes nodes "
        "per request;";
  if (status & kBadTemperature) msg += " temperature must be finite and >= 0 (0 = greedy);";
  if (status & kNoRandomness)
    msg +=
        " a sampled request (temperature > 0) needs randomness: pass seeds and positions, or "
        "uniforms (greedy requests need neither);";
  if (status & kBadTopK) msg += " top_k must be >= 0 (0 = off);";
  if (status & kBadTopP) msg += " top_p must be in (0, 1] (1 = off);";
  if (status & kBadDraftProbs) msg += " draft_probs must be finite and >= 0;";
  if (status & kBadUniform) msg += " uniforms must lie in [0, 1);";
  if (status & kBadPosition)
    msg += " positions must lie in [0, S): a slot of the KV cache (and positions + rows <= S);";
  msg.pop_back();
  TORCH_CHECK_VALUE(false, msg);  // a single std::string: no stream formatting
}

}  // namespace dspark
