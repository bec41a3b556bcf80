// dspark/row_stats.cuh: CUDA kernels that validate the packed batch and compute, for every
// logits row, the statistics verify/sample need (include/dspark/row.h: RowInfo).
//   RowOwnerKernel  grid N/256          row -> owning request (binary search over offsets)
//   RowStatsKernel  grid (N, 1 + C/16)  block y >= 1: one warp per 512-entry chunk (two chunks
//                                       per warp), local base + sum, or argmax for greedy rows;
//                                       block y == 0: top-k/top-p rows (radix selection)
//   finalize_row    (called by WalkKernel, one warp per row) chunk partials -> RowInfo
// No block-wide synchronisation in the hot path: chunk partials are warp reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dspark/block_reduce.cuh"
#include "dspark/numeric.h"  // to_f
#include "dspark/row.h"

namespace dspark {
namespace cuda {

// Arguments of one verify launch (sample launches it too: root-only requests, W = 1).
template <typename scalar_t, typename q_t>
struct VerifyParams {
  const scalar_t* logits;  // [N, V]
  const q_t* q;            // [N, V] draft probabilities, or nullptr (one-hot drafts)
  int64_t N, V, R, W, C;   // rows, vocab, requests, output width, chunks per row
  const int64_t *offsets, *tokens, *parents;    // [R+1], [N], [N]; fused sample: nullptr
  const float* temperature;                     // [R]
  const int64_t* top_k;                         // [R]
  const float* top_p;                           // [R]
  const int64_t *seeds, *positions;             // [R] or nullptr
  const double* uniforms;                       // [N, 2] (fused sample: [R]) or nullptr
  int64_t *out_tokens, *out_count, *out_nodes;  // [R, W], [R], [R, W]
  double* probs;                                // [R, V] (sample only) or nullptr
  int32_t* status;                              // [1] StatusBit flags
  bool vec_loads;                               // rows 16-byte aligned: vector loads
  bool q_vec_loads;                             // q 16-byte aligned (fused kernel)
};

// Scratch of one verify launch, carved from one device buffer by launch_verify (verify.cuh).
struct VerifyWorkspace {
  RowInfo* info;        // [N]
  float* chunk_base;    // [N, C] local base, later the row base
  double* chunk_sum;    // [N, C] mass per chunk (relative to the row base after finalize)
  float* chunk_wmax;    // [N, C] greedy rows: max logit per chunk
  int32_t* chunk_widx;  // [N, C] greedy rows: its (first) index, -1 if none
  int64_t* final_row;   // [R] flat row the last token is drawn from, -1 if none
  int32_t* n_rej;       // [R] rejected siblings at that row
  int32_t* accepted;    // [R]
  double* job_u;        // [R] the sampling coin
  int32_t* rej_node;    // [R, W] local node ids of the rejected siblings, in order
  double* rej_z;        // [R, W] residual total before each rejection
  double* resid_chunk;  // [R, C] residual mass per chunk
  int32_t* row_owner;   // [N] request whose parameters apply, -1 if malformed/invalid
  // Per-node facts for requests too wide for the walk's shared memory: [N] each.
  int32_t *f_parent, *f_token;
  double *f_e, *f_q, *f_u;
};

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return __shfl_sync(0xffffffffu, v, 0);
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ int32_t warp_min(int32_t v) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ bool is_filtered(float temperature, int64_t top_k, float top_p) {
  return !is_greedy(temperature) && (top_k > 0 || top_p < 1.0f);
}

// Request owning a packed row (binary search over node_offsets; always in [0, R)).
template <typename S, typename Q>
__device__ __forceinline__ int32_t find_request(const VerifyParams<S, Q>& p, int64_t row) {
  int64_t lo = 0, hi = p.R;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (p.offsets[mid] <= row) lo = mid;
    else hi = mid;
  }
  return static_cast<int32_t>(lo);
}

// One thread per row: which request's parameters apply to it, or -1 when the batch is malformed
// there (the walk reports it) or the request's parameters are invalid. A table, so that the
// statistics blocks do one load instead of a dependent binary search before their math.
template <typename S, typename Q>
__global__ void RowOwnerKernel(VerifyParams<S, Q> p, VerifyWorkspace ws) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (row >= p.N) return;
  int32_t r = find_request(p, row);
  if (!(p.offsets[r] <= row && row < p.offsets[r + 1])) r = -1;
  else if (param_status(p.temperature[r], p.top_k[r], p.top_p[r], p.seeds || p.uniforms)) r = -1;
  ws.row_owner[row] = r;
}

