// csrc/cuda/launch_status.h: what every CUDA entry point does after its launch. A launch error
// raises; the kernels' data checks write a status word that is read back (a host sync) and
// raised only with sync checks on and outside CUDA-graph capture (a captured step never syncs).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime.h>

#include <utility>

#include "checks.h"  // DSPARK_CHECK, cuda_sync_checks

namespace dspark {

// err: the launcher's result; status: the int32 status word on the device; raise(int32_t): the
// op's own message for the bits set (a no-op when none are).
template <typename Raise>
void check_launch(cudaError_t err, const at::Tensor& status, const char* op, Raise&& raise) {
  DSPARK_CHECK(err == cudaSuccess, "dspark::", op,
               " kernel launch failed: ", cudaGetErrorString(err));
  if (cuda_sync_checks() &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None)
    std::forward<Raise>(raise)(status.item<int32_t>());
}

}  // namespace dspark
