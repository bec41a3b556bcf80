// csrc/cuda/state_ops_kernels.cu: compiles the header-only state-op kernels (dspark/state_ops.cuh).
#include "cuda/state_ops_launch.h"
#include "dspark/state_ops.cuh"

namespace dspark {

cudaError_t launch_commit_tokens(const CommitParams& p, cudaStream_t stream) {
  return cuda::launch_commit_tokens(p, stream);
}

cudaError_t launch_ngram_propose(const NgramParams& p, cudaStream_t stream) {
  return cuda::launch_ngram_propose(p, stream);
}

}  // namespace dspark
