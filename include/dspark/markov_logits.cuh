// dspark/markov_logits.cuh: the bias GEMM + logits + chunk statistics kernel of
// dspark::markov_draft (the launcher and the kernel overview: dspark/markov_draft.cuh), with the
// launch parameters every markov kernel shares.
#pragma once
#include <cuda_runtime.h>

#include "dspark/markov_draft.h"
#include "dspark/pdl.cuh"
#include "dspark/row_stats.cuh"  // VerifyParams/VerifyWorkspace, warp_*, filtered_row, finalize_row
#include "dspark/sync.cuh"       // prefetch_l2

namespace dspark {
namespace cuda {

// A logits block: kMarkovGemmThreads threads, one column of the chunk each, for the bias GEMM;
// the chunk statistics then run on its first kMarkovThreads threads, kMarkovCols columns each
// (row_stats.cuh's chunk layout, the order the CPU kernel shares).
constexpr int kMarkovThreads = 128;
constexpr int kMarkovGemmThreads = kChunk;
constexpr int kMarkovCols = kChunk / kMarkovThreads;  // columns per statistics thread (4)
constexpr int kMarkovMaxRows = 16;
constexpr int kMarkovPrefixWarps = 4;     // (request, step) pairs per confidence-prefix block
constexpr int kMarkovPrefetchRows = 64;   // W2 rows a logits block sends to L2 before its wait
constexpr int kMarkovSmemFloats = 11264;  // staged W1 rows per block: RB * rank <= this (44 KB)
static_assert(kMarkovMaxRank <= kMarkovSmemFloats, "one row of the largest rank fits");
static_assert(kMarkovMaxRows * kChunk <= kMarkovSmemFloats, "the chunk's logits fit");
static_assert(kMarkovCols == 4, "a statistics thread holds its columns as one 4-entry vector");

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
  float* conf_prefix;  // workspace [R, G, kConfLanes]: the confidence lanes after the h part
  VerifyWorkspace ws;  // info [R], chunk_base / chunk_wmax / chunk_sum / chunk_widx [R, C]
  int64_t R, G, V, rank, d, C;
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

// L2 prefetch of W2 rows [0, kMarkovPrefetchRows) over chunk c's columns: 128-byte lines, one a
// thread.
template <typename U, typename W>
__device__ __forceinline__ void markov_prefetch_w2(const MarkovParams<U, W>& p, int64_t c) {
  constexpr int kLine = 128 / sizeof(W), kLines = kChunk / kLine;  // lines of a row's chunk
  const int64_t rows = p.rank < kMarkovPrefetchRows ? p.rank : kMarkovPrefetchRows;
  for (int64_t i = threadIdx.x; i < rows * kLines; i += blockDim.x) {
    const int64_t v = c * kChunk + (i % kLines) * kLine;
    if (v < p.V) prefetch_l2(p.w2 + (i / kLines) * p.V + v);
  }
}

// Dynamic shared memory: RB * max(rank, kChunk) floats: first W1[x_{k-1}] of the block's rows,
// j-major ([rank][RB]: one broadcast vector load gives entry j of every row), then (after the
// GEMM) the chunk's logits [RB][kChunk] for the statistics.
template <typename U, typename W, int RB>
__global__ void __launch_bounds__(kMarkovGemmThreads)
    MarkovLogitsKernel(MarkovParams<U, W> p, int64_t k) {
  extern __shared__ float s_e[];
  float* s_z = s_e;  // [RB][kChunk], once the GEMM is done with s_e
  __shared__ int64_t s_prev[RB];
  __shared__ float s_top[RB][kMarkovThreads / 32];
  __shared__ int32_t s_idx[RB][kMarkovThreads / 32];
  __shared__ double s_sum[RB][kMarkovThreads / 32];
  const int64_t nrb = ceil_div(p.R, RB);
  const int64_t c = blockIdx.x / nrb, r0 = (blockIdx.x % nrb) * RB;
  // Launched early (after step 1: dspark/pdl.cuh) the block waits for the previous step's draw;
  // meanwhile the first rows of its W2 columns go to L2 (W2 is a weight: no kernel writes it).
  if (r0 == 0) markov_prefetch_w2(p, c);
  pdl_wait();
  if (threadIdx.x < RB)
    s_prev[threadIdx.x] = r0 + threadIdx.x < p.R ? markov_row_prev(p, r0 + threadIdx.x, k) : -1;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < RB * p.rank; i += kMarkovGemmThreads) {  // along j
    const int row = static_cast<int>(i / p.rank);
    const int64_t j = i % p.rank, prev = s_prev[row];
    s_e[j * RB + row] = prev >= 0 ? to_f(p.w1[prev * p.rank + j]) : 0.0f;
  }
  __syncthreads();
  // The bias GEMM: column v of the chunk per thread, j in order (the one summation order), loads
  // of kUnroll rows of W2 in flight (a warp reads 32 adjacent entries of a row).
  constexpr int kUnroll = RB <= 4 ? 32 : 16;
  const int64_t v = c * kChunk + threadIdx.x;
  const bool in = v < p.V;
  const W* w2 = p.w2 + (in ? v : 0);
  float acc[RB];
#pragma unroll
  for (int i = 0; i < RB; ++i) acc[i] = 0.0f;
  auto mac = [&](int64_t j, float w) {
#pragma unroll
    for (int i = 0; i < RB; ++i) acc[i] = markov_mac<W>(acc[i], s_e[j * RB + i], w);
  };
  int64_t j = 0;
  for (; j + kUnroll <= p.rank; j += kUnroll) {
    float w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) w[u] = in ? to_f(__ldg(w2 + (j + u) * p.V)) : 0.0f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) mac(j + u, w[u]);
  }
  for (; j < p.rank; ++j) mac(j, in ? to_f(__ldg(w2 + j * p.V)) : 0.0f);
  // The draw may launch now (it waits for this grid): its launch hides behind the statistics.
  pdl_trigger();
  __syncthreads();  // every thread is done with s_e: s_z takes its place
  // z = U + round_W(bias) into the workspace and shared memory (entries past V: -inf).
