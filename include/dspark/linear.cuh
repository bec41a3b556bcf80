// dspark/linear.cuh: the fused skinny linear layer of batch-1 decode and small verify blocks.
//
//   out[m, n] = residual[m, n] + (sum_k W[n, k] * xhat[m, k] + bias[n])        (M small, N, K big)
//   xhat = x                                    (kPlain,    x [M, K])
//        = g * (x * rsqrt(mean(x^2) + eps))    (kRmsNorm,  x [M, K], g [K])
//        = silu(x[:, :K]) * x[:, K:]            (kSiluGate, x [M, 2K])
//
// Roundings follow the unfused PyTorch modules (dspark/reference.py: fused_linear): the normed
// or gated input is rounded to T like the separate ops would store it, products accumulate in
// fp32, bias is added before the one rounding of the GEMM result, the residual add rounds again.
//
// Why a kernel of our own: at M = 1 the layer is a GEMV that reads each weight once; cuBLAS
// splits K for some shapes (a second reduce kernel) and the norm / SiLU-gate / residual ops
// around it are separate kernels. Here one kernel streams W at full width (16-byte loads, several
// in flight per lane), each warp owning ROWS output rows; every block first stages xhat for its
// M tile in shared memory (fp32) and then walks row groups grid-stride, so the prologue runs once
// per block, not once per row. No torch headers: raw pointers, sizes and a stream.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dspark/block_reduce.cuh"
#include "dspark/numeric.h"  // to_f / from_f / round_t
#include "dspark/pdl.cuh"

