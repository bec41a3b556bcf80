// dspark/markov_draw.cuh: the per-request kernels of dspark::markov_draft (overview:
// dspark/markov_draft.cuh): finalize the step's row statistics, draw x_k as sample does, the
// confidence logit, and the optional q rows.
#pragma once

#include "dspark/block_draw.cuh"
#include "dspark/block_reduce.cuh"
#include "dspark/markov_logits.cuh"

namespace dspark {
namespace cuda {

// The row helpers of verify/sample (filtered_row, finalize_row) read their parameters from a
// VerifyParams: a view of the step's logits workspace as R root-only requests.
template <typename U, typename W>
__device__ __forceinline__ VerifyParams<float, float> row_view(const MarkovParams<U, W>& p) {
  VerifyParams<float, float> v{};
  v.logits = p.logits;
  v.N = p.R, v.V = p.V, v.R = p.R, v.W = 1, v.C = p.C;
  v.temperature = p.temperature, v.top_k = p.top_k, v.top_p = p.top_p;
  v.status = p.status;
  return v;
}

// The confidence lanes' h part (markov_draft.h: entry i < d of [h; e] in lane i % 32, in
// increasing i) for every (request, step): it does not depend on the drafted tokens, so it runs
// once before step 1, all rows in parallel, and a step's draw adds only the rank entries of e
// (rank / 32 dependent MACs a lane instead of (d + rank) / 32: 8 instead of 136 at the 8B shape).
// One warp per (r, k); the same MACs in the same order as one pass over [h; e], so the same bits.
template <typename U, typename W>
__global__ void __launch_bounds__(kMarkovPrefixWarps * 32)
    MarkovConfPrefixKernel(MarkovParams<U, W> p) {
  const int64_t rk = static_cast<int64_t>(blockIdx.x) * kMarkovPrefixWarps + (threadIdx.x >> 5);
  if (rk >= p.R * p.G) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const W* h = p.hidden + rk * p.d;
  float part = 0.0f;
#pragma unroll 16
  for (int64_t i = lane; i < p.d; i += kConfLanes)
    part = markov_mac<W>(part, to_f(__ldg(p.conf_w + i)), to_f(__ldg(h + i)));
  p.conf_prefix[rk * kConfLanes + lane] = part;
}

// One warp: the confidence logit of row r at step k from the lanes' h part (the kernel above):
// the e part from each lane's first entry past d, then the lanes' tree, then the bias.
template <typename U, typename W>
__device__ void markov_confidence(const MarkovParams<U, W>& p, int64_t r, int64_t k, int64_t prev) {
  const int lane = threadIdx.x & 31;
  const W* e = p.w1 + prev * p.rank;
  float part = p.conf_prefix[(r * p.G + k) * kConfLanes + lane];
  const int64_t first = p.d > lane ? lane + ceil_div(p.d - lane, kConfLanes) * kConfLanes : lane;
#pragma unroll 8
  for (int64_t i = first; i < p.d + p.rank; i += kConfLanes)
    part = markov_mac<W>(part, to_f(p.conf_w[i]), to_f(e[i - p.d]));
  for (int s = kConfLanes / 2; s > 0; s >>= 1)
    part = add_rn(part, __shfl_down_sync(0xffffffffu, part, s));
  if (lane == 0) p.conf[r * p.G + k] = round_t<W>(add_rn(part, to_f(p.conf_b[0])));
}

// A row's chunk partials staged in shared memory by the whole draw block (one round trip to L2
// for all C chunks instead of one a lane per 32 chunks in finalize_row's loops): wmax / widx of
// a greedy row, base / sum of a sampled row; set_sum rescales the shared copy, which the draw
// then reads.
struct SharedPartials {
  const float* f;    // wmax (greedy) or base (sampled)
  const int32_t* i;  // widx (greedy)
  double* s;         // sum (sampled), then the rescaled masses
  __device__ int32_t widx(int64_t b) const { return i[b]; }
  __device__ float wmax(int64_t b) const { return f[b]; }
  __device__ float base(int64_t b) const { return f[b]; }
  __device__ double sum(int64_t b) const { return s[b]; }
  __device__ void set_sum(int64_t b, double v) const { s[b] = v; }
};

// Inverse-CDF draw of a sampled row from its finalized chunk masses `sums` (shared), as
// sample's DrawKernel draws for a request with no drafts (block_draw.cuh): target = u * (block
// sum of the chunk masses). -1 if the row has no mass (finalize flagged it). Whole block.
template <typename U, typename W>
__device__ int64_t markov_draw(const MarkovParams<U, W>& p, int64_t r, int64_t k,
                               const RowInfo& info, const double* sums) {
  const int64_t per = ceil_div(p.C, blockDim.x), b0 = threadIdx.x * per, b1 = min(p.C, b0 + per);
  double mine = 0.0;
  for (int64_t b = b0; b < b1; ++b) mine += sums[b];
  const double z = block_reduce(mine, SumOp(), 0.0);
  if (!(z > 0.0)) return -1;  // z is the same in every thread: the block leaves together
  const double u = keyed_uniform(p.seeds[r], p.positions[r] + k, 0, kSampleCoin);
  const float* w = p.logits + r * p.V;
  return block_draw<kChunk>(sums, p.C, p.V, u * z, [&](int64_t v) { return row_e(info, v, w[v]); });
}

template <typename U, typename W>
__global__ void __launch_bounds__(kDrawThreads) MarkovDrawKernel(MarkovParams<U, W> p, int64_t k) {
  constexpr int kMaxChunks = kMaxVocab / kChunk + 1;
  __shared__ double s_sum[kMaxChunks];
  __shared__ float s_f[kMaxChunks];
  __shared__ int32_t s_i[kMaxChunks];
  __shared__ RowInfo s_info;
  pdl_trigger();  // launched early after step 1's kernels (dspark/pdl.cuh): every input but
  pdl_wait();     // the weights comes from the kernels before
  const int64_t r = blockIdx.x;
  const int64_t prev = markov_row_prev(p, r, k);
  if (prev < 0) {  // block-uniform
    if (threadIdx.x == 0) {
      p.tokens[r * p.G + k] = -1;
      if (p.conf) p.conf[r * p.G + k] = 0.0f;
      int32_t bad = param_status(p.temperature[r], p.top_k[r], p.top_p[r], true);
      if (k == 0 && !(p.anchors[r] >= 0 && p.anchors[r] < p.V)) bad |= kBadToken;
      if (bad) atomicOr(p.status, bad);  // a row that failed at an earlier step was flagged then
    }
    return;
  }
  const VerifyParams<float, float> view = row_view(p);
  const int32_t owner = static_cast<int32_t>(r);
  const float temperature = p.temperature[r];
  const bool greedy = is_greedy(temperature);
  if (is_filtered(temperature, p.top_k[r], p.top_p[r])) {
    filtered_row(view, p.ws, r, owner, kChunk);
    __syncthreads();
  }
  // The row's partials into shared memory (the filtered path wrote its sums and bases above).
  for (int64_t b = threadIdx.x; b < p.C; b += blockDim.x) {
    if (greedy) {
      s_f[b] = __ldcg(p.ws.chunk_wmax + r * p.C + b);
      s_i[b] = __ldcg(p.ws.chunk_widx + r * p.C + b);
    } else {
      s_f[b] = __ldcg(p.ws.chunk_base + r * p.C + b);
      s_sum[b] = __ldcg(p.ws.chunk_sum + r * p.C + b);
    }
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  if (warp == 0) {
    RowInfo info =
        finalize_partials(SharedPartials{s_f, s_i, s_sum}, p.C, temperature, kChunk, p.status);
    if (threadIdx.x == 0) {
      if (is_filtered(temperature, p.top_k[r], p.top_p[r]))
        info.t_keep = __ldcg(&p.ws.info[r].t_keep);
      s_info = info;
      p.ws.info[r] = info;  // MarkovProbsKernel's
    }
  } else if (warp == 1 && p.conf) {
    markov_confidence(p, r, k, prev);
  }
  __syncthreads();
  const RowInfo info = s_info;
  const int64_t x = info.greedy ? info.argmax : markov_draw(p, r, k, info, s_sum);
  if (threadIdx.x == 0) p.tokens[r * p.G + k] = x;
}

// return_probs: q_k(v) = e(v) / S, the distribution x_k was drawn from (0 for failed rows).
template <typename U, typename W>
__global__ void MarkovProbsKernel(MarkovParams<U, W> p, int64_t k) {
  pdl_trigger();
  pdl_wait();
  const int64_t r = blockIdx.x, b = blockIdx.y;
  double* out = p.probs + (r * p.G + k) * p.V;
  const bool ok = p.tokens[r * p.G + k] >= 0;
  const RowInfo info = p.ws.info[r];
  const float* w = p.logits + r * p.V;
  for (int64_t v = b * kChunk + threadIdx.x; v < min(p.V, (b + 1) * kChunk); v += blockDim.x)
    out[v] = ok ? row_e(info, v, w[v]) / info.total : 0.0;
}

}  // namespace cuda
}  // namespace dspark
