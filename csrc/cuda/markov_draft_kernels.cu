// csrc/cuda/markov_draft_kernels.cu: instantiates the header-only markov_draft kernels
// (include/dspark/markov_draft.cuh) for each weight dtype, with base logits in fp32 or in the
// weights' dtype (what the entry point accepts).
#include "cuda/dispatch.cuh"
#include "cuda/markov_draft_launch.h"
#include "dspark/markov_draft.cuh"  // launch_markov_draft, markov_workspace

namespace dspark {

size_t markov_workspace_bytes(int64_t R, int64_t G, int64_t V) {
  return cuda::markov_workspace(R, G, V, nullptr, nullptr, nullptr, nullptr);
}

cudaError_t launch_markov_draft(const MarkovArgs& a, cudaStream_t stream) {
  return with_element_type(a.weight_type, [&](auto w) {
    using W = decltype(w);
    if (a.logits_type == ElementType::kFloat32)
      return cuda::launch_markov_draft<float, W>(a, stream);
    return cuda::launch_markov_draft<W, W>(a, stream);
  });
}

}  // namespace dspark
