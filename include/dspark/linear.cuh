// dspark/linear.cuh: parameters, numeric helpers and tile building blocks of dspark's fused
// skinny linear layer (the kernel and its launcher: dspark/linear_kernel.cuh).
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
// One summation order for every row count (docs/DESIGN.md property 6, batch invariance): each
// out[m, n] is a fixed function of row m of x and of (N, K), never of M or of the other rows:
//   - K is cut into linear_split(N, K).slices slices of slice_k (a multiple of 32); a slice is
//     summed by one block of a thread-block cluster, the slice sums are added in slice order;
//   - inside a slice a warp owns a 16-row strip of W and walks the slice in 32-k slabs in order.
//     bf16/fp16: a slab is two mma.m16n8k16 (A = 16 weight rows x 16 k, B = 16 k x 8 tokens,
//     fp32 accumulators chained slab after slab); an MMA's columns are independent, so a token
//     gets the same bits in whichever 8-token tile it sits. fp32: one FMA chain per (weight row,
//     token, half of each slab), the halves added at the end of the slice;
//   - the RMSNorm statistic of a row: per slice a fixed 32-lane order, slices added in order.
// How many tokens a call has only decides how many column tiles each weight fragment meets.
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
  int stage_budget;  // bytes of staged activations per block (linear_stage); <= 0: see there
};

constexpr int kLinearWarps = 8;  // 256 threads per block
constexpr int kLinearThreads = 32 * kLinearWarps;
constexpr int kLinearRows = 16 * kLinearWarps;  // output rows per block: a 16-row strip per warp
constexpr int kLinearSlab = 32;                 // k per weight step of a warp (two k16 MMAs)
constexpr int kLinearMaxSlices = 8;             // blocks per cluster (the portable maximum)
constexpr int kLinearCols = 64;                 // tokens per block (8 MMA column tiles)
constexpr int kLinearTargetBlocks = 256;        // slices double until the grid has this many
// The staged activations: a block stages xhat of all its tokens for `k` consecutive k of its
// slice at a time (a chunk), row stride `stride` bytes. A launch choice, not arithmetic: the slab
// order and every sum are the same for any chunk. At most 8 KB / column tiles of a token (a decode
// stages a whole slice at once, the LM head's 4096 bf16 inputs included), at most the slice, and
// at most `budget` bytes for all tokens (kLinearStageBudget by default): the staging buffer is
// carved out of the SM's L1, which holds the weight loads in flight (three blocks that staged 8
// tokens x 8 KB each left ~30 KB of L1 on Hopper). budget < 0: 8 KB / column tiles per token
// whatever the slice (the rule before 2026-12-06 s14, for A/B). k is a multiple of two slabs (a
// weight batch never straddles chunks); the stride is 64 bytes past a multiple of 128, so the 8
// token rows of a B fragment spread over the banks.
constexpr int kLinearStageBudget = 32 * 1024;
struct LinearStage {
  int k;       // k per chunk
  int stride;  // bytes between staged token rows
};
template <int NT>
inline LinearStage linear_stage(int elem_bytes, int64_t tokens, int64_t slice_k, int budget) {
  constexpr int64_t kMaxTokenBytes = 8192 / NT;
  constexpr int64_t kStep = 2 * kLinearSlab;
  int64_t k = kMaxTokenBytes / elem_bytes;
  if (budget >= 0) {
    const int64_t b = budget > 0 ? budget : kLinearStageBudget;
    const int64_t per_token = b / (tokens > 0 ? tokens : 1) / elem_bytes;
    k = per_token < k ? per_token : k;
    const int64_t sk = (slice_k + kStep - 1) / kStep * kStep;
    k = sk < k ? sk : k;
  }
  k = k / kStep * kStep;
  if (k < kStep) k = kStep;
  const int64_t bytes = k * elem_bytes;
  return {int(k), int((bytes + 127) / 128 * 128 + 64)};
}

