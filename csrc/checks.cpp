// csrc/checks.cpp: every caller error gets a message that names the argument.
#include "checks.h"

#include <string>

#include "dspark/common.h"

namespace dspark {
namespace {

void check_common_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  DSPARK_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " like the logits, got ",
              t.device());
  DSPARK_CHECK(t.is_contiguous(), name, " must be contiguous");
}

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
                    "seeds and positions must be given together (or neither, with uniforms)");
  DSPARK_CHECK_VALUE(has_uniforms || seeds.has_value(),
                    "randomness needed: pass seeds and positions (keyed randomness) or uniforms");
  if (seeds.has_value()) {
    for (const auto& [t, name] : {std::pair{*seeds, "seeds"}, std::pair{*positions, "positions"}}) {
      DSPARK_CHECK_DIM(t, 1, name);
      DSPARK_CHECK_SIZE(t, 0, R, name);
      DSPARK_CHECK_DTYPE(t, at::kLong, name);
      check_common_device(ref, t, name);
    }
  }
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
  DSPARK_CHECK(node_offsets.size(0) >= 2, "node_offsets must hold R + 1 >= 2 entries, got ",
              node_offsets.size(0));
  const int64_t R = node_offsets.size(0) - 1;
  DSPARK_CHECK_VALUE(N >= R, "target_logits has ", N, " rows but ", R,
                    " requests need at least one (root) row each");
  DSPARK_CHECK_VALUE(max_nodes >= 1 && max_nodes <= 4096, "max_nodes must be in [1, 4096], got ",
                    max_nodes);
  for (const auto& [t, name] : {std::pair{draft_tokens, "draft_tokens"}, std::pair{parents, "parents"}}) {
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
  check_request_params(logits, R, temperature, top_k, top_p, seeds, positions, uniforms.has_value());
  return {R, V, uniforms.has_value()};
}

bool& cuda_sync_checks() {
  static bool enabled = true;
  return enabled;
}

void raise_on_status(int32_t status, const char* op) {
  if (status == 0) return;
  std::string msg = std::string("dspark::") + op + ": bad input:";
  if (status & kBadLogits) msg += " logits contain NaN or +inf (or logit/temperature overflows float32);";
  if (status & kEmptyRow) msg += " a logits row has no finite entry (all -inf);";
  if (status & kBadToken) msg += " draft_tokens has an id outside [0, V) (-1 padding is not a token);";
  if (status & kBadParent) msg += " parents must be -1 at each root and in [0, node) elsewhere;";
  if (status & kBadOffsets)
    msg += " node_offsets must start at 0, end at N, increase strictly, and give <= max_nodes nodes per request;";
  if (status & kBadTemperature) msg += " temperature must be finite and >= 0 (0 = greedy);";
  if (status & kBadTopK) msg += " top_k must be >= 0 (0 = off);";
  if (status & kBadTopP) msg += " top_p must be in (0, 1] (1 = off);";
  if (status & kBadDraftProbs) msg += " draft_probs must be finite and >= 0;";
  if (status & kBadUniform) msg += " uniforms must lie in [0, 1);";
  msg.pop_back();
  TORCH_CHECK_VALUE(false, msg);  // a single std::string: no stream formatting
}

}  // namespace dspark
