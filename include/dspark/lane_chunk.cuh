// dspark/lane_chunk.cuh: the statistics pass of the fused verify kernel (verify_fused.cuh), one
// warp per "warp chunk": kWarpChunk consecutive vocabulary entries, kLaneEntries per lane, held
// in registers as loaded (two 16-bit logits per word).
//   greedy rows   max and its first index (packed bf16/fp16 max: half an op per entry)
//   sampled rows  base = floor(max t) and sum of e relative to it, in float64
// The sum is the hot loop (every logit of every row), so its e(v) are computed without a
// conversion-pipe instruction per entry but with the same bits as prob.h's scaled_exp (see
// exp_rel), and only the order of the float64 additions differs from the CPU's (the rounding
// class verify already accepts between backends, prob.h NOTE(exactness)).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dspark/numeric.h"
#include "dspark/row.h"
#include "dspark/row_stats.cuh"  // warp_max, warp_sum, warp_min

namespace dspark {
namespace cuda {

constexpr int kWarpChunk = 1024;               // entries per warp chunk (a contiguous range)
constexpr int kLaneEntries = kWarpChunk / 32;  // 32 per lane: 64 B of bf16 in flight per lane

// Lane entry e of the warp chunk starting at `start` is vocabulary index chunk_entry<S>(vec,
// start, e) (row_stats.cuh): index order within a lane.

// One lane's kLaneEntries logits as loaded; entries past V read as -inf.
template <typename S>
struct LaneChunk {
  static constexpr int kWords = kLaneEntries * int(sizeof(S)) / 4;
  uint32_t w[kWords];

