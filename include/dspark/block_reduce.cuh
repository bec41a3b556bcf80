// dspark/block_reduce.cuh: deterministic block-wide reductions and scans (fixed shuffle order,
// so the same inputs always give bit-identical doubles). blockDim.x must be a multiple of 32.
#pragma once
#include <cuda_runtime.h>

namespace dspark {
namespace cuda {

struct MaxOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct SumOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Result is returned to every thread. `identity` must be neutral for `op`.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T partial[32];
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // earlier readers of `partial` are done
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? partial[lane] : identity;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

// Exclusive prefix sum of one double per thread, in thread order (deterministic).
__device__ inline double block_exclusive_scan(double v) {
  __shared__ double warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  double incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const double up = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += up;
  }
  double excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = 0.0;
  __syncthreads();
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (threadIdx.x == 0) {
    double run = 0.0;
    for (int w = 0; w < nwarps; ++w) {
      const double s = warp_sums[w];
      warp_sums[w] = run;
      run += s;
    }
  }
  __syncthreads();
  return warp_sums[warp] + excl;
}

}  // namespace cuda
}  // namespace dspark
