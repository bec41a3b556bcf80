// dspark/verify_draw.cuh: the final draw of the fused verify kernel (verify_fused.cuh), done by
// one block (block_draw; draw_at_row for the finishing block's own draws): an inverse-CDF draw in
// index order over a row's chunk masses (which chunk the target falls in), then over the exact
// masses of that chunk's entries (which entry). Same rule as the CPU's draw (verify_cpu.cpp) and
// the staged DrawKernel: the first entry whose running total passes u * Z; if rounding leaves the
// target past every running total, the last entry with mass.
#pragma once
#include "dspark/block_reduce.cuh"
#include "dspark/lane_chunk.cuh"   // kWarpChunk
#include "dspark/verify_walk.cuh"  // residual_at

namespace dspark {
namespace cuda {

constexpr int kBlockThreads = 256;  // every block of the fused kernel
constexpr int kBlockWarps = kBlockThreads / 32;
constexpr int kDrawPer = kWarpChunk / kBlockThreads;  // entries per thread in the chosen chunk
// Chunks per row at most (kMaxVocab entries): the shared array of chunk masses.
constexpr int kMaxChunks = int((kMaxVocab + kWarpChunk - 1) / kWarpChunk);
static_assert(kWarpChunk % kBlockThreads == 0, "a draw thread owns whole entries");

// All threads. sums: shared, the C chunk masses (chunk b holds entries [b * kWarpChunk, ...));
// target: u * (their total); mass(v): the exact mass of entry v (v < V). Returns the token to
// every thread; -1 when no chunk holds mass (only on bad data).
template <typename MassFn>
__device__ int64_t block_draw(const double* sums, int64_t C, int64_t V, double target,
                              MassFn&& mass) {
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
    const int64_t first = chunk * kWarpChunk + threadIdx.x * kDrawPer;
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

// All threads: the sum of the shared chunk masses in a fixed order (deterministic).
__device__ inline double chunk_total(const double* sums, int64_t C) {
  double part = 0.0;
  for (int64_t b = threadIdx.x; b < C; b += blockDim.x) part += sums[b];
  return block_reduce(part, SumOp(), 0.0);
}

__device__ __forceinline__ double* shared_chunk_sums() {
  __shared__ double sums[kMaxChunks];
  return sums;
}

// The finishing block's draw at `row` when no full-q residual is needed: the target row itself,
// or with one-hot drafts rejected there, the row without them (only the chunks holding them are
// re-summed; the others keep the statistics pass's sums). All threads; returns the token.
template <typename S, typename Q>
__device__ int64_t draw_at_row(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t r,
                               int64_t o, int64_t row, const RowInfo& info, int32_t nrej,
                               double u) {
  double* sums = shared_chunk_sums();
  const double* row_sums = ws.chunk_sum + row * p.C;  // rescaled by this block's finalize_row
  const S* w = p.logits + row * p.V;
  for (int64_t b = threadIdx.x; b < p.C; b += blockDim.x) sums[b] = row_sums[b];
  __syncthreads();
  for (int32_t i = 0; i < nrej; ++i) {
    auto chunk_of = [&](int32_t k) { return p.tokens[o + ws.rej_node[r * p.W + k]] / kWarpChunk; };
    const int64_t c = chunk_of(i);
    bool seen = false;
    for (int32_t k = 0; k < i; ++k) seen |= chunk_of(k) == c;
    if (seen) continue;  // uniform across the block
    double part = 0.0;
    for (int64_t v = c * kWarpChunk + threadIdx.x; v < min(p.V, (c + 1) * kWarpChunk);
         v += blockDim.x)
      part += residual_at(p, ws, r, o, info, w, nrej, v);
    part = block_reduce(part, SumOp(), 0.0);
    if (threadIdx.x == 0) sums[c] = part;
    __syncthreads();
  }
  double z = chunk_total(sums, p.C);
  int32_t steps = nrej;
  if (nrej > 0 && z == 0.0) {  // the residual vanished: the target row itself
    for (int64_t b = threadIdx.x; b < p.C; b += blockDim.x) sums[b] = row_sums[b];
    __syncthreads();
    z = info.total;
    steps = 0;
  }
  return block_draw(sums, p.C, p.V, u * z,
                    [&](int64_t v) { return residual_at(p, ws, r, o, info, w, steps, v); });
}

}  // namespace cuda
}  // namespace dspark