constexpr int kLanePer = kChunk / 32;  // entries per lane in a warp chunk
constexpr int kChunksPerWarp = 2;

// Loads one warp chunk: lane entry k is vocabulary index chunk_entry(k) (k ascending = index
// ascending). 16-byte vector loads when rows are aligned, else coalesced scalars.
template <typename S>
__device__ __forceinline__ int64_t chunk_entry(bool vec, int64_t start, int k) {
  constexpr int kVec = 16 / sizeof(S);
  const int lane = threadIdx.x & 31;
  return vec ? start + int64_t((k / kVec) * 32 + lane) * kVec + k % kVec
             : start + int64_t(k) * 32 + lane;
}
template <typename S>
__device__ __forceinline__ void load_chunk(const S* w, int64_t V, bool vec, int64_t start,
                                           float* x) {
  constexpr int kVec = 16 / sizeof(S);
  if (vec) {
#pragma unroll
    for (int l = 0; l < kLanePer / kVec; ++l) {
      const int64_t v0 = chunk_entry<S>(true, start, l * kVec);
      if (v0 + kVec <= V) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(w + v0));
        const S* lanes = reinterpret_cast<const S*>(&raw);
#pragma unroll
        for (int i = 0; i < kVec; ++i) x[l * kVec + i] = to_f(lanes[i]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) x[l * kVec + i] = v0 + i < V ? to_f(w[v0 + i]) : -INFINITY;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kLanePer; ++k) {
      const int64_t v = chunk_entry<S>(false, start, k);
      x[k] = v < V ? to_f(w[v]) : -INFINITY;
    }
  }
}

// One warp chunk of an unfiltered row: argmax (greedy) or local base + sum of e (sampled).
template <typename S, typename Q>
__device__ void chunk_stats(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t row,
                            int64_t c, float temperature, float* x, int32_t& bad) {
  const int lane = threadIdx.x & 31;
  const int64_t start = c * kChunk, slot = row * p.C + c;
  if (is_greedy(temperature)) {
    float best = -INFINITY;
    int32_t idx = INT32_MAX;
#pragma unroll
    for (int k = 0; k < kLanePer; ++k) {
      if (bad_logit(x[k])) bad |= kBadLogits;
      if (x[k] > best) {
        best = x[k];
        idx = static_cast<int32_t>(chunk_entry<S>(p.vec_loads, start, k));
      }
    }
    const float top = warp_max(best);
    idx = warp_min(best == top && top > -INFINITY ? idx : INT32_MAX);
    if (lane == 0) {
      ws.chunk_wmax[slot] = top;
      ws.chunk_widx[slot] = idx == INT32_MAX ? -1 : idx;
    }
    return;
  }
  const float inv_t = inverse_temperature(temperature);
  float tmax = -INFINITY;
#pragma unroll
  for (int k = 0; k < kLanePer; ++k) {
    if (bad_logit(x[k])) bad |= kBadLogits;
    const float t = log2_scaled(x[k], inv_t);
    if (bad_scaled_logit(x[k], t)) bad |= kBadLogits;
    x[k] = t;
    tmax = fmaxf(tmax, t);
  }
  tmax = warp_max(tmax);
  const float base = floorf(tmax);
  double sum = 0.0;
  if (tmax > -INFINITY && isfinite(tmax)) {
#pragma unroll
    for (int k = 0; k < kLanePer; ++k) sum += scaled_exp(x[k], base);
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    ws.chunk_base[slot] = tmax > -INFINITY ? base : -INFINITY;
    ws.chunk_sum[slot] = sum;
  }
}