#pragma unroll
  for (int i = 0; i < RB; ++i) {
    if (s_prev[i] < 0) continue;
    const int64_t r = r0 + i;
    const float z =
        in ? add_rn(to_f(p.base[(r * p.G + k) * p.V + v]), round_t<W>(acc[i])) : -INFINITY;
    if (in) p.logits[r * p.V + v] = z;
    s_z[i * kChunk + threadIdx.x] = z;
  }
  __syncthreads();
  // The chunk's statistics, as row_stats.cuh's chunk_stats defines them: pass 1 the maximum
  // (of the logit for greedy rows, of t for sampled rows) per warp, pass 2 the chunk maximum and
  // the warps' sums of e relative to its floor. Top-k/top-p rows: MarkovDrawKernel.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool stats = threadIdx.x < kMarkovThreads;  // whole warps: the shuffles below are safe
  const int64_t v0 = c * kChunk + threadIdx.x * kMarkovCols;
  int32_t bad = 0;
#pragma unroll
  for (int i = 0; i < RB; ++i) {
    const int64_t r = r0 + i;
    if (!stats || s_prev[i] < 0 || is_filtered(p.temperature[r], p.top_k[r], p.top_p[r])) continue;
    float z[kMarkovCols];
#pragma unroll
    for (int cc = 0; cc < kMarkovCols; ++cc)
      z[cc] = s_z[i * kChunk + threadIdx.x * kMarkovCols + cc];
    const float temperature = p.temperature[r];
    float best = -INFINITY;
    int32_t idx = INT32_MAX;
    if (is_greedy(temperature)) {
#pragma unroll
      for (int cc = 0; cc < kMarkovCols; ++cc) {
        const float x = z[cc];
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
        const float x = z[cc], t = log2_scaled(x, inv_t);
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
    if (!stats || s_prev[i] < 0 || is_filtered(p.temperature[r], p.top_k[r], p.top_p[r])) continue;
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
        sum +=
            scaled_exp(log2_scaled(s_z[i * kChunk + threadIdx.x * kMarkovCols + cc], inv_t), base);
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
