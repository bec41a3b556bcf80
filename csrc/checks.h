// csrc/checks.h: argument checks with named messages, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <type_traits>

namespace dspark {
// Error messages are built with std::to_string and string concatenation, never by streaming
// numbers: a module that ends up with its own copy of libstdc++ (some toolchains link it
// statically) crashes formatting integers through torch's iostreams (seen on the H200 image).
inline void append(std::string& s, const char* x) { s += x; }
inline void append(std::string& s, const std::string& x) { s += x; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T x) {
  s += std::to_string(x);
}
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
inline void append(std::string& s, c10::IntArrayRef x) {
  s += "[";
  for (size_t i = 0; i < x.size(); ++i) s += (i ? ", " : "") + std::to_string(x[i]);
  s += "]";
}
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (append(s, a), ...);
  return s;
}
}  // namespace dspark

#define DSPARK_CHECK(cond, ...) TORCH_CHECK(cond, ::dspark::cat(__VA_ARGS__))
#define DSPARK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::dspark::cat(__VA_ARGS__))
#define DSPARK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::dspark::cat(__VA_ARGS__))
#define DSPARK_CHECK_DIM(t, d, name) \
  DSPARK_CHECK((t).dim() == (d), name, " must be a ", d, "-D tensor, got shape ", (t).sizes())
#define DSPARK_CHECK_DTYPE(t, dt, name)                                                 \
  DSPARK_CHECK_TYPE((t).scalar_type() == (dt), name, " must have dtype ", dt, ", got ", \
                    (t).scalar_type())
#define DSPARK_CHECK_SIZE(t, i, n, name)                                                           \
  DSPARK_CHECK((t).size(i) == (n), name, " must have size ", (n), " in dim ", (i), ", got shape ", \
               (t).sizes())

namespace dspark {

// Metadata-only checks (dtype, shape, device, contiguity); data checks happen in the kernels.
struct VerifyDims {
  int64_t R, N, V, W;
  bool onehot_q, has_uniforms;
};
VerifyDims check_verify_args(const at::Tensor& target_logits, const at::Tensor& node_offsets,
                             const at::Tensor& draft_tokens, const at::Tensor& parents,
                             const std::optional<at::Tensor>& draft_probs,
                             const at::Tensor& temperature, const at::Tensor& top_k,
                             const at::Tensor& top_p, const std::optional<at::Tensor>& seeds,
                             const std::optional<at::Tensor>& positions,
                             const std::optional<at::Tensor>& uniforms, int64_t max_nodes);

struct SampleDims {
  int64_t R, V;
  bool has_uniforms;
};
SampleDims check_sample_args(const at::Tensor& logits, const at::Tensor& temperature,
                             const at::Tensor& top_k, const at::Tensor& top_p,
                             const std::optional<at::Tensor>& seeds,
                             const std::optional<at::Tensor>& positions,
                             const std::optional<at::Tensor>& uniforms);

// Per-request sampling parameters temperature / top_k / top_p [R] and the randomness: seeds and
// positions [R] together, or (has_uniforms) neither. `ref`: the tensor whose device they share.
void check_request_params(const at::Tensor& ref, int64_t R, const at::Tensor& temperature,
                          const at::Tensor& top_k, const at::Tensor& top_p,
                          const std::optional<at::Tensor>& seeds,
                          const std::optional<at::Tensor>& positions, bool has_uniforms);

// dspark::fused_linear. prologue: 0 plain, 1 RMSNorm (norm_weight), 2 SiLU gate (x is [M, 2K]).
constexpr int64_t kLinearMaxRows = int64_t(1) << 24;  // rows per call (CUDA grid, int sizes)
struct LinearDims {
  int64_t M, N, K;
  int prologue;
};
LinearDims check_fused_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& residual,
                                   const std::optional<at::Tensor>& norm_weight, double eps,
                                   bool silu_gate);

// dspark::decode_attention. G = H / Hkv query heads per KV head; T rows per request (qkv
// [B, (H + 2 Hkv) D] is T = 1 with a 2-D output).
struct AttnDims {
  int64_t B, T, H, Hkv, S, D, L;
  bool three_d;
};
AttnDims check_decode_attention_args(const at::Tensor& qkv, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, int64_t layer,
                                     const at::Tensor& positions, const at::Tensor& inv_freq,
                                     const std::optional<at::Tensor>& q_norm_weight,
                                     const std::optional<at::Tensor>& k_norm_weight, double eps,
                                     int64_t num_heads, int64_t window,
                                     const std::optional<at::Tensor>& parents);

// Whether CUDA entry points read the kernels' status word back after a launch (a host sync) to
// raise on bad data. On by default; engines that validate their own inputs turn it off so a
// decode step never syncs (dspark.ops.sync_checks). CUDA-graph capture never reads it back.
bool& cuda_sync_checks();

// Which CUDA implementation of verify / sample runs (csrc/cuda/launch.h: VerifyImpl): 0 the
// fused kernel (the default), 1 the staged pipeline. An internal switch for A/B measurements:
// dspark._C.set_verify_impl, or DSPARK_VERIFY_IMPL=staged|fused in the environment at import.
int& cuda_verify_impl();

// The clauses of raise_on_status that name an op's own arguments (the rest are the same for
// every op): bad logits, an empty row, a bad token id.
struct StatusWording {
  const char* logits = " logits contain NaN or +inf (or logit/temperature overflows float32);";
  const char* empty_row = " a logits row has no finite entry (all -inf);";
  const char* token = " draft_tokens has an id outside [0, V) (-1 padding is not a token);";
};

// Turns a kernel status word (StatusBit flags) into a ValueError naming the bad argument.
void raise_on_status(int32_t status, const char* op, const StatusWording& wording = {});

}  // namespace dspark