template <typename S, typename Q>
__device__ void filtered_row(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t row,
                             int32_t r, int64_t chunk);

// blockDim.x == 256 (8 warps). Block y == 0 handles the row if it is top-k/top-p filtered;
// blocks y >= 1 give each warp kChunksPerWarp consecutive chunks of an unfiltered row. The
// logits are loaded before the owner lookup so the two latencies overlap.
template <typename S, typename Q>
__global__ void RowStatsKernel(VerifyParams<S, Q> p, VerifyWorkspace ws) {
  const int64_t row = blockIdx.x;  // rows in x: gridDim.y is limited to 65535
  const S* w = p.logits + row * p.V;
  if (blockIdx.y == 0) {
    const int32_t r = ws.row_owner[row];
    if (r >= 0 && is_filtered(p.temperature[r], p.top_k[r], p.top_p[r]))
      filtered_row(p, ws, row, r, kChunk);
    return;
  }
  const int64_t c0 = ((blockIdx.y - 1) * (blockDim.x / 32) + threadIdx.x / 32) * kChunksPerWarp;
  if (c0 >= p.C) return;
  float x[kChunksPerWarp][kLanePer];
#pragma unroll
  for (int i = 0; i < kChunksPerWarp; ++i)
    if (c0 + i < p.C) load_chunk(w, p.V, p.vec_loads, (c0 + i) * kChunk, x[i]);
  const int32_t r = ws.row_owner[row];
  if (r < 0) return;
  const float temperature = p.temperature[r];
  if (is_filtered(temperature, p.top_k[r], p.top_p[r])) return;
  int32_t bad = 0;
#pragma unroll
  for (int i = 0; i < kChunksPerWarp; ++i)
    if (c0 + i < p.C) chunk_stats(p, ws, row, c0 + i, temperature, x[i], bad);
  if (bad) atomicOr(p.status, bad);
}

