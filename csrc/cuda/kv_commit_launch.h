// csrc/cuda/kv_commit_launch.h: the torch-free boundary between csrc/cuda/kv_commit_cuda.cpp
// (tensors) and csrc/cuda/kv_commit_kernels.cu (nvcc) for dspark::kv_commit. The parameter
// struct (dspark/kv_commit.h) is plain pointers and sizes.
#pragma once
#include <cuda_runtime_api.h>

#include "dspark/kv_commit.h"

namespace dspark {

// Shapes as in KvCommitParams; 1 <= p.B <= kKvMaxRequests, L * groups * row_bytes within
// kKvMaxLayerBytes. One launch for every layer, K and V; it writes lengths, freed and status.
cudaError_t launch_kv_commit(const KvCommitParams& p, cudaStream_t stream);

}  // namespace dspark
