// csrc/cuda/verify_kernels.cu: instantiates the header-only verify kernels for each (logits,
// draft_probs) dtype pair: the fused kernel (include/dspark/verify_fused.cuh) and the staged
// pipeline it replaces (include/dspark/verify.cuh), chosen per call by VerifyArgs::impl. They
// serve dspark::verify and dspark::sample alike: sample is verify of requests with no drafts.
#include <algorithm>
#include <cstdlib>

#include "cuda/dispatch.cuh"
#include "cuda/launch.h"
#include "dspark/verify.cuh"
#include "dspark/verify_fused.cuh"

namespace dspark {

int device_sms() {
  static int cached[64] = {};
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (dev < 64 && cached[dev]) return cached[dev];
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    return 132;
  if (dev < 64) cached[dev] = sms;
  return sms;
}

namespace {
// DSPARK_FUSED_LAG=<requests>: the residual tickets' lag (A/B knob; unset: the plan's default).
int64_t fused_lag() {
  static const int64_t lag = [] {
    const char* env = std::getenv("DSPARK_FUSED_LAG");
    return env ? std::max<int64_t>(0, std::atoll(env)) : int64_t(0);
  }();
  return lag;
}
}  // namespace

VerifyImpl verify_impl_for(VerifyImpl wanted, int64_t R, int64_t W, int64_t V, bool has_q) {
  if (wanted != VerifyImpl::kFused) return wanted;
  const cuda::FusedPlan pl = cuda::fused_plan(V, R, W, has_q, device_sms());
  return cuda::fused_grid(pl, R) <= INT32_MAX ? VerifyImpl::kFused : VerifyImpl::kStaged;
}

size_t verify_workspace_bytes(VerifyImpl impl, int64_t N, int64_t R, int64_t W, int64_t V) {
  const int64_t chunk = impl == VerifyImpl::kFused ? cuda::kWarpChunk : kChunk;
  return cuda::verify_workspace_layout(N, R, W, V, nullptr, chunk).bytes;
}

int64_t verify_control_words(VerifyImpl impl, int64_t R) {
  return impl == VerifyImpl::kFused ? cuda::fused_control_words(R) : 1;
}

namespace {
template <typename S, typename Q>
cudaError_t run(const VerifyArgs& a, cudaStream_t stream) {
  cuda::VerifyParams<S, Q> p{};  // C, vec_loads, q_vec_loads: the launchers set them
  p.logits = static_cast<const S*>(a.logits);
  p.q = static_cast<const Q*>(a.draft_probs);
  p.N = a.N;
  p.V = a.V;
  p.R = a.R;
  p.W = a.W;
  p.offsets = a.offsets;
  p.tokens = a.tokens;
  p.parents = a.parents;
  p.temperature = a.temperature;
  p.top_k = a.top_k;
  p.top_p = a.top_p;
  p.seeds = a.seeds;
  p.positions = a.positions;
  p.uniforms = a.uniforms;
  p.out_tokens = a.out_tokens;
  p.out_count = a.out_count;
  p.out_nodes = a.out_nodes;
  p.probs = a.probs;
  p.status = a.status;
  if (a.impl == VerifyImpl::kFused)
    return cuda::launch_verify_fused(p, a.workspace, a.status, device_sms(), fused_lag(), stream);
  return cuda::launch_verify(p, a.workspace, stream);
}

template <typename S>
cudaError_t run_q(const VerifyArgs& a, cudaStream_t stream) {
  switch (a.draft_type) {
    case DraftType::kFloat64: return run<S, double>(a, stream);
    default: return run<S, float>(a, stream);  // kNone: q == nullptr, never dereferenced
  }
}
}  // namespace

cudaError_t launch_verify(const VerifyArgs& a, cudaStream_t stream) {
  return with_element_type(a.logits_type, [&](auto t) { return run_q<decltype(t)>(a, stream); });
}

}  // namespace dspark