// One block per top-k/top-p row: max pass, radix select on ordered keys of t for the k-th
// largest (counts) and the top-p cut (exact int64 fixed-point masses), then the sums of the
// row's p.C chunks of `chunk` entries (kChunk here; the fused kernel's are longer).
template <typename S, typename Q>
__device__ void filtered_row(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t row,
                             int32_t r, int64_t chunk) {
  const S* w = p.logits + row * p.V;
  const float inv_t = inverse_temperature(p.temperature[r]);
  auto t_at = [&](int64_t v) { return log2_scaled(to_f(w[v]), inv_t); };
  int32_t bad = 0;
  float tmax = -INFINITY;
  long long finite = 0;
  for (int64_t v = threadIdx.x; v < p.V; v += blockDim.x) {
    const float x = to_f(w[v]);
    if (bad_logit(x)) bad |= kBadLogits;
    const float t = log2_scaled(x, inv_t);
    if (bad_scaled_logit(x, t)) bad |= kBadLogits;
    finite += x > -INFINITY;
    tmax = fmaxf(tmax, t);
  }
  if (bad) atomicOr(p.status, bad);
  tmax = block_reduce(tmax, MaxOp(), -INFINITY);
  finite = block_reduce(finite, SumOp(), 0ll);
  if (finite == 0 || !isfinite(tmax)) {  // empty row: finalize_row flags it
    for (int64_t b = threadIdx.x; b < p.C; b += blockDim.x) {
      ws.chunk_base[row * p.C + b] = -INFINITY;
      ws.chunk_sum[row * p.C + b] = 0.0;
    }
    if (threadIdx.x == 0) ws.info[row].t_keep = -INFINITY;
    return;
  }
  const float base = floorf(tmax);
  float keep = -INFINITY;
  __shared__ unsigned long long hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ unsigned long long s_carry;
  // Radix descent over 4 digits of the ordered key. weight(v) = 1 (top-k) or the fixed mass
  // (top-p); finds the largest key K with sum of weights over keys >= K reaching `need`.
  auto descend = [&](bool by_mass, unsigned long long need) {
    if (threadIdx.x == 0) {
      s_prefix = 0;
      s_carry = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      const uint32_t prefix = s_prefix;
      const uint32_t high_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
      for (int64_t v = threadIdx.x; v < p.V; v += blockDim.x) {
        const float t = t_at(v);
        const uint32_t key = ordered_key(t);
        if (!(t >= keep) || ((key ^ prefix) & high_mask)) continue;
        const unsigned long long wt =
            by_mass ? static_cast<unsigned long long>(fixed_mass(t, base)) : 1ull;
        if (wt) atomicAdd(&hist[(key >> shift) & 255u], wt);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        unsigned long long cum = s_carry;
        for (int d = 255; d >= 0; --d) {
          if (cum + hist[d] >= need || d == 0) {
            s_prefix = prefix | (uint32_t(d) << shift);
            s_carry = cum;
            break;
          }
          cum += hist[d];
        }
      }
      __syncthreads();
    }
    return key_to_float(s_prefix);
  };
  const int64_t top_k = p.top_k[r];
  if (top_k > 0 && top_k < finite) keep = descend(false, static_cast<unsigned long long>(top_k));
  const float top_p = p.top_p[r];
  if (top_p < 1.0f) {
    long long total = 0;
    for (int64_t v = threadIdx.x; v < p.V; v += blockDim.x) {
      const float t = t_at(v);
      if (t >= keep) total += fixed_mass(t, base);
    }
    total = block_reduce(total, SumOp(), 0ll);
    const int64_t need = top_p_need(top_p, total);
    keep = fmaxf(keep, descend(true, static_cast<unsigned long long>(need)));
  }
  for (int64_t b = threadIdx.x / 32; b < p.C; b += blockDim.x / 32) {
    double sum = 0.0;
    for (int64_t v = b * chunk + (threadIdx.x & 31); v < min(p.V, (b + 1) * chunk); v += 32) {
      const float t = t_at(v);
      if (t >= keep) sum += scaled_exp(t, base);
    }
    sum = warp_sum(sum);
    if ((threadIdx.x & 31) == 0) {
      ws.chunk_sum[row * p.C + b] = sum;
      ws.chunk_base[row * p.C + b] = base;
    }
  }
  if (threadIdx.x == 0) ws.info[row].t_keep = keep;
}

// The arithmetic of finalize_row for one warp, over a row's C chunk partials read through
// `in` (widx(b), wmax(b), base(b), sum(b)) with the rescaled sums written through
// `in.set_sum(b, s)`: finalize_row reads and writes the workspace, markov_draft's draw a copy in
// shared memory; the same operations in the same order either way. Lanes own chunks lane,
// lane+32, ... The returned RowInfo (every lane) has t_keep -inf.
constexpr int kHeldPartials = 5;  // finalize_partials: rows of up to 160 partials in registers