namespace dspark {
namespace cuda {

enum LinearPrologue : int { kPlain = 0, kRmsNorm = 1, kSiluGate = 2 };

template <typename T>
struct LinearParams {
  const T* x;            // [M, K] or [M, 2K] (kSiluGate)
  const T* weight;       // [N, K] row-major (nn.Linear's layout)
  const T* bias;         // [N] or nullptr
  const T* residual;     // [M, N] or nullptr
  const T* norm_weight;  // [K] (kRmsNorm only)
  T* out;                // [M, N]
  int64_t M, N, K;
  float eps;
  int prologue;
};

constexpr int kLinearWarps = 8;                // 256 threads per block
constexpr int kLinearStageFloats = 12288;      // 48 KB of staged xhat per block

// VEC consecutive elements of T from one 16-byte (VEC * sizeof(T) == 16) or scalar (VEC == 1)
// load, kept packed until use (half the registers of unpacked floats for 16-bit types).
template <typename T, int VEC>
struct Vec {
  static_assert(VEC == 1 || VEC * sizeof(T) == 16, "VEC: one element or 16 bytes");
  uint4 raw;  // VEC > 1 (unpacked with bit operations: no local-memory type punning)
  T one;      // VEC == 1
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (VEC == 1) one = __ldg(p);
    else raw = __ldg(reinterpret_cast<const uint4*>(p));
  }
  __device__ __forceinline__ float operator[](int i) const {
    if constexpr (VEC == 1) {
      return to_f(one);
    } else {
      const unsigned word = (i * int(sizeof(T))) / 4 == 0 ? raw.x
                            : (i * int(sizeof(T))) / 4 == 1 ? raw.y
                            : (i * int(sizeof(T))) / 4 == 2 ? raw.z : raw.w;
      if constexpr (sizeof(T) == 4) return __uint_as_float(word);
      const unsigned bits = (i & 1) ? word >> 16 : word & 0xffffu;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(bits << 16);
      else return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
  }
};

// xhat[m, k .. k + VEC) (the prologue) into dst, in fp32 after T-rounding of each stored
// intermediate. k is a multiple of VEC; x / norm_weight rows are VEC-aligned (host-checked).
template <typename T, int VEC>
__device__ __forceinline__ void prologue_vec(const LinearParams<T>& p, int64_t m, int64_t k,
                                             float inv_rms, float* dst) {
  if (p.prologue == kSiluGate) {
    Vec<T, VEC> a, u;
    a.load(p.x + m * 2 * p.K + k);
    u.load(p.x + m * 2 * p.K + p.K + k);
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = round_t<T>(round_t<T>(a[e] / (1.0f + expf(-a[e]))) * u[e]);
    return;
  }
  Vec<T, VEC> x;
  x.load(p.x + m * p.K + k);
  if (p.prologue == kRmsNorm) {
    Vec<T, VEC> g;
    g.load(p.norm_weight + k);
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = round_t<T>(g[e] * round_t<T>(x[e] * inv_rms));
    return;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) dst[e] = x[e];
}

// One batch of weight vectors per lane: U vectors (32 apart) of each of ROWS rows.
template <typename T, int VEC, int ROWS, int U>
struct WeightBatch {
  Vec<T, VEC> w[U][ROWS];
  __device__ __forceinline__ void load(const T* const* rows, int64_t v0, int64_t nvec) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (v0 + u * 32 < nvec) w[u][r].load(rows[r] + (v0 + u * 32) * VEC);
  }
};

// grid: (row-group blocks, ceil(M / MT)); block: kLinearWarps warps; dynamic smem MT * kc floats.
// Software pipeline per warp: the next batch of weight vectors is in flight while the current
// one is multiplied, and a block's first batch is issued before its prologue (the weights do not
// depend on x), so the prologue's latency hides under the first weight reads.
// MT: rows of x per block (M tile); ROWS: output rows per warp; U: vectors per row and batch.
template <typename T, int VEC, int MT, int ROWS, int U>
__global__ void __launch_bounds__(kLinearWarps * 32)
fused_linear_kernel(LinearParams<T> p, int64_t kc_max) {
  extern __shared__ __align__(16) float xs[];  // [MT][kc_max]: xhat of this block's M tile
  __shared__ float inv_rms[MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const int mcount = int(p.M - m0 < MT ? p.M - m0 : MT);
  const bool one_chunk = p.K <= kc_max;
  const int64_t rows_per_group = int64_t(kLinearWarps) * ROWS;
  const int64_t groups = (p.N + rows_per_group - 1) / rows_per_group;

  auto row_ptrs = [&](int64_t row0, int64_t k0, const T** w) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) w[r] = p.weight + (row0 + r < p.N ? row0 + r : 0) * p.K + k0;
  };
  pdl_trigger();
  WeightBatch<T, VEC, ROWS, U> cur, next;
  bool prefetched = false;
  if (one_chunk) {  // the first group's first two batches, before waiting on the previous kernel
    const int64_t row0 = (int64_t(blockIdx.x) * kLinearWarps + warp) * ROWS;
    if (row0 < p.N) {
      const T* w[ROWS];
      row_ptrs(row0, 0, w);
      cur.load(w, lane, p.K / VEC);
      next.load(w, lane + 32 * U, p.K / VEC);
      prefetched = true;
    }
  }
  // RMSNorm of one row whose K fits kRegNormVecs vectors per thread (e.g. hidden 4096, bf16):
  // the norm weight (constant) is loaded before the wait and x once after it, both kept in
  // registers, so a single global round trip separates the wait from the weight stream.
  constexpr int kRegNormVecs = 2;
  const bool norm_in_regs = VEC > 1 && MT == 1 && one_chunk && p.prologue == kRmsNorm &&
                            p.K / VEC <= int64_t(kRegNormVecs) * blockDim.x;
  Vec<T, VEC> g_reg[kRegNormVecs];
  if (norm_in_regs) {
#pragma unroll
    for (int r = 0; r < kRegNormVecs; ++r) {
      const int64_t i = threadIdx.x + int64_t(r) * blockDim.x;
      if (i < p.K / VEC) g_reg[r].load(p.norm_weight + i * VEC);
    }
  }
  pdl_wait();  // x / residual come from earlier kernels (dspark/pdl.cuh)

