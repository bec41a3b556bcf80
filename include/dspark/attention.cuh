// dspark/attention.cuh: attention for one new token per request (decode), with the QK-norm,
// rotary embedding and KV-cache write of that token folded in.
//
//   qkv [B, (H + 2 Hkv) D]: the token's q | k | v projections (fused_linear's output)
//   k_cache, v_cache [L, B, Hkv, S, D]: layer `layer` is read and written
//   positions [B] i64: the token's position, which is also its cache slot
//   inv_freq [D/2] f32 (rotary), q_norm / k_norm [D] or null (Qwen3's per-head RMSNorm)
//   -> cache[layer, b, :, pos] = (rope(k_norm(k)), v);  out [B, H D] =
//      softmax(q_h . K^T * scale) V over slots max(0, pos - window + 1) .. pos (window 0: all)
//
// Roundings follow the unfused modules (dspark/reference.py: decode_attention): normed and
// rotated q/k, and cos/sin, are rounded to T as stored tensors would be; scores, softmax and the
// weighted sum of V are fp32; the output is rounded once.
//
// Kernel 1, grid (Hkv, B, S / kAttnChunk): a block owns one KV head (its G = H / Hkv query heads)
// and one chunk of kAttnChunk slots: thread t scores slot chunk + t for the G heads (one row of K
// per thread, 16-byte loads), the block takes chunk-local softmax statistics, and each warp sums
// its slots' V rows; the chunk's unnormalised output and (max, sum) go to a workspace (or, with a
// single chunk, the normalised output straight to `out`). Kernel 2, grid (H, B), merges chunks.
// The grid is static (chunks past pos exit at once), so CUDA graphs capture it; the new token's
// K/V are used from shared memory, so no block reads the slot that the owning block writes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dspark/block_reduce.cuh"
#include "dspark/common.h"
#include "dspark/linear.cuh"  // Vec
#include "dspark/numeric.h"  // to_f / from_f / round_t
#include "dspark/pdl.cuh"

namespace dspark {
namespace cuda {

constexpr int kAttnThreads = 128;
constexpr int kAttnChunk = kAttnThreads;  // slots per block: one per thread when scoring
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnMaxHeadDim = 256;
constexpr int kAttnMaxGroup = 16;  // query heads per KV head

template <typename T>
struct AttnParams {
  const T* qkv;
  T* k_cache;
  T* v_cache;
  const int64_t* positions;
  const float* inv_freq;
  const T* q_norm;  // [D] or nullptr
  const T* k_norm;  // [D] or nullptr
  T* out;           // [B, H * D]
  float* part_o;    // [B, H, splits, D] (splits > 1)
  float* part_ml;   // [B, H, splits, 2]: chunk max and sum of exp (splits > 1)
  int32_t* status;
  int64_t B, H, Hkv, S, D, layer, window;
  float eps, scale;
  int splits;
};

inline int attn_splits(int64_t S) { return int((S + kAttnChunk - 1) / kAttnChunk); }

// Shared floats of kernel 1: q [G][D], k/v of the new token [2][D], scores [G][chunk], per-warp
// partial outputs [warps][G][D], softmax statistics (per-warp maxima [warps][16], then [G][2]
// and per-warp sums [warps][G][2]).
inline size_t attn_smem_bytes(int64_t G, int64_t D) {
  return sizeof(float) * size_t(G * D + 2 * D + G * kAttnChunk + kAttnWarps * G * D +
                                kAttnWarps * kAttnMaxGroup + 2 * G * (kAttnWarps + 1));
}

// Heads [0, nheads) of `heads` ([nheads][D] fp32 values of T, in shared memory) in place:
// per-head RMSNorm (weights norm_w for heads < nq, else k_norm; null = none) then rotary at pos.
// One warp per head for the norms (no block barriers), then one block pass for the rotation.
template <typename T>
__device__ void norm_rope_heads(float* heads, float* tmp, int64_t nheads, int64_t nq, const T* q_norm,
                                const T* k_norm, float eps, const float* inv_freq, float pos,
                                int64_t D) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t hd = warp; hd < nheads; hd += kAttnWarps) {
    const T* w = hd < nq ? q_norm : k_norm;
    if (!w) continue;
    float* x = heads + hd * D;
    float ss = 0.0f;
    for (int64_t d = lane; d < D; d += 32) ss = __fmaf_rn(x[d], x[d], ss);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float inv = rsqrtf(ss / float(D) + eps);
    for (int64_t d = lane; d < D; d += 32) x[d] = round_t<T>(to_f(w[d]) * round_t<T>(x[d] * inv));
  }
  __syncthreads();
  const int64_t half = D / 2;
  for (int64_t i = threadIdx.x; i < nheads * D; i += blockDim.x) {
    const int64_t d = i % D;
    const float f = pos * inv_freq[d % half];
    const float c = round_t<T>(cosf(f)), s = round_t<T>(sinf(f));
    const float rot = d < half ? -heads[i + half] : heads[i - half];
    tmp[i] = round_t<T>(round_t<T>(heads[i] * c) + round_t<T>(rot * s));
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < nheads * D; i += blockDim.x) heads[i] = tmp[i];
  __syncthreads();
}