  __device__ __forceinline__ float at(int e) const {
    if constexpr (sizeof(S) == 4) {
      return __uint_as_float(w[e]);
    } else if constexpr (std::is_same_v<S, __nv_bfloat16>) {  // bf16: the high half of a float
      return __uint_as_float(e % 2 ? w[e / 2] & 0xffff0000u : w[e / 2] << 16);
    } else {
      return __half2float(__ushort_as_half(static_cast<uint16_t>(w[e / 2] >> (16 * (e % 2)))));
    }
  }
};

template <typename S>
__device__ __forceinline__ uint32_t neg_inf_bits() {
  if constexpr (sizeof(S) == 4) return 0xff800000u;
  else if constexpr (std::is_same_v<S, __nv_bfloat16>) return 0xff80u;
  else return 0xfc00u;
}

template <typename S>
__device__ __forceinline__ void load_lane_chunk(const S* w, int64_t V, bool vec, int64_t start,
                                                LaneChunk<S>& c) {
  constexpr int kVec = 16 / sizeof(S);
  if (vec) {  // V is a multiple of kVec: a 16-byte group is wholly inside the row or past it
#pragma unroll
    for (int l = 0; l < kLaneEntries / kVec; ++l) {
      const int64_t v0 = chunk_entry<S>(true, start, l * kVec);
      uint4 raw;
      if (v0 < V) {
        raw = __ldg(reinterpret_cast<const uint4*>(w + v0));
      } else {
        const uint32_t ninf = neg_inf_bits<S>() * (sizeof(S) == 4 ? 1u : 0x10001u);
        raw = make_uint4(ninf, ninf, ninf, ninf);
      }
      c.w[l * 4 + 0] = raw.x;
      c.w[l * 4 + 1] = raw.y;
      c.w[l * 4 + 2] = raw.z;
      c.w[l * 4 + 3] = raw.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < kLaneEntries; ++e) {
      const int64_t v = chunk_entry<S>(false, start, e);
      uint32_t bits = neg_inf_bits<S>();
      if (v < V) {
        if constexpr (sizeof(S) == 4) bits = __float_as_uint(__ldg(w + v));
        else bits = __ldg(reinterpret_cast<const unsigned short*>(w) + v);
      }
      if constexpr (sizeof(S) == 4) c.w[e] = bits;
      else c.w[e / 2] = e % 2 ? (c.w[e / 2] | (bits << 16)) : bits;
    }
  }
}

// Asks L2 for the lines load_lane_chunk(w, V, true, start, .) will read (vector layout only):
// the next item's logits stream in while the current item is computed, in no registers.
template <typename S>
__device__ __forceinline__ void prefetch_lane_chunk(const S* w, int64_t V, int64_t start) {
  constexpr int kVec = 16 / sizeof(S);
#pragma unroll
  for (int l = 0; l < kLaneEntries / kVec; ++l) {
    const int64_t v0 = chunk_entry<S>(true, start, l * kVec);
    if (v0 < V) asm volatile("prefetch.global.L2 [%0];" ::"l"(w + v0));
  }
}

__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// The lane's largest logit (NaN if any is NaN) and smallest non-NaN logit. 16-bit logits are
// compared two at a time in their own format (exact: conversion to fp32 is monotone).
template <typename S>
__device__ __forceinline__ void lane_range(const LaneChunk<S>& c, float& mx, float& mn) {
  if constexpr (sizeof(S) == 4) {
    mx = mn = c.at(0);
#pragma unroll
    for (int e = 1; e < kLaneEntries; ++e) {
      mx = max_nan(mx, c.at(e));
      mn = fminf(mn, c.at(e));
    }
  } else {
    using Pair = std::conditional_t<std::is_same_v<S, __nv_bfloat16>, __nv_bfloat162, __half2>;
    Pair hi = bit_cast<Pair>(c.w[0]), lo = hi;
#pragma unroll
    for (int i = 1; i < LaneChunk<S>::kWords; ++i) {
      hi = __hmax2_nan(hi, bit_cast<Pair>(c.w[i]));
      lo = __hmin2(lo, bit_cast<Pair>(c.w[i]));
    }
    mx = max_nan(to_f(hi.x), to_f(hi.y));
    mn = fminf(to_f(lo.x), to_f(lo.y));
  }
}

// The q values of the lane's group g (the entries g * kVec .. g * kVec + kVec - 1 of
// chunk_entry): 16-byte loads when the logits are vector-loaded and q rows are 16-byte aligned;
// 0 past the row.
template <typename S, typename Q>
__device__ __forceinline__ void load_q_group(const Q* qrow, int64_t V, bool vec, bool qvec,
                                             int64_t start, int g, Q (&out)[16 / sizeof(S)]) {
  constexpr int kVec = 16 / sizeof(S);
  if (vec) {
    const int64_t v0 = chunk_entry<S>(true, start, g * kVec);
    if (v0 >= V) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = Q(0);
    } else if (qvec) {
      uint4 raw[kVec * sizeof(Q) / 16];
#pragma unroll
      for (int i = 0; i < int(kVec * sizeof(Q) / 16); ++i)
        raw[i] = __ldg(reinterpret_cast<const uint4*>(qrow + v0) + i);
      __builtin_memcpy(out, raw, sizeof(out));
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = __ldg(qrow + v0 + i);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int64_t v = chunk_entry<S>(false, start, g * kVec + i);
      out[i] = v < V ? __ldg(qrow + v) : Q(0);
    }
  }
}

// ---- e(v) without a conversion per entry ------------------------------------------------------
// For an integer base b with |b| <= 2^21 and t < b + 1, exp_rel(t) is the fp32
//   e = P(f) * 2^(n - b),  n = floor(t), f = t - n, P = exp2_frac
// exact for n >= b - 126 (a power-of-two scaling of the fp32 P(f)): scaled_exp(t, b) to the bit.
// Below, t is raised to b - 127, where f = 0, P = 1 and the exponent field becomes 0: e = +0
// (also for t = -inf and NaN); entries in [b - 127, b - 126) keep a subnormal below their e.
// So e is exact or smaller, and zero only where the exact e is below 2^-126 of the base's entry:
// a total over a row moves by less than 2^-100 of itself, and no entry outside the support
// gains mass (the draws pick entries with exact masses; see verify_fused.cuh).
// How: t + M rounded down, for M = 1.5 * 2^23 + k, is M + floor(t) exactly (the sum lies in
// [2^23, 2^24) where floats are the integers), so floor(t) and f come from two adds and no
// floor instruction; with k = -b mod 512 the sum's bits shifted up by 23 are (n - b) << 23 mod
// 2^32, the exponent offset to add to P(f)'s bits (whose exponent field is 127).
struct ExpBase {
  float lo;     // b - 127
  float magic;  // 1.5 * 2^23 + (-b mod 512)
};

__device__ __forceinline__ bool exp_base_ok(float b) { return fabsf(b) <= 2097152.0f; }

__device__ __forceinline__ ExpBase exp_base(float b) {
  return {b - 127.0f, 12582912.0f + static_cast<float>((-static_cast<int>(b)) & 511)};
}

__device__ __forceinline__ float exp_rel(float t, ExpBase eb) {
  t = fmaxf(t, eb.lo);
  const float r = __fadd_rd(t, eb.magic);                  // M + floor(t)
  const float f = __fadd_rn(t, -__fadd_rn(r, -eb.magic));  // t - floor(t)
  const float g = fminf(exp2_poly(f), 1.99999988f);        // exp2_frac(f): exp2_poly(f) >= 1
  return __uint_as_float((__float_as_uint(r) << 23) + __float_as_uint(g));
}

// Sum of e over the lane's entries relative to base b (exp_base_ok(b), b >= floor of every t).
// kUnitT: T == 1, where w * (1/T) == w exactly and the first product is skipped.
template <typename S, bool kUnitT>
__device__ __forceinline__ double lane_exp_sum(const LaneChunk<S>& c, float inv_t, float b) {
  const ExpBase eb = exp_base(b);
  double s[4] = {0.0, 0.0, 0.0, 0.0};  // four chains: the adds overlap, the order stays fixed
#pragma unroll
  for (int e = 0; e < kLaneEntries; ++e) {
    const float t = kUnitT ? mul_rn(c.at(e), kLog2e) : log2_scaled(c.at(e), inv_t);
    s[e % 4] += static_cast<double>(exp_rel(t, eb));
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// ---- one warp chunk of an unfiltered row ------------------------------------------------------
// Greedy: the chunk's max and the first index holding it (-1 if every entry is -inf). NaN and
// +inf logits raise kBadLogits in `bad`.
template <typename S>
__device__ void greedy_chunk(const LaneChunk<S>& c, bool vec, int64_t start, float& top,
                             int32_t& idx, int32_t& bad) {
  float mx, mn;
  lane_range(c, mx, mn);
  if (bad_logit(mx)) bad |= kBadLogits;
  top = warp_max(mx);
  int32_t mine = INT32_MAX;
  if (mx == top && top > -INFINITY) {
#pragma unroll
    for (int e = 0; e < kLaneEntries; ++e) {
      if (mine == INT32_MAX && c.at(e) == top)
        mine = static_cast<int32_t>(chunk_entry<S>(vec, start, e));
    }
  }
  idx = warp_min(mine);
  if (idx == INT32_MAX) idx = -1;
}

// Sampled: the chunk's base floor(max t) (-inf if it has no finite entry) and its sum of e
// relative to that base. Each lane sums relative to its own base, then the warp rescales by
// exact powers of two (a lane more than 1000 binades below the chunk's base adds 0, as
// scaled_exp does per entry). Bad logits (NaN, +inf, w / T overflowing) raise kBadLogits: the
// lane's extremes decide, except in a lane holding -inf, which checks entry by entry.
template <typename S>
__device__ void sampled_chunk(const LaneChunk<S>& c, float inv_t, float& base, double& sum,
                              int32_t& bad) {
  float mx, mn;
  lane_range(c, mx, mn);
  const float tmax = log2_scaled(mx, inv_t);
  if (bad_logit(mx) || bad_scaled_logit(mx, tmax)) bad |= kBadLogits;
  if (mn > -INFINITY) {
    if (bad_scaled_logit(mn, log2_scaled(mn, inv_t))) bad |= kBadLogits;
  } else {
#pragma unroll
    for (int e = 0; e < kLaneEntries; ++e)
      if (bad_scaled_logit(c.at(e), log2_scaled(c.at(e), inv_t))) bad |= kBadLogits;
  }
  float b = -INFINITY;
  double s = 0.0;
  if (tmax > -INFINITY && tmax < INFINITY) {  // not NaN either
    b = floorf(tmax);
    if (!exp_base_ok(b)) {  // |t| beyond 2^21 (tiny T): the per-entry formula
#pragma unroll
      for (int e = 0; e < kLaneEntries; ++e) s += scaled_exp(log2_scaled(c.at(e), inv_t), b);
    } else if (inv_t == 1.0f) {
      s = lane_exp_sum<S, true>(c, inv_t, b);
    } else {
      s = lane_exp_sum<S, false>(c, inv_t, b);
    }
  }
  base = warp_max(b);
  const float drop = base - b;
  sum = warp_sum(b > -INFINITY && drop <= 1000.0f ? s * pow2_neg(static_cast<int>(drop)) : 0.0);
}

}  // namespace cuda
}  // namespace dspark
