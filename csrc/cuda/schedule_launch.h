// csrc/cuda/schedule_launch.h: the torch-free boundary between csrc/cuda/schedule_cuda.cpp
// (tensors) and csrc/cuda/schedule_kernels.cu (nvcc) for dspark::schedule_prefix and
// dspark::schedule_budget. The parameter struct (dspark/schedule.h) is plain pointers and sizes.
#pragma once
#include <cuda_runtime_api.h>

#include "dspark/schedule.h"

namespace dspark {

// threads_override: 0 (the launcher's choice) or a power of two in [32, 1024]; sort: kAuto (the
// launcher's choice) or one sort forced. Both for A/B runs; the lengths are the same.
cudaError_t launch_schedule(const ScheduleParams& p, cudaStream_t stream, int threads_override,
                            ScheduleSort sort);

}  // namespace dspark