template <typename Partials>
__device__ RowInfo finalize_partials(const Partials& in, int64_t C, float temperature,
                                     int64_t chunk, int32_t* status) {
  const int lane = threadIdx.x & 31;
  RowInfo info{-1, 0.0, 0.0f, 0.0f, -INFINITY, 0};
  if (is_greedy(temperature)) {
    float best = -INFINITY;
    int32_t idx = -1;
    for (int64_t b = lane; b < C; b += 32) {
      const int32_t i = in.widx(b);
      const float m = in.wmax(b);
      if (i >= 0 && m > best) {
        best = m;
        idx = i;
      }
    }
    const float top = warp_max(best);
    const int32_t pick = warp_min(idx >= 0 && best == top ? idx : INT32_MAX);
    info.argmax = pick == INT32_MAX ? -1 : pick;
    info.greedy = 1;
    info.total = 1.0;
    for (int64_t b = lane; b < C; b += 32)
      in.set_sum(b, (info.argmax >= 0 && b == info.argmax / chunk) ? 1.0 : 0.0);
    if (lane == 0 && info.argmax < 0) atomicOr(status, kEmptyRow);
  } else {
    info.inv_t = inverse_temperature(temperature);
    auto rescaled = [](float bb, float top, double sum) {  // the chunk's sum at the row base
      const float drop = top - bb;
      return (bb > -INFINITY && drop <= 1000.0f) ? sum * pow2_neg(static_cast<int>(drop)) : 0.0;
    };
    float top = -INFINITY;
    double part = 0.0;
    if (C <= 32 * kHeldPartials) {
      // Up to kHeldPartials partials a lane: bases and sums loaded together and kept in registers
      // (one round trip to L2 where the loop below makes two); same operations, same order.
      float bb[kHeldPartials];
      double ss[kHeldPartials];
#pragma unroll
      for (int i = 0; i < kHeldPartials; ++i) {
        const int64_t b = lane + 32 * i;
        bb[i] = b < C ? in.base(b) : -INFINITY;
        ss[i] = b < C ? in.sum(b) : 0.0;
        top = fmaxf(top, bb[i]);
      }
      top = warp_max(top);
#pragma unroll
      for (int i = 0; i < kHeldPartials; ++i) {
        const int64_t b = lane + 32 * i;
        if (b >= C) break;
        const double s = rescaled(bb[i], top, ss[i]);
        in.set_sum(b, s);
        part += s;
      }
    } else {
      for (int64_t b = lane; b < C; b += 32) top = fmaxf(top, in.base(b));
      top = warp_max(top);
      for (int64_t b = lane; b < C; b += 32) {
        const double s = rescaled(in.base(b), top, in.sum(b));
        in.set_sum(b, s);
        part += s;
      }
    }
    info.nbase = top;
    info.total = warp_sum(part);
    if (lane == 0 && !(top > -INFINITY)) atomicOr(status, kEmptyRow);
  }
  return info;
}

// A row's chunk partials in the workspace, read through L2 (ld.cg): in the fused kernel other
// blocks wrote them during the same launch.
struct WorkspacePartials {
  const VerifyWorkspace& ws;
  int64_t at;  // row * C: the row's first partial
  __device__ int32_t widx(int64_t b) const { return __ldcg(ws.chunk_widx + at + b); }
  __device__ float wmax(int64_t b) const { return __ldcg(ws.chunk_wmax + at + b); }
  __device__ float base(int64_t b) const { return __ldcg(ws.chunk_base + at + b); }
  __device__ double sum(int64_t b) const { return __ldcg(ws.chunk_sum + at + b); }
  __device__ void set_sum(int64_t b, double s) const { ws.chunk_sum[at + b] = s; }
};

// One warp per row (called by WalkKernel, and by the fused kernel's finishing block): RowInfo
// from the partials of the row's p.C chunks of `chunk` entries, chunk sums rescaled to the row
// base in place (exact: powers of two), written to ws.info[row] and returned (total and argmax in
// every lane).
template <typename S, typename Q>
__device__ RowInfo finalize_row(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t row,
                                int32_t r, int64_t chunk = kChunk) {
  const float temperature = p.temperature[r];
  RowInfo info =
      finalize_partials(WorkspacePartials{ws, row * p.C}, p.C, temperature, chunk, p.status);
  if ((threadIdx.x & 31) == 0 && !info.greedy && is_filtered(temperature, p.top_k[r], p.top_p[r]))
    info.t_keep = __ldcg(&ws.info[row].t_keep);
  if ((threadIdx.x & 31) == 0) ws.info[row] = info;
  return info;
}

}  // namespace cuda
}  // namespace dspark