// MAXG >= G: query heads per KV head, a compile-time bound so per-thread scores stay in registers.
template <typename T, int VEC, int MAXG>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(AttnParams<T> p) {
  extern __shared__ __align__(16) float sm[];
  const int64_t G = p.H / p.Hkv, D = p.D;
  float* qs = sm;                              // [G][D], then k and v of the new token
  float* kv_new = qs + G * D;                  // [2][D]
  float* scores = kv_new + 2 * D;              // [G][chunk]
  float* warp_o = scores + G * kAttnChunk;     // [warps][G][D]
  float* stats = warp_o + kAttnWarps * G * D;  // [warps][MAXG] partials, then [G][2]
  const int64_t kvh = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  pdl_trigger();
  pdl_wait();  // every input but the norm weights comes from earlier kernels (dspark/pdl.cuh)
  const int64_t pos = p.positions[b];
  const bool valid = pos >= 0 && pos < p.S;
  const int64_t lo = !valid ? 0 : p.window > 0 && pos - p.window + 1 > 0 ? pos - p.window + 1 : 0;
  const int64_t c0 = split * kAttnChunk;
  const int64_t first = c0 > lo ? c0 : lo;
  const int64_t end = valid ? (c0 + kAttnChunk < pos + 1 ? c0 + kAttnChunk : pos + 1) : 0;
  if (kvh == 0 && b == 0 && split == 0) {  // one block writes the whole status word, so the
    int bad = 0;                             // caller needs no zero-filled buffer (no memset
    for (int64_t i = threadIdx.x; i < p.B; i += blockDim.x)  // kernel inside the decode chain)
      bad |= p.positions[i] < 0 || p.positions[i] >= p.S;
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) *p.status = bad ? int32_t(kBadPosition) : 0;
  }
  if (first >= end) {  // no visible slot in this chunk: weight 0 in the merge
    if (p.splits == 1) {
      for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x)
        p.out[b * p.H * D + kvh * G * D + i] = from_f<T>(0.0f);
      return;
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = (b * p.H + kvh * G + g) * p.splits + split;
      if (threadIdx.x == 0) { p.part_ml[2 * row] = -INFINITY; p.part_ml[2 * row + 1] = 0.0f; }
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) p.part_o[row * D + d] = 0.0f;
    }
    return;
  }

  // The new token: q heads of this group, then k and v, as fp32 values of T; norm + rotary on
  // the G + 1 rotated heads (warp_o, >= (G + 1) D floats, is free until the V pass).
  const T* src = p.qkv + b * (p.H + 2 * p.Hkv) * D;
  for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x) qs[i] = to_f(src[kvh * G * D + i]);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    kv_new[d] = to_f(src[(p.H + kvh) * D + d]);
    kv_new[D + d] = to_f(src[(p.H + p.Hkv + kvh) * D + d]);
  }
  __syncthreads();
  norm_rope_heads<T>(qs, warp_o, G + 1, G, p.q_norm, p.k_norm, p.eps, p.inv_freq, float(pos), D);
  const int64_t head_base = ((p.layer * p.B + b) * p.Hkv + kvh) * p.S;  // slot 0 of this head
  if (pos >= c0 && pos < c0 + kAttnChunk) {  // this block owns the new token's slot
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      p.k_cache[(head_base + pos) * D + d] = from_f<T>(kv_new[d]);
      p.v_cache[(head_base + pos) * D + d] = from_f<T>(kv_new[D + d]);
    }
  }

  // Scores: thread t <-> slot c0 + t; its K row is read with all loads in flight at once.
  const int64_t j = c0 + threadIdx.x;
  const bool live = j >= first && j < end;
  float sc[MAXG];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) sc[g] = 0.0f;
  if (live) {
    const bool fresh = j == pos;
    const T* krow = p.k_cache + (head_base + j) * D;
#pragma unroll 16
    for (int64_t d0 = 0; d0 < D; d0 += VEC) {
      float kx[VEC];
      if (fresh) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) kx[e] = kv_new[d0 + e];
      } else {
        Vec<T, VEC> kv;
        kv.load(krow + d0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) kx[e] = kv[e];
      }