// The canonical k split of an [N, K] weight. A function of (N, K) only, not of M or of the
// device, because it fixes the summation order: slices double while the grid stays under
// kLinearTargetBlocks blocks (small N: qkv / o / down of a 8B model get 8 slices, the LM head 1)
// and each slice keeps at least two slabs.
struct LinearSplit {
  int slices;
  int64_t slice_k;  // multiple of kLinearSlab; the last slice may be shorter or empty
};
inline LinearSplit linear_split(int64_t N, int64_t K) {
  const int64_t row_blocks = (N + kLinearRows - 1) / kLinearRows;
  const int64_t slabs = (K + kLinearSlab - 1) / kLinearSlab;
  int s = 1;
  while (s < kLinearMaxSlices && row_blocks * s < kLinearTargetBlocks && slabs >= 4 * s) s *= 2;
  return {s, (slabs + s - 1) / s * kLinearSlab};
}

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
      const unsigned word = (i * int(sizeof(T))) / 4 == 0   ? raw.x
                            : (i * int(sizeof(T))) / 4 == 1 ? raw.y
                            : (i * int(sizeof(T))) / 4 == 2 ? raw.z
                                                            : raw.w;
      if constexpr (sizeof(T) == 4) return __uint_as_float(word);
      const unsigned bits = (i & 1) ? word >> 16 : word & 0xffffu;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(bits << 16);
      else return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
  }
};

// ---- tile building blocks -------------------------------------------------------------------

