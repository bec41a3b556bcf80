// csrc/cuda/kv_commit_kernels.cu: compiles the header-only kv_commit kernel (dspark/kv_commit.cuh).
#include "cuda/kv_commit_launch.h"
#include "dspark/kv_commit.cuh"

namespace dspark {

cudaError_t launch_kv_commit(const KvCommitParams& p, cudaStream_t stream) {
  return cuda::launch_kv_commit(p, stream);
}

}  // namespace dspark
