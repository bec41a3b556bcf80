// csrc/cuda/verify_kernels.cu: instantiates the header-only verify kernels
// (include/dspark/verify.cuh) for each (logits, draft_probs) dtype pair. They serve dspark::verify
// and dspark::sample alike: sample is verify of requests with no drafts.
#include "cuda/dispatch.cuh"
#include "cuda/launch.h"
#include "dspark/verify.cuh"

namespace dspark {

size_t verify_workspace_bytes(int64_t N, int64_t R, int64_t W, int64_t V) {
  return cuda::verify_workspace_bytes(N, R, W, V);
}

namespace {
template <typename S, typename Q>
cudaError_t run(const VerifyArgs& a, cudaStream_t stream) {
  cuda::VerifyParams<S, Q> p{};  // C and vec_loads: launch_verify sets them
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
