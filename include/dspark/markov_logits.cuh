// dspark/markov_logits.cuh: the bias GEMM + logits + chunk statistics kernel of
// dspark::markov_draft (the launcher and the kernel overview: dspark/markov_draft.cuh), with the
// launch parameters every markov kernel shares.
#pragma once
#include <cuda_runtime.h>

#include "dspark/markov_draft.h"
#include "dspark/row_stats.cuh"  // VerifyParams/VerifyWorkspace, warp_*, filtered_row, finalize_row

namespace dspark {
namespace cuda {

constexpr int kMarkovThreads = 128;
constexpr int kMarkovCols = kChunk / kMarkovThreads;  // columns per thread (4)
constexpr int kMarkovMaxRows = 16;
constexpr int kMarkovSmemFloats = 11264;  // staged W1 rows per block: RB * rank <= this (44 KB)
static_assert(kMarkovMaxRank <= kMarkovSmemFloats, "one row of the largest rank fits");
static_assert(kMarkovCols == 4, "a thread loads its columns as one 4-entry vector");

template <typename U, typename W>
struct MarkovParams {
  const U* base;  // [R, G, V]
  const W *w1, *w2, *hidden, *conf_w, *conf_b;
  const int64_t* anchors;
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const int64_t *seeds, *positions;
  int64_t* tokens;
  float* conf;
  double* probs;
  int32_t* status;
  float* logits;       // workspace [R, V]: z_k of the step being drafted
  VerifyWorkspace ws;  // info [R], chunk_base / chunk_wmax / chunk_sum / chunk_widx [R, C]
  int64_t R, G, V, rank, d, C;
  bool vec;  // rows of U, W2 and the workspace allow 4-entry vector accesses
};

// The previous token of row r at step k if the row can be drafted, else -1 (bad anchor or
// parameters, or an earlier step of the row failed and left -1).
template <typename U, typename W>
__device__ __forceinline__ int64_t markov_row_prev(const MarkovParams<U, W>& p, int64_t r,
                                                   int64_t k) {
  const int64_t prev = markov_prev(p.anchors, p.tokens, p.G, r, k);
  if (prev < 0 || prev >= p.V || param_status(p.temperature[r], p.top_k[r], p.top_p[r], true))
    return -1;
  return prev;
}

// Entries v0 .. v0 + 3 of a row as floats; entries at or past V read as 0.
template <typename T>
__device__ __forceinline__ void load4(const T* row, int64_t v0, int64_t V, bool vec, float* out) {
  if (vec && v0 + 4 <= V) {
    if constexpr (sizeof(T) == 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(row + v0));
      out[0] = f.x, out[1] = f.y, out[2] = f.z, out[3] = f.w;
    } else {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(row + v0));
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) out[i] = to_f(h[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = v0 + i < V ? to_f(row[v0 + i]) : 0.0f;
  }
}

__device__ __forceinline__ void store4(float* row, int64_t v0, int64_t V, bool vec,
                                       const float* x) {
  if (vec && v0 + 4 <= V) {
    *reinterpret_cast<float4*>(row + v0) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (v0 + i < V) row[v0 + i] = x[i];
  }
}

// acc[i][c] = MAC(acc[i][c], e[i], w[c]) for the RB rows (e: W1 entry j of each row) and the
// thread's 4 columns (w: W2 entries (j, v0 + c)).
template <typename W, int RB>
__device__ __forceinline__ void mac_tile(float (&acc)[RB][kMarkovCols], const float* e,
                                         const float* w) {
#pragma unroll
  for (int i = 0; i < RB; ++i) {
    const float a = e[i];
#pragma unroll
    for (int c = 0; c < kMarkovCols; ++c) acc[i][c] = markov_mac<W>(acc[i][c], a, w[c]);
  }
}

// Dynamic shared memory: RB * rank floats, W1[x_{k-1}] of the block's rows, j-major ([rank][RB]:
// one broadcast vector load gives entry j of every row).
template <typename U, typename W, int RB>
__global__ void __launch_bounds__(kMarkovThreads)
    MarkovLogitsKernel(MarkovParams<U, W> p, int64_t k) {
  extern __shared__ float s_e[];
  __shared__ int64_t s_prev[RB];
  __shared__ float s_top[RB][kMarkovThreads / 32];
  __shared__ int32_t s_idx[RB][kMarkovThreads / 32];
  __shared__ double s_sum[RB][kMarkovThreads / 32];
  const int64_t nrb = ceil_div(p.R, RB);
  const int64_t c = blockIdx.x / nrb, r0 = (blockIdx.x % nrb) * RB;
  if (threadIdx.x < RB)
    s_prev[threadIdx.x] = r0 + threadIdx.x < p.R ? markov_row_prev(p, r0 + threadIdx.x, k) : -1;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < RB * p.rank; i += kMarkovThreads) {  // coalesced along j
    const int row = static_cast<int>(i / p.rank);
    const int64_t j = i % p.rank, prev = s_prev[row];
    s_e[j * RB + row] = prev >= 0 ? to_f(p.w1[prev * p.rank + j]) : 0.0f;
  }
  __syncthreads();
  // The bias GEMM: j in order (the one summation order), loads of kUnroll rows of W2 in flight.
  constexpr int kUnroll = RB <= 8 ? 16 : 8;  // few rows: more W2 bytes in flight per thread
  const int64_t v0 = c * kChunk + threadIdx.x * kMarkovCols;
  float acc[RB][kMarkovCols];
#pragma unroll
  for (int i = 0; i < RB; ++i)
#pragma unroll
    for (int cc = 0; cc < kMarkovCols; ++cc) acc[i][cc] = 0.0f;
  int64_t j = 0;
  for (; j + kUnroll <= p.rank; j += kUnroll) {
    float w[kUnroll][kMarkovCols];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load4(p.w2 + (j + u) * p.V, v0, p.V, p.vec, w[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) mac_tile<W, RB>(acc, s_e + (j + u) * RB, w[u]);
  }
  for (; j < p.rank; ++j) {
    float w[kMarkovCols];
    load4(p.w2 + j * p.V, v0, p.V, p.vec, w);
    mac_tile<W, RB>(acc, s_e + j * RB, w);
  }
  // z = U + round_W(bias) into the workspace (entries past V: -inf, never stored).
#pragma unroll
  for (int i = 0; i < RB; ++i) {
    if (s_prev[i] < 0) continue;
    const int64_t r = r0 + i;
    float u[kMarkovCols];
    load4(p.base + (r * p.G + k) * p.V, v0, p.V, p.vec, u);
#pragma unroll
    for (int cc = 0; cc < kMarkovCols; ++cc)
      acc[i][cc] = v0 + cc < p.V ? add_rn(u[cc], round_t<W>(acc[i][cc])) : -INFINITY;
    store4(p.logits + r * p.V, v0, p.V, p.vec, acc[i]);
  }
  // The chunk's statistics, as row_stats.cuh's chunk_stats defines them: pass 1 the maximum
  // (of the logit for greedy rows, of t for sampled rows) per warp, pass 2 the chunk maximum and
  // the warps' sums of e relative to its floor. Top-k/top-p rows: MarkovDrawKernel.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t bad = 0;
#pragma unroll
  for (int i = 0; i < RB; ++i) {
    const int64_t r = r0 + i;
    if (s_prev[i] < 0 || is_filtered(p.temperature[r], p.top_k[r], p.top_p[r])) continue;
    const float temperature = p.temperature[r];
    float best = -INFINITY;
    int32_t idx = INT32_MAX;
    if (is_greedy(temperature)) {
#pragma unroll
      for (int cc = 0; cc < kMarkovCols; ++cc) {
        const float x = acc[i][cc];
        if (bad_logit(x)) bad |= kBadLogits;
        if (x > best) best = x, idx = static_cast<int32_t>(v0 + cc);
      }
      const float top = warp_max(best);
      idx = warp_min(best == top && top > -INFINITY ? idx : INT32_MAX);
      best = top;
    } else {
      const float inv_t = inverse_temperature(temperature);
#pragma unroll
      for (int cc = 0; cc < kMarkovCols; ++cc) {
        const float x = acc[i][cc], t = log2_scaled(x, inv_t);
        if (bad_logit(x) || bad_scaled_logit(x, t)) bad |= kBadLogits;
        best = fmaxf(best, t);
      }
      best = warp_max(best);
    }
    if (lane == 0) s_top[i][warp] = best, s_idx[i][warp] = idx;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < RB; ++i) {
    const int64_t r = r0 + i;
    if (s_prev[i] < 0 || is_filtered(p.temperature[r], p.top_k[r], p.top_p[r])) continue;
    const float temperature = p.temperature[r];
    float top = s_top[i][0];
    for (int w = 1; w < kMarkovThreads / 32; ++w) top = fmaxf(top, s_top[i][w]);
    if (is_greedy(temperature)) {
      if (threadIdx.x == 0) {
        int32_t idx = INT32_MAX;  // warps hold increasing columns: the first maximal entry
        for (int w = 0; w < kMarkovThreads / 32; ++w)
          if (s_top[i][w] == top && top > -INFINITY) idx = min(idx, s_idx[i][w]);
        p.ws.chunk_wmax[r * p.C + c] = top;
        p.ws.chunk_widx[r * p.C + c] = idx == INT32_MAX ? -1 : idx;
      }
      continue;
    }
    const float inv_t = inverse_temperature(temperature), base = floorf(top);
    double sum = 0.0;
    if (top > -INFINITY && isfinite(top)) {
#pragma unroll
      for (int cc = 0; cc < kMarkovCols; ++cc)
        sum += scaled_exp(log2_scaled(acc[i][cc], inv_t), base);
    }
    sum = warp_sum(sum);
    if (lane == 0) s_sum[i][warp] = sum;
    if (threadIdx.x == 0) p.ws.chunk_base[r * p.C + c] = top > -INFINITY ? base : -INFINITY;
  }
  __syncthreads();
  if (threadIdx.x < RB) {
    const int i = threadIdx.x;
    const int64_t r = r0 + i;
    if (s_prev[i] >= 0 && !is_filtered(p.temperature[r], p.top_k[r], p.top_p[r]) &&
        !is_greedy(p.temperature[r])) {
      double sum = 0.0;
      for (int w = 0; w < kMarkovThreads / 32; ++w) sum += s_sum[i][w];
      p.ws.chunk_sum[r * p.C + c] = sum;
    }
  }
  if (bad) atomicOr(p.status, bad);
}

}  // namespace cuda
}  // namespace dspark