#pragma unroll
      for (int g = 0; g < MAXG; ++g)
        if (g < G)
#pragma unroll
          for (int e = 0; e < VEC; ++e) sc[g] = __fmaf_rn(qs[g * D + d0 + e], kx[e], sc[g]);
    }
  }
  // Chunk softmax statistics per head: warp shuffles, one partial per warp, two barriers.
  float* wpart = stats;  // [warps][MAXG]
  float* fin = stats + kAttnWarps * MAXG;  // [G][2]: max, sum
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    sc[g] = live ? sc[g] * p.scale : -INFINITY;
    float m = sc[g];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0 && g < G) wpart[warp * MAXG + g] = m;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g >= G) break;
    float m = wpart[g];
    for (int w = 1; w < kAttnWarps; ++w) m = fmaxf(m, wpart[w * MAXG + g]);
    const float e = live ? expf(sc[g] - m) : 0.0f;
    scores[g * kAttnChunk + threadIdx.x] = e;
    float l = e;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) fin[2 * g + 1 + 2 * G * (warp + 1)] = l;  // per-warp sums after fin
    if (threadIdx.x == 0) fin[2 * g] = m;
  }
  __syncthreads();
  if (threadIdx.x < G) {
    float l = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) l += fin[2 * threadIdx.x + 1 + 2 * G * (w + 1)];
    fin[2 * threadIdx.x + 1] = l;
  }

  // Weighted V: each half-warp takes one slot (half h of warp w: slots c0 + 2 w + h, then every
  // 2 * warps), its 16 lanes reading the V row in VEC-wide loads (lane l: elements
  // VEC * (l + 16 i)); several slots' loads are in flight per lane; the halves are added last.
  constexpr int kVecPerLane = (kAttnMaxHeadDim + 16 * VEC - 1) / (16 * VEC);
  const int half = lane >> 4, hl = lane & 15;
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    float acc[4][kVecPerLane][VEC];
#pragma unroll
    for (int g = 0; g < 4; ++g)
#pragma unroll
      for (int i = 0; i < kVecPerLane; ++i)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][i][e] = 0.0f;
#pragma unroll 4
    for (int64_t jj = c0 + 2 * warp + half; jj < end; jj += 2 * kAttnWarps) {
      if (jj < first) continue;
      const T* vrow = p.v_cache + (head_base + jj) * D;
      float v[kVecPerLane][VEC];
#pragma unroll
      for (int i = 0; i < kVecPerLane; ++i) {
        const int64_t d0 = int64_t(VEC) * (hl + 16 * i);
        if (d0 >= D) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[i][e] = 0.0f;
        } else if (jj == pos) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[i][e] = kv_new[D + d0 + e];
        } else {
          Vec<T, VEC> vv;
          vv.load(vrow + d0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) v[i][e] = vv[e];
        }
      }
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        if (g0 + g >= G) break;
        const float w = scores[(g0 + g) * kAttnChunk + (jj - c0)];
#pragma unroll
        for (int i = 0; i < kVecPerLane; ++i)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][i][e] = __fmaf_rn(w, v[i][e], acc[g][i][e]);
      }
    }
#pragma unroll
    for (int g = 0; g < 4; ++g)
#pragma unroll
      for (int i = 0; i < kVecPerLane; ++i)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float other = __shfl_xor_sync(0xffffffffu, acc[g][i][e], 16);
          const int64_t d = int64_t(VEC) * (hl + 16 * i) + e;
          if (half == 0 && g0 + g < G && d < D) warp_o[(warp * G + g0 + g) * D + d] = acc[g][i][e] + other;
        }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < G * D; i += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) o += warp_o[w * G * D + i];
    const int64_t g = i / D, d = i % D, h = kvh * G + g;
    if (p.splits == 1) {
      p.out[(b * p.H + h) * D + d] = from_f<T>(o / fin[2 * g + 1]);
    } else {
      const int64_t row = (b * p.H + h) * p.splits + split;
      p.part_o[row * D + d] = o;
      if (d == 0) { p.part_ml[2 * row] = fin[2 * g]; p.part_ml[2 * row + 1] = fin[2 * g + 1]; }
    }
  }
}