  if (norm_in_regs) {
    Vec<T, VEC> x_reg[kRegNormVecs];
    float ss = 0.0f;
#pragma unroll
    for (int r = 0; r < kRegNormVecs; ++r) {
      const int64_t i = threadIdx.x + int64_t(r) * blockDim.x;
      if (i >= p.K / VEC) continue;
      x_reg[r].load(p.x + m0 * p.K + i * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss = __fmaf_rn(x_reg[r][e], x_reg[r][e], ss);
    }
    ss = block_reduce(ss, SumOp{}, 0.0f);
    const float inv = rsqrtf(ss / float(p.K) + p.eps);
#pragma unroll
    for (int r = 0; r < kRegNormVecs; ++r) {
      const int64_t i = threadIdx.x + int64_t(r) * blockDim.x;
      if (i >= p.K / VEC) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        xs[i * VEC + e] = round_t<T>(g_reg[r][e] * round_t<T>(x_reg[r][e] * inv));
    }
    __syncthreads();
  } else if (p.prologue == kRmsNorm) {
    for (int m = 0; m < mcount; ++m) {
      float ss = 0.0f;
      if constexpr (VEC > 1) {
#pragma unroll 4
        for (int64_t i = threadIdx.x; i < p.K / VEC; i += blockDim.x) {
          Vec<T, VEC> x;
          x.load(p.x + (m0 + m) * p.K + i * VEC);
#pragma unroll
          for (int e = 0; e < VEC; ++e) ss = __fmaf_rn(x[e], x[e], ss);
        }
      } else {
#pragma unroll 4
        for (int64_t k = threadIdx.x; k < p.K; k += blockDim.x) {
          const float v = to_f(p.x[(m0 + m) * p.K + k]);
          ss = __fmaf_rn(v, v, ss);
        }
      }
      ss = block_reduce(ss, SumOp{}, 0.0f);
      if (threadIdx.x == 0) inv_rms[m] = rsqrtf(ss / float(p.K) + p.eps);
    }
    __syncthreads();
  }
  auto stage = [&](int64_t k0, int64_t kc) {
    __syncthreads();  // the previous chunk's readers are done
    for (int m = 0; m < mcount; ++m) {
#pragma unroll 4
      for (int64_t i = threadIdx.x; i < kc / VEC; i += blockDim.x)
        prologue_vec<T, VEC>(p, m0 + m, k0 + i * VEC, inv_rms[m], xs + m * kc_max + i * VEC);
    }
    __syncthreads();
  };
  if (one_chunk && !norm_in_regs) stage(0, p.K);

  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {  // uniform across the block
    const int64_t row0 = (g * kLinearWarps + warp) * ROWS;
    float acc[ROWS][MT];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
    for (int64_t k0 = 0; k0 < p.K; k0 += kc_max) {
      const int64_t kc = p.K - k0 < kc_max ? p.K - k0 : kc_max;
      if (!one_chunk) stage(k0, kc);
      if (row0 >= p.N) continue;  // warp-uniform; idle warps still reach the staging barriers
      const T* w[ROWS];
      row_ptrs(row0, k0, w);
      const int64_t nvec = kc / VEC;
      if (!prefetched) cur.load(w, lane, nvec);
      bool next_ready = prefetched;  // the prefetch also loaded the second batch
      prefetched = false;
      for (int64_t v0 = lane; v0 < nvec; v0 += 32 * U) {
        const bool more = v0 + 32 * U < nvec;
        if (more && !next_ready) next.load(w, v0 + 32 * U, nvec);
        next_ready = false;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t v = v0 + u * 32;
          if (v >= nvec) break;
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const float* xm = xs + m * kc_max + v * VEC;
            if constexpr (VEC % 4 == 0) {  // 16-byte shared loads of xhat
#pragma unroll
              for (int j = 0; j < VEC / 4; ++j) {
                const float4 q = reinterpret_cast<const float4*>(xm)[j];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                  float a = acc[r][m];
                  a = __fmaf_rn(cur.w[u][r][4 * j + 0], q.x, a);
                  a = __fmaf_rn(cur.w[u][r][4 * j + 1], q.y, a);
                  a = __fmaf_rn(cur.w[u][r][4 * j + 2], q.z, a);
                  acc[r][m] = __fmaf_rn(cur.w[u][r][4 * j + 3], q.w, a);
                }
              }
            } else {
#pragma unroll
              for (int r = 0; r < ROWS; ++r) acc[r][m] = __fmaf_rn(cur.w[u][r][0], xm[0], acc[r][m]);
            }
          }
        }
        if (more) cur = next;
      }
      for (int64_t k = nvec * VEC + lane; k < kc; k += 32) {  // tail (VEC > 1 and K % VEC != 0)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float wk = to_f(w[r][k]);
#pragma unroll
          for (int m = 0; m < MT; ++m) acc[r][m] = __fmaf_rn(wk, xs[m * kc_max + k], acc[r][m]);
        }
      }
    }
    if (row0 >= p.N) continue;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int64_t n = row0 + r, mm = m0 + m;
        if (lane != (r * MT + m) % 32 || n >= p.N || m >= mcount) continue;
        float y = acc[r][m];
        if (p.bias) y += to_f(p.bias[n]);
        y = round_t<T>(y);
        if (p.residual) y = to_f(p.residual[mm * p.N + n]) + y;
        p.out[mm * p.N + n] = from_f<T>(y);
      }
  }
}