// 16 bytes of row[k ..] (16 / sizeof(T) elements) as raw bits, zeros at and past `end`. `vec`:
// one 16-byte load (the caller guarantees alignment and that no 16-byte group straddles `end`).
template <typename T>
__device__ __forceinline__ uint4 load16(const T* row, int64_t k, int64_t end, bool vec) {
  if (k >= end) return make_uint4(0u, 0u, 0u, 0u);
  if (vec) return __ldg(reinterpret_cast<const uint4*>(row + k));
  unsigned w[4] = {0u, 0u, 0u, 0u};
  if constexpr (sizeof(T) == 4) {
    const unsigned* r = reinterpret_cast<const unsigned*>(row);
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (k + e < end) w[e] = __ldg(r + k + e);
  } else {
    const unsigned short* r = reinterpret_cast<const unsigned short*>(row);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (k + e < end) w[e / 2] |= unsigned(__ldg(r + k + e)) << (16 * (e & 1));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Element i of 16 packed bytes of T, as float.
template <typename T>
__device__ __forceinline__ float elem(const uint4& v, int i) {
  constexpr int kPerWord = 4 / int(sizeof(T));
  const int wi = i / kPerWord;
  const unsigned word = wi == 0 ? v.x : wi == 1 ? v.y : wi == 2 ? v.z : v.w;
  if constexpr (sizeof(T) == 4) return __uint_as_float(word);
  const unsigned bits = (i & 1) ? word >> 16 : word & 0xffffu;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(bits << 16);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// The bits of from_f<T>(v), in the low bits of the word.
template <typename T>
__device__ __forceinline__ unsigned bits_of(float v) {
  if constexpr (sizeof(T) == 4) return __float_as_uint(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  else return __half_as_ushort(__float2half_rn(v));
}

// Two fp32 values rounded to nearest even into a packed pair of 16-bit T (lo in the low half),
// as two from_f<T> would. sm_80+ (one cvt for both).
template <typename T>
__device__ __forceinline__ unsigned pack2_rn(float lo, float hi) {
  unsigned r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// Packed pairs of 16-bit T multiplied, each product rounded once to T. The fp32 product of two
// bf16 (8 + 8 significant bits) or fp16 (11 + 11) values is exact, so this is round_t<T>(x * y)
// of the unpacked values, in one instruction for two elements (bf16: fma with -0, which keeps
// the product's sign at zero; sm_80 has no bf16x2 multiply).
template <typename T>
__device__ __forceinline__ unsigned mul2_rn(unsigned x, unsigned y) {
  unsigned r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(0x80008000u));
  else asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(y));
  return r;
}

// 16 bytes of xhat[m, k ..] (the prologue), as T bits, zeros at and past `end`. 16-bit T: the
// last multiply of each element (by the norm weight, by the up projection) on packed pairs, the
// same roundings as the element-wise fp32 form (see mul2_rn) in about a quarter of its
// instructions: staging is the part of a block's work that grows with its tokens (s6 ncu at
// the 8B gate_up: ~1.3x a decode's instructions at 8 tokens).
template <typename T>
__device__ __forceinline__ uint4 xhat16(const LinearParams<T>& p, int64_t m, int64_t k, int64_t end,
                                        float inv_rms, bool vec) {
  constexpr int E = 16 / int(sizeof(T));
  if (p.prologue == kPlain) return load16(p.x + m * p.K, k, end, vec);  // the bits as they are
  if constexpr (sizeof(T) == 4) {
    float r[E];
    if (p.prologue == kSiluGate) {
      const uint4 a = load16(p.x + m * 2 * p.K, k, end, vec);
      const uint4 u = load16(p.x + m * 2 * p.K + p.K, k, end, vec);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float av = elem<T>(a, e);
        r[e] = round_t<T>(round_t<T>(av / (1.0f + expf(-av))) * elem<T>(u, e));
      }
    } else {
      const uint4 x = load16(p.x + m * p.K, k, end, vec), g = load16(p.norm_weight, k, end, vec);
#pragma unroll
      for (int e = 0; e < E; ++e)
        r[e] = round_t<T>(elem<T>(g, e) * round_t<T>(elem<T>(x, e) * inv_rms));
    }
    unsigned w[4];
#pragma unroll
    for (int e = 0; e < E; ++e) w[e] = k + e < end ? bits_of<T>(r[e]) : 0u;
    return make_uint4(w[0], w[1], w[2], w[3]);
  } else {
    uint4 a, b;  // per pair: the fp32 part is rounded into a; b is the packed second factor
    if (p.prologue == kSiluGate) {
      a = load16(p.x + m * 2 * p.K, k, end, vec);
      b = load16(p.x + m * 2 * p.K + p.K, k, end, vec);
    } else {
      a = load16(p.x + m * p.K, k, end, vec);
      b = load16(p.norm_weight, k, end, vec);
    }
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float lo = elem<T>(a, 2 * i), hi = elem<T>(a, 2 * i + 1);
      if (p.prologue == kSiluGate) {
        lo = lo / (1.0f + expf(-lo));
        hi = hi / (1.0f + expf(-hi));
      } else {
        lo *= inv_rms;
        hi *= inv_rms;
      }
      const unsigned bw = i == 0 ? b.x : i == 1 ? b.y : i == 2 ? b.z : b.w;
      w[i] = mul2_rn<T>(pack2_rn<T>(lo, hi), bw);
    }
    if (k + E > end) {  // a group that straddles `end` (unaligned rows): zeros past it
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (k + e >= end) w[e / 2] &= (e & 1) ? 0x0000ffffu : 0xffff0000u;
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// RMSNorm statistic of row[lo, hi) in the canonical order: 8-element groups (counted from lo)
// dealt round-robin to the 32 lanes, FMA-chained per lane in order, then an xor butterfly (every
// lane ends with the same bits). lo is a multiple of 32.
template <typename T>
__device__ float slice_sumsq(const T* row, int64_t lo, int64_t hi, bool vec, int lane) {
  constexpr int E = 16 / int(sizeof(T));
  float ss = 0.0f;
#pragma unroll 2
  for (int64_t k = lo + 8 * lane; k < hi; k += 8 * 32) {
#pragma unroll
    for (int h = 0; h < 8 / E; ++h) {
      const uint4 v = load16(row, k + h * E, hi, vec);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float f = elem<T>(v, e);
        ss = __fmaf_rn(f, f, ss);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  return ss;
}

// U slabs of a warp's 16-row strip. 16-bit T: lane (g, t) = (lane / 4, lane % 4) holds rows g and
// g + 8 at k + 8t .. k + 8t + 8 (w[u][0], w[u][1]): the A fragments of the slab's two MMAs, whose
// k slots {2t, 2t+1, 2t+8, 2t+9} take k + 8t + {0, 1, 2, 3} (MMA 0) and + {4, 5, 6, 7} (MMA 1).
// The activations are staged so that B uses the same permutation. fp32: lane (r, h) = (lane %
// 16, lane / 16) holds row r at k + 16h .. k + 16h + 16 (four words).
template <typename T, int U>
struct WeightBatch {
  static constexpr int kWords = sizeof(T) == 4 ? 4 : 2;
  uint4 w[U][kWords];
  // rows / ends: this lane's weight rows and where they stop (0 for rows past N).
  __device__ __forceinline__ void load(const T* const* rows, const int64_t* ends, int64_t k_lo,
                                       int slab0, int nslab, bool vec, int lane) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (slab0 + u >= nslab) break;
      const int64_t k = k_lo + int64_t(slab0 + u) * kLinearSlab;
      if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          w[u][i] = load16(rows[0], k + 16 * (lane >> 4) + 4 * i, ends[0], vec);
      } else {
        w[u][0] = load16(rows[0], k + 8 * (lane & 3), ends[0], vec);
        w[u][1] = load16(rows[1], k + 8 * (lane & 3), ends[1], vec);
      }
    }
  }
};

// c += A B for one m16n8k16 tile: A = four packed registers, B = two (fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Slabs s0 .. s0 + U (those < cs) of the staged chunk `act` ([tokens][stride] bytes)
// into the accumulators: 16-bit T, acc[j] = C fragment of column tile j (rows g, g + 8; tokens
// 8j + 2t, 8j + 2t + 1); tokens >= mcols read as zeros. Arithmetic per token column is the same
// for every mcols.
template <typename T, int NT, int U>
__device__ __forceinline__ void mma_batch(float (&acc)[NT][4], const WeightBatch<T, U>& wb,
                                          const unsigned char* act, int stride, int s0, int cs,
                                          int mcols, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = s0 + u;
    if (s >= cs) break;
    const uint4 a = wb.w[u][0], b = wb.w[u][1];  // rows g, g + 8
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      if (j * 8 >= mcols) break;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);
      if (j * 8 + g < mcols)
        x = *reinterpret_cast<const uint4*>(act + (j * 8 + g) * stride + s * 64 + t * 16);
      mma16816<T>(acc[j], a.x, b.x, a.y, b.y, x.x, x.y);  // k + 8t + {0, 1 | 2, 3}
      mma16816<T>(acc[j], a.z, b.z, a.w, b.w, x.z, x.w);  // k + 8t + {4, 5 | 6, 7}
    }
  }
}

// fp32: acc[m] += sum over the lane's 16 k of the slab, in k order, for tokens m < mcols.
template <int NT, int U>
__device__ __forceinline__ void fma_batch(float (&acc)[8 * NT], const WeightBatch<float, U>& wb,
                                          const unsigned char* act, int stride, int s0, int cs,
                                          int mcols, int lane) {
  const int h = lane >> 4;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = s0 + u;
    if (s >= cs) break;
#pragma unroll
    for (int m = 0; m < 8 * NT; ++m) {
      if (m >= mcols) break;
      const float4* xv = reinterpret_cast<const float4*>(act + m * stride + s * 128 + h * 64);
      float a = acc[m];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float4 q = xv[i];
        const uint4 w = wb.w[u][i];
        a = __fmaf_rn(__uint_as_float(w.x), q.x, a);
        a = __fmaf_rn(__uint_as_float(w.y), q.y, a);
        a = __fmaf_rn(__uint_as_float(w.z), q.z, a);
        a = __fmaf_rn(__uint_as_float(w.w), q.w, a);
      }
      acc[m] = a;
    }
  }
}

}  // namespace cuda
}  // namespace dspark
