// dspark/block_draw.cuh: the one inverse-CDF draw of every CUDA sampling path (sample /
// verify's staged DrawKernel, the fused verify kernel, markov_draft): over a row's chunk masses in
// index order, which chunk the target u * Z falls in, then over the exact masses of that chunk's
// entries, which entry. Same rule as the CPU's draw (verify_cpu.cpp): the first entry whose
// running total passes the target; if rounding leaves the target past every running total, the
// last entry with mass.
#pragma once
#include <climits>
#include <cstdint>

#include "dspark/block_reduce.cuh"
#include "dspark/common.h"

namespace dspark {
namespace cuda {

constexpr int kDrawThreads = 256;  // the block size of every caller

// All kDrawThreads threads. sums: shared, the C chunk masses (chunk b holds entries
// [b * kLen, (b + 1) * kLen)); target: u * (their total); mass(v): the exact mass of entry v
// (v < V). Returns the token to every thread; -1 when no chunk holds mass (only on bad data).
template <int kLen, typename MassFn>
__device__ int64_t block_draw(const double* sums, int64_t C, int64_t V, double target,
                              MassFn&& mass) {
  static_assert(kLen % kDrawThreads == 0, "a draw thread owns whole entries of the chunk");
  constexpr int kDrawPer = kLen / kDrawThreads;
  __shared__ int32_t s_cand, s_last_chunk, s_hit, s_last;
  __shared__ double s_before, s_target;
  __shared__ int64_t s_chunk;
  // Each thread owns a contiguous run of chunks: running totals in index order.
  const int64_t per = ceil_div(C, blockDim.x), b0 = threadIdx.x * per, b1 = min(C, b0 + per);
  double mine = 0.0;
  for (int64_t b = b0; b < b1; ++b) mine += sums[b];
  double before = block_exclusive_scan(mine);
  if (threadIdx.x == 0) {
    s_cand = INT32_MAX;
    s_last_chunk = -1;
  }
  __syncthreads();
  int32_t cand = INT32_MAX, last = -1;
  for (int64_t b = b0; b < b1; ++b) {
    if (sums[b] > 0.0) {
      last = static_cast<int32_t>(b);
      if (cand == INT32_MAX && before + sums[b] > target) cand = static_cast<int32_t>(b);
    }
    if (cand == INT32_MAX) before += sums[b];
  }
  if (cand != INT32_MAX) atomicMin(&s_cand, cand);
  if (last >= 0) atomicMax(&s_last_chunk, last);
  __syncthreads();
  if (cand != INT32_MAX && cand == s_cand) s_before = before;  // the owner of the chosen chunk
  if (threadIdx.x == 0) {
    // No chunk reached the target (rounding): the last chunk with mass, target past its end.
    s_chunk = s_cand != INT32_MAX ? s_cand : s_last_chunk;
    if (s_cand == INT32_MAX) s_before = 0.0;
    s_target = s_cand != INT32_MAX ? target : INFINITY;
    s_hit = INT32_MAX;
    s_last = -1;
  }
  __syncthreads();
  const int64_t chunk = s_chunk;
  if (chunk >= 0) {  // uniform: the block scans the chosen chunk, kDrawPer entries per thread
    const int64_t first = chunk * kLen + threadIdx.x * kDrawPer;
    double m[kDrawPer];
    double run = 0.0;
#pragma unroll
    for (int k = 0; k < kDrawPer; ++k) {
      m[k] = first + k < V ? mass(first + k) : 0.0;
      run += m[k];
    }
    double cum = s_before + block_exclusive_scan(run);
    int32_t hit = INT32_MAX, lastv = -1;
#pragma unroll
    for (int k = 0; k < kDrawPer; ++k) {
      if (m[k] > 0.0) {
        lastv = static_cast<int32_t>(first + k);
        cum += m[k];
        if (cum > s_target && hit == INT32_MAX) hit = lastv;
      }
    }
    if (hit != INT32_MAX) atomicMin(&s_hit, hit);
    if (lastv >= 0) atomicMax(&s_last, lastv);
  }
  __syncthreads();
  const int64_t token = s_hit != INT32_MAX ? s_hit : s_last;
  __syncthreads();  // the shared words above may be rewritten by a later call
  return token;
}

}  // namespace cuda
}  // namespace dspark