template <typename T, int VEC, int MT, int ROWS, int U>
cudaError_t launch_fused_linear_tile(const LinearParams<T>& p, cudaStream_t stream) {
  auto kernel = fused_linear_kernel<T, VEC, MT, ROWS, U>;
  int64_t kc_max = kLinearStageFloats / MT / VEC * VEC;
  if (kc_max > p.K) kc_max = p.K;
  const size_t smem = size_t(MT) * size_t(kc_max) * sizeof(float);
  // Enough blocks to fill the GPU once; each walks row groups grid-stride (one prologue each).
  // Per device (function attributes and SM counts are per device): the first launch on a
  // device opts the kernel in to 48 KB of staging plus its static shared arrays (over the
  // default dynamic limit) and measures the occupancy.
  constexpr int kMaxDevices = 64;
  static int blocks_per_sm[kMaxDevices] = {}, sms[kMaxDevices] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  if (sms[dev] == 0) {
    int count = 0, per_sm = 0;
    err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 int(kLinearStageFloats * sizeof(float)));
    if (err == cudaSuccess)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kLinearWarps * 32,
                                                          kLinearStageFloats * sizeof(float));
    if (err != cudaSuccess) return err;
    blocks_per_sm[dev] = per_sm < 1 ? 1 : per_sm;
    sms[dev] = count;
  }
  const int64_t rows_per_group = int64_t(kLinearWarps) * ROWS;
  const int64_t groups = (p.N + rows_per_group - 1) / rows_per_group;
  const int64_t fill = int64_t(sms[dev]) * blocks_per_sm[dev];
  const dim3 grid(unsigned(groups < fill ? groups : fill), unsigned((p.M + MT - 1) / MT));
  return launch_pdl(kernel, grid, dim3(kLinearWarps * 32), smem, stream, p, kc_max);
}

template <typename T, int VEC>
cudaError_t launch_fused_linear_vec(const LinearParams<T>& p, cudaStream_t stream) {
  // MT: the smallest tile holding min(M, 8) rows; larger M runs ceil(M / 8) tiles (W re-read).
  // Two batches of ROWS * U 16-byte loads per lane in flight (the pipeline's current and next).
  if (p.M <= 1) return launch_fused_linear_tile<T, VEC, 1, 2, 2>(p, stream);
  if (p.M <= 2) return launch_fused_linear_tile<T, VEC, 2, 2, 2>(p, stream);
  if (p.M <= 4) return launch_fused_linear_tile<T, VEC, 4, 2, 2>(p, stream);
  return launch_fused_linear_tile<T, VEC, 8, 2, 2>(p, stream);
}

// Shapes as in LinearParams. M, N >= 1, K >= 1, grid-y limit: ceil(M / 8) <= 65535.
template <typename T>
cudaError_t launch_fused_linear(const LinearParams<T>& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  auto al = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool aligned = p.K % kVec == 0 && al(p.weight) && al(p.x) && (!p.norm_weight || al(p.norm_weight));
  return aligned ? launch_fused_linear_vec<T, kVec>(p, stream) : launch_fused_linear_vec<T, 1>(p, stream);
}

}  // namespace cuda
}  // namespace dspark
