// csrc/cuda/linear_kernels.cu: instantiates the header-only fused linear kernel per dtype.
#include "cuda/dispatch.cuh"
#include "cuda/launch.h"
#include "dspark/linear_kernel.cuh"

namespace dspark {

namespace {
template <typename T>
cudaError_t run(const LinearArgs& a, cudaStream_t stream) {
  const cuda::LinearParams<T> p{static_cast<const T*>(a.x),
                                static_cast<const T*>(a.weight),
                                static_cast<const T*>(a.bias),
                                static_cast<const T*>(a.residual),
                                static_cast<const T*>(a.norm_weight),
                                static_cast<T*>(a.out),
                                a.M,
                                a.N,
                                a.K,
                                a.eps,
                                a.prologue,
                                a.stage_budget};
  return cuda::launch_fused_linear(p, stream);
}
}  // namespace

cudaError_t linear_kernel_arch(int* ptx, int* binary) {
  return cuda::linear_kernel_arch(ptx, binary);
}

cudaError_t launch_linear(const LinearArgs& a, cudaStream_t stream) {
  return with_element_type(a.dtype, [&](auto t) { return run<decltype(t)>(a, stream); });
}

}  // namespace dspark
