// dspark/verify_draw.cuh: the final draw of the fused verify kernel (verify_fused.cuh), done by
// one block: the chunk masses in shared memory (draw_at_row for the finishing block's own draws),
// then the inverse-CDF draw every CUDA sampling path shares (block_draw.cuh).
#pragma once
#include "dspark/block_draw.cuh"
#include "dspark/block_reduce.cuh"
#include "dspark/lane_chunk.cuh"   // kWarpChunk
#include "dspark/verify_walk.cuh"  // residual_at

namespace dspark {
namespace cuda {

constexpr int kBlockThreads = 256;  // every block of the fused kernel
constexpr int kBlockWarps = kBlockThreads / 32;
// Chunks per row at most (kMaxVocab entries): the shared array of chunk masses.
constexpr int kMaxChunks = int((kMaxVocab + kWarpChunk - 1) / kWarpChunk);
static_assert(kBlockThreads == kDrawThreads, "the fused kernel's blocks draw (block_draw)");

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
// re-summed; the others keep the statistics pass's sums). rejected: the rejected one-hot tokens
// in shared memory (walk_onehot's, read after a barrier), or nullptr (then read through the
// workspace). All threads; returns the token.
template <typename S, typename Q>
__device__ int64_t draw_at_row(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t r,
                               int64_t o, int64_t row, const RowInfo& info, int32_t nrej, double u,
                               const int32_t* rejected) {
  double* sums = shared_chunk_sums();
  const double* row_sums = ws.chunk_sum + row * p.C;  // rescaled by this block's finalize_row
  const S* w = p.logits + row * p.V;
  // The residual at v after the first `steps` rejections: residual_at's arithmetic.
  auto residual = [&](int64_t v, int32_t steps) {
    if (rejected == nullptr) return residual_at(p, ws, r, o, info, w, steps, v);
    double e = row_e(info, v, to_f(w[v]));
    for (int32_t i = 0; i < steps; ++i) e = residual_step(e, true, v, rejected[i], 1.0, 0.0);
    return e;
  };
  auto chunk_of = [&](int32_t k) {
    return (rejected ? rejected[k] : p.tokens[o + ws.rej_node[r * p.W + k]]) / kWarpChunk;
  };
  for (int64_t b = threadIdx.x; b < p.C; b += blockDim.x) sums[b] = row_sums[b];
  __syncthreads();
  for (int32_t i = 0; i < nrej; ++i) {
    const int64_t c = chunk_of(i);
    bool seen = false;
    for (int32_t k = 0; k < i; ++k) seen |= chunk_of(k) == c;
    if (seen) continue;  // uniform across the block
    double part = 0.0;
    for (int64_t v = c * kWarpChunk + threadIdx.x; v < min(p.V, (c + 1) * kWarpChunk);
         v += blockDim.x)
      part += residual(v, nrej);
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
  return block_draw<kWarpChunk>(sums, p.C, p.V, u * z,
                                [&](int64_t v) { return residual(v, steps); });
}

}  // namespace cuda
}  // namespace dspark
