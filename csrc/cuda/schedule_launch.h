// csrc/cuda/schedule_launch.h: the torch-free boundary between csrc/cuda/schedule_cuda.cpp
// (tensors) and csrc/cuda/schedule_kernels.cu (nvcc) for dspark::schedule_prefix and
// dspark::schedule_budget. The parameter struct (dspark/schedule.h) is plain pointers and sizes.
#pragma once
#include <cuda_runtime_api.h>

#include "dspark/schedule.h"

namespace dspark {

cudaError_t launch_schedule(const ScheduleParams& p, cudaStream_t stream);

}  // namespace dspark
