// csrc/cuda/markov_draft_launch.h: the torch-free boundary between csrc/cuda/markov_draft_cuda.cpp
// (tensors) and csrc/cuda/markov_draft_kernels.cu (nvcc) for dspark::markov_draft. The launch
// arguments (dspark/markov_draft.h: MarkovArgs) are plain pointers and sizes.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dspark/markov_draft.h"

namespace dspark {

size_t markov_workspace_bytes(int64_t R, int64_t G, int64_t V);  // MarkovArgs::workspace
cudaError_t launch_markov_draft(const MarkovArgs& args, cudaStream_t stream);  // R >= 1

}  // namespace dspark
