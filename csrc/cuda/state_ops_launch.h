// csrc/cuda/state_ops_launch.h: the torch-free boundary between csrc/cuda/state_ops_cuda.cpp
// (tensors) and csrc/cuda/state_ops_kernels.cu (nvcc) for dspark::commit_tokens and
// dspark::ngram_propose. The parameter structs (dspark/state_ops.h) are plain pointers and sizes.
#pragma once
#include <cuda_runtime_api.h>

#include "dspark/state_ops.h"

namespace dspark {

cudaError_t launch_commit_tokens(const CommitParams& p, cudaStream_t stream);
cudaError_t launch_ngram_propose(const NgramParams& p, cudaStream_t stream);  // p.B >= 1

}  // namespace dspark
