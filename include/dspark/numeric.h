// dspark/numeric.h: the element types kernels store (fp32, bf16, fp16) and their conversions to
// and from fp32, one set for every kernel, CUDA (include/dspark/*.cuh) and CPU (csrc/cpu/*.cpp):
//   to_f(x)        stored value -> fp32 (exact)                                    CUDA types
//   from_f<T>(v)   fp32 -> T, round to nearest even                                CUDA types
//   round_t<T>(v)  fp32 -> T -> fp32: what storing an intermediate tensor of T does  any T
// A CPU storage type (ATen's) joins by an ElementTypeOf specialization (csrc/element_type.h).
// No torch headers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "dspark/common.h"

namespace dspark {

// The element types the kernels read and write; also the dtype tag of the CUDA launch arguments.
enum class ElementType : int { kFloat32, kBFloat16, kFloat16 };

// ElementTypeOf<T>::value: the element type a storage type T holds.
template <typename T>
struct ElementTypeOf;
template <>
struct ElementTypeOf<float> {
  static constexpr ElementType value = ElementType::kFloat32;
};

// The bits of x read as a To of the same size (std::bit_cast, which C++17 device code lacks).
// Compilers turn the copy into a register move, on the device too.
template <typename To, typename From>
DSPARK_HD To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To y;
  __builtin_memcpy(&y, &x, sizeof(To));
  return y;
}

// ---- Host conversions, bit for bit those of torch's CPU types (c10::BFloat16, c10::Half) -----
// Round to nearest even; overflow goes to inf; fp16 keeps subnormals. A NaN becomes the quiet
// NaN torch's portable conversion returns: bf16 0x7fc0 (sign dropped), fp16 sign | 0x7e00.
// tests/test_numeric.py checks them against torch's, float by float.

DSPARK_HD uint16_t bf16_bits_rn(float f) {
  const uint32_t x = bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  // Drop the low 16 bits: adding 0x7fff rounds up past the halfway point, plus the lowest kept
  // bit rounds an exact tie to even. A carry runs into the exponent (up to inf), as it should.
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
DSPARK_HD float bf16_bits_to_float(uint16_t h) {
  return bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

DSPARK_HD uint16_t half_bits_rn(float f) {
  const uint32_t x = bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;  // |f|
  if (a > 0x7f800000u) return sign | 0x7e00u;
  // 65520 = 0x477ff000 is halfway between the largest half (65504) and 2^16: ties to even, inf.
  if (a >= 0x477ff000u) return sign | 0x7c00u;
  if (a >= 0x38800000u) {  // |f| >= 2^-14: a normal half
    // Rebias the exponent (127 -> 15), then drop 13 mantissa bits rounding to nearest even as in
    // bf16_bits_rn; a carry out of the mantissa bumps the exponent (at most to 65504's).
    const uint32_t r = a - 0x38000000u;
    return sign | static_cast<uint16_t>((r + 0x0fffu + ((r >> 13) & 1u)) >> 13);
  }
  // |f| < 2^-14: a whole number of 2^-24 (subnormal half, or zero). With m the mantissa and its
  // implicit bit and e the biased exponent, |f| / 2^-24 = m / 2^(126 - e); below 2^-25 (e < 102)
  // that is under one half and rounds to zero (2^-25 itself ties to the even zero).
  const uint32_t e = a >> 23;
  if (e < 102) return sign;
  const uint32_t m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;  // shift in [14, 24]
  const uint32_t q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  const uint32_t up = rest > half || (rest == half && (q & 1u)) ? 1u : 0u;
  return sign | static_cast<uint16_t>(q + up);  // q + up == 0x400 is the smallest normal: right
}
DSPARK_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return bit_cast<float>(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
  if (e != 0) return bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
  if (m == 0) return bit_cast<float>(sign);
  uint32_t norm = m, e32 = 113;  // subnormal m * 2^-24: shift the leading one up to bit 10
  while (!(norm & 0x400u)) {
    norm <<= 1;
    --e32;
  }
  return bit_cast<float>(sign | (e32 << 23) | ((norm & 0x3ffu) << 13));
}

#if defined(__CUDACC__)
template <>
struct ElementTypeOf<__nv_bfloat16> {
  static constexpr ElementType value = ElementType::kBFloat16;
};
template <>
struct ElementTypeOf<__half> {
  static constexpr ElementType value = ElementType::kFloat16;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
#endif

// Round through T (what storing an intermediate tensor of dtype T does). One definition for both
// backends: device code rounds with the CUDA intrinsics (T is a CUDA type there), host code with
// the bit conversions above, chosen by T's element type (ATen's types on the CPU). The two agree
// on every value but NaN, whose bits follow each platform's own conversion, as they always did.
template <typename T>
DSPARK_HD float round_t(float v) {
#if defined(__CUDA_ARCH__)
  return to_f(from_f<T>(v));
#else
  constexpr ElementType kType = ElementTypeOf<T>::value;
  if constexpr (kType == ElementType::kBFloat16) return bf16_bits_to_float(bf16_bits_rn(v));
  else if constexpr (kType == ElementType::kFloat16) return half_bits_to_float(half_bits_rn(v));
  else return v;
#endif
}

}  // namespace dspark
