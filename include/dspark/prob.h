// dspark/prob.h: the exact arithmetic every backend shares (CPU, CUDA, and dspark/reference.py).
//
// NOTE(exactness): CPU and CUDA must return identical tokens for identical inputs. Each
// per-vocabulary-entry quantity below is computed with IEEE-rounded fp32 multiplies and adds
// only (no FMA contraction, no hardware exp), so it is bit-identical everywhere:
//   s = w * (1/T)          t = s * log2(e)          n = floor(t),  f = t - n   (exact)
//   g = P(f) ~ 2^f in [1,2), a degree-6 polynomial evaluated by Horner
//   e = g * 2^(n - N)      (double, exact power-of-two scaling), N = floor(max_v t)
// p(v) = e(v) / S with S = sum_v e(v) in double. Only the order of that sum differs between
// backends (relative 1e-16), so a decision can differ only when a uniform lands within ~1e-15
// of a boundary. Top-p masses use 44-bit fixed point summed in int64: exact everywhere.
#pragma once
#include <cmath>
#include <cstdint>

#include "dspark/common.h"
#include "dspark/numeric.h"  // bit_cast

namespace dspark {

constexpr float kLog2e = 1.44269502f;
#if defined(__CUDA_ARCH__)
DSPARK_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
DSPARK_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
#else
DSPARK_HD float mul_rn(float a, float b) { return a * b; }  // built with -ffp-contract=off
DSPARK_HD float add_rn(float a, float b) { return a + b; }
#endif

// 2^f on [0, 1): least-squares fit on Chebyshev nodes with c0 pinned to 1 (max rel. error
// 8.2e-8), Horner in fp32. dspark/reference.py holds the same coefficients (EXP2_POLY).
// exp2_poly is the bare Horner sum: for f >= 0 every step adds a positive coefficient to a
// non-negative product, so the result is >= 1 (the last step is round(y + 1) with y >= 0).
DSPARK_HD float exp2_poly(float f) {
  float g = 0.000218775051f;
  g = add_rn(mul_rn(g, f), 0.00123878219f);
  g = add_rn(mul_rn(g, f), 0.00968458038f);
  g = add_rn(mul_rn(g, f), 0.0554804280f);
  g = add_rn(mul_rn(g, f), 0.240230501f);
  g = add_rn(mul_rn(g, f), 0.693146944f);
  return add_rn(mul_rn(g, f), 1.0f);
}
DSPARK_HD float exp2_frac(float f) {
  float g = exp2_poly(f);
  // Keep g in [1, 2) so masses are monotone in n and fit the fixed-point format.
  g = g < 1.0f ? 1.0f : g;
  return g >= 2.0f ? 1.99999988f : g;
}

// t = (w / T) * log2(e) with 1/T precomputed in fp32; -inf stays -inf (a masked entry).
DSPARK_HD float log2_scaled(float w, float inv_t) { return mul_rn(mul_rn(w, inv_t), kLog2e); }

// Exact 2^-k for integer k in [0, 1000], built from the exponent bits (no libm).
DSPARK_HD double pow2_neg(int k) { return bit_cast<double>(static_cast<int64_t>(1023 - k) << 52); }

// e = 2^(t - nbase) up to the polynomial, as an exact double; 0 for -inf and far-below entries.
DSPARK_HD double scaled_exp(float t, float nbase) {
  if (!(t > -INFINITY)) return 0.0;
  const float n = floorf(t);
  const float drop = nbase - n;  // >= 0 for every entry of the row
  if (drop > 1000.0f) return 0.0;
  const float g = exp2_frac(add_rn(t, -n));
  return static_cast<double>(g) * pow2_neg(static_cast<int>(drop));
}

// Top-p mass in 44-bit fixed point: floor(g * 2^23) * 2^(20 - drop), truncated. Exact in int64
// for V <= kMaxVocab entries.
DSPARK_HD int64_t fixed_mass(float t, float nbase) {
  if (!(t > -INFINITY)) return 0;
  const float n = floorf(t);
  const float drop = nbase - n;
  if (drop >= 44.0f) return 0;
  const int64_t m = static_cast<int64_t>(mul_rn(exp2_frac(add_rn(t, -n)), 8388608.0f));
  const int d = static_cast<int>(drop);
  return d <= 20 ? (m << (20 - d)) : (m >> (d - 20));
}

// Order-preserving map float -> uint32 (larger float, larger key). Used for top-k/top-p selection.
DSPARK_HD uint32_t ordered_key(float x) {
  const uint32_t b = bit_cast<uint32_t>(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
DSPARK_HD float key_to_float(uint32_t k) {
  return bit_cast<float>((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// ---- Counter-based randomness: uniform(seed, position, node, purpose) ---------------------
// A SplitMix64-style finalizer over the key; results depend only on the request's own seed and
// absolute position, never on its place in the batch. Uniforms lie in (0, 1), never 0 or 1.
enum Purpose : uint64_t { kAcceptCoin = 0, kSampleCoin = 1 };

DSPARK_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
DSPARK_HD double keyed_uniform(int64_t seed, int64_t position, int64_t node, uint64_t purpose) {
  uint64_t h = mix64(static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ull);
  h = mix64(h ^ (static_cast<uint64_t>(position) * 0xD1B54A32D192ED03ull));
  h = mix64(h ^ (static_cast<uint64_t>(node) * 2u + purpose + 0x8CB92BA72F3D8DD7ull));
  return (static_cast<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

}  // namespace dspark
