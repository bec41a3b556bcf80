// csrc/cuda/schedule_kernels.cu: compiles the header-only scheduler kernel (dspark/schedule.cuh).
#include "cuda/schedule_launch.h"
#include "dspark/schedule.cuh"

namespace dspark {

cudaError_t launch_schedule(const ScheduleParams& p, cudaStream_t stream, int threads_override,
                            ScheduleSort sort) {
  return cuda::launch_schedule(p, stream, threads_override, sort);
}

}  // namespace dspark
