// dspark/attention_launch.cuh: the merge kernel of dspark::decode_attention and the launcher of
// both kernels (kernel 1: dspark/attention_kernel.cuh; shapes and the fixed summation order:
// dspark/attention.cuh).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dspark/attention_kernel.cuh"

// Phase marks of the merge for bench/probe_attention.cu; empty in the product build.
#ifndef DSPARK_ATTN_MERGE_MARK
#define DSPARK_ATTN_MERGE_MARK(i)
#endif

namespace dspark {
namespace cuda {

// grid (H, T, B), dynamic smem `splits` floats: out[b, j, h] = sum_s w_s o_s / sum_s w_s l_s with
// w_s = e^(m_s - M). Chunk weights are computed once into shared memory; warp w then sums the
// chunks s = w, w + warps, ... for every d (independent loads in flight), and warps are added.
// Chunks a row cannot see have w_s = 0 and are skipped: the result does not depend on S.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_merge_kernel(AttnParams<T> p) {
  extern __shared__ __align__(16) float weight[];  // [splits]
  __shared__ float warp_out[kAttnWarps][kAttnMaxHeadDim];
  const int64_t h = blockIdx.x, j = blockIdx.y, b = blockIdx.z;
  const int64_t bh = (b * p.rows + j) * p.H + h, base = bh * p.splits;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  DSPARK_ATTN_MERGE_MARK(0);
  pdl_trigger();
  pdl_wait();
  DSPARK_ATTN_MERGE_MARK(1);
  // Chunks past the request's active ones hold identities (or, with a per-request split, were
  // never written): skipping them leaves every sum below bit for bit the same.
  const int64_t st = p.start[b];
  const int splits =
      st >= 0 && st + p.rows <= p.S ? attn_active_chunks(st, p.rows, p.splits) : p.splits;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) mx = fmaxf(mx, p.part_ml[2 * (base + s)]);
  mx = block_reduce(mx, MaxOp{}, -INFINITY);
  float total = 0.0f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float m = p.part_ml[2 * (base + s)];
    const float w = m == -INFINITY ? 0.0f : expf(m - mx);
    weight[s] = w;
    total = __fmaf_rn(w, p.part_ml[2 * (base + s) + 1], total);
  }
  total = block_reduce(total, SumOp{}, 0.0f);  // (its barriers also publish `weight`)
  DSPARK_ATTN_MERGE_MARK(2);
  constexpr int kPerLane = kAttnMaxHeadDim / 32;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
#pragma unroll 4
  for (int s = warp; s < splits; s += kAttnWarps) {
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
    p.out[bh * p.D + d] = from_f<T>(total > 0.0f ? o / total : 0.0f);
  }
  DSPARK_ATTN_MERGE_MARK(3);
}

// Opts `kernel` in to `smem` bytes of dynamic shared memory when over the default 48 KB (once
// per device and size: function attributes are per device).
template <typename K>
cudaError_t attn_smem_opt_in(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  static size_t done[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < 64 && done[dev] >= smem) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess && dev >= 0 && dev < 64) done[dev] = smem;
  return err;
}

// KV: VEC-wide loads per lane of a V row, 1 where one load covers the head (16-bit heads <= 128:
// twice the query vectors of a weighted-V pass), else enough for kAttnMaxHeadDim.
template <typename T, int VEC, int MAXQ, int KV>
cudaError_t launch_attention_kernel(const AttnParams<T>& p, cudaStream_t stream) {
  auto kernel = decode_attention_kernel<T, VEC, MAXQ, KV>;
  const size_t smem = attn_smem_bytes(p.rows, p.D, MAXQ);
  cudaError_t err = attn_smem_opt_in(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t z = attn_grid_z(p.rows, p.H / p.Hkv, p.splits, p.Hkv * p.B, p.sms, p.rows_per_block,
                                p.heads_per_block);
  // Both kernels launch in plain stream order, not programmatically: measured on the H200
  // (Qwen3-8B shapes, batch-1 graph-replayed decode; bench/RESULTS.md, fourth session) a
  // programmatic launch behind the qkv projection made the step 0.24 ms slower. The kernels keep
  // pdl_trigger(), so the o projection still launches early and prefetches its weights.
  return launch_ex(false, kernel, dim3(unsigned(p.Hkv), unsigned(p.B), unsigned(z)),
                   dim3(kAttnThreads), smem, stream, p);
}

template <typename T, int MAXQ>
cudaError_t launch_attention_maxq(const AttnParams<T>& p, bool vec, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kFull = (kAttnMaxHeadDim + 16 * kVec - 1) / (16 * kVec);
  if (!vec) return launch_attention_kernel<T, 1, MAXQ, kAttnMaxHeadDim / 16>(p, stream);
  return p.D <= 16 * kVec ? launch_attention_kernel<T, kVec, MAXQ, 1>(p, stream)
                          : launch_attention_kernel<T, kVec, MAXQ, kFull>(p, stream);
}

// Shapes as in AttnParams; host checks: D even, D <= 256, H % Hkv == 0, G <= 16, 1 <= T <= 64,
// splits == attn_splits(S), 1 <= rows_per_block <= T (attn_rows_per_block over all splits; sms
// > 0: chosen again per request in the kernel), part_* sized for splits > 1, attn_grid_z <= 65535.
template <typename T>
cudaError_t launch_decode_attention(const AttnParams<T>& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  auto al = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool vec = p.D % kVec == 0 && al(p.k_cache) && al(p.v_cache);
  const int64_t G = p.H / p.Hkv, rows = p.rows_per_block < p.rows ? p.rows_per_block : p.rows;
  const int64_t want = rows * G < kAttnMaxQ ? rows * G : kAttnMaxQ;  // >= G (G <= 16)
  cudaError_t err = want <= 4    ? launch_attention_maxq<T, 4>(p, vec, stream)
                    : want <= 8  ? launch_attention_maxq<T, 8>(p, vec, stream)
                    : want <= 16 ? launch_attention_maxq<T, 16>(p, vec, stream)
                                 : launch_attention_maxq<T, kAttnMaxQ>(p, vec, stream);
  if (err != cudaSuccess || p.splits == 1) return err;
  auto merge = decode_attention_merge_kernel<T>;
  const size_t merge_smem = sizeof(float) * size_t(p.splits);
  err = attn_smem_opt_in(merge, merge_smem);  // caches beyond 1.5 M slots
  if (err != cudaSuccess) return err;
  // The merge launches programmatically (p.merge_pdl, where sm_90 code runs): its blocks start
  // while kernel 1 runs and wait for it in pdl_wait(), and their pdl_trigger() lets the next
  // kernel (the o projection) launch then too and prefetch its weights during the attention.
  bool pdl = false;
  if (p.merge_pdl && (err = sm90_paths(merge, &pdl)) != cudaSuccess) return err;
  return launch_ex(pdl, merge, dim3(unsigned(p.H), unsigned(p.rows), unsigned(p.B)),
                   dim3(kAttnThreads), merge_smem, stream, p);
}

}  // namespace cuda
}  // namespace dspark