// grid (H, B), dynamic smem `splits` floats: out[b, h] = sum_s w_s o_s / sum_s w_s l_s with
// w_s = e^(m_s - M). Chunk weights are computed once into shared memory; warp w then sums the
// chunks s = w, w + warps, ... for every d (independent loads in flight), and warps are added.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_merge_kernel(AttnParams<T> p) {
  extern __shared__ __align__(16) float weight[];  // [splits]
  __shared__ float warp_out[kAttnWarps][kAttnMaxHeadDim];
  const int64_t h = blockIdx.x, b = blockIdx.y, base = (b * p.H + h) * p.splits;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  pdl_trigger();
  pdl_wait();
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < p.splits; s += blockDim.x) mx = fmaxf(mx, p.part_ml[2 * (base + s)]);
  mx = block_reduce(mx, MaxOp{}, -INFINITY);
  float total = 0.0f;
  for (int s = threadIdx.x; s < p.splits; s += blockDim.x) {
    const float m = p.part_ml[2 * (base + s)];
    const float w = m == -INFINITY ? 0.0f : expf(m - mx);
    weight[s] = w;
    total = __fmaf_rn(w, p.part_ml[2 * (base + s) + 1], total);
  }
  total = block_reduce(total, SumOp{}, 0.0f);  // (its barriers also publish `weight`)
  constexpr int kPerLane = kAttnMaxHeadDim / 32;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
#pragma unroll 4
  for (int s = warp; s < p.splits; s += kAttnWarps) {
    const float w = weight[s];
    if (w == 0.0f) continue;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < p.D) acc[i] = __fmaf_rn(w, p.part_o[(base + s) * p.D + d], acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) warp_out[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) o += warp_out[w][d];
    p.out[(b * p.H + h) * p.D + d] = from_f<T>(total > 0.0f ? o / total : 0.0f);
  }
}

// Shapes as in AttnParams; host checks: D even, D <= 256, H % Hkv == 0, G <= 16, splits ==
// attn_splits(S), part_* sized for splits > 1.
template <typename T>
cudaError_t launch_decode_attention(const AttnParams<T>& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.D % kVec == 0 && reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0;
  const int64_t G = p.H / p.Hkv;
  auto pick = [&](auto maxg) {
    constexpr int M = decltype(maxg)::value;
    return vec ? decode_attention_kernel<T, kVec, M> : decode_attention_kernel<T, 1, M>;
  };
  auto kernel = G <= 1   ? pick(std::integral_constant<int, 1>{})
                : G <= 4 ? pick(std::integral_constant<int, 4>{})
                : G <= 8 ? pick(std::integral_constant<int, 8>{})
                         : pick(std::integral_constant<int, kAttnMaxGroup>{});
  const size_t smem = attn_smem_bytes(p.H / p.Hkv, p.D);
  cudaError_t err = cudaSuccess;
  if (smem > 48 * 1024) {  // large head groups: opt in to more than the default 48 KB
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  // Both kernels launch in plain stream order, not programmatically: measured on the H200
  // (Qwen3-8B shapes, batch-1 graph-replayed decode; bench/RESULTS.md, fourth session) a
  // programmatic launch behind the qkv projection made the step 0.24 ms slower, and a plain
  // launch of both kernels was 0.03 ms faster than of the attention kernel alone. Likely: blocks
  // of attention (and of the o projection behind it) became resident while the projection
  // still streamed, so attention's dependent round trips queued behind prefetched weights.
  // The kernels keep pdl_trigger(), so the o projection still launches early and prefetches.
  err = launch_ex(false, kernel, dim3(unsigned(p.Hkv), unsigned(p.B), unsigned(p.splits)),
                  dim3(kAttnThreads), smem, stream, p);
  if (err != cudaSuccess) return err;
  if (p.splits > 1) {
    auto merge = decode_attention_merge_kernel<T>;
    const size_t merge_smem = sizeof(float) * size_t(p.splits);
    if (merge_smem > 48 * 1024) {  // caches beyond 1.5 M slots
      err = cudaFuncSetAttribute(merge, cudaFuncAttributeMaxDynamicSharedMemorySize, int(merge_smem));
      if (err != cudaSuccess) return err;
    }
    err = launch_ex(false, merge, dim3(unsigned(p.H), unsigned(p.B)), dim3(kAttnThreads), merge_smem, stream, p);
  }
  return err;
}

}  // namespace cuda
}  // namespace dspark
