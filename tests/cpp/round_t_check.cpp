// tests/cpp/round_t_check.cpp: dspark's host conversions (include/dspark/numeric.h) against
// torch's CPU types, bit for bit. Built and run by tests/test_numeric.py.
//   round_t_check STRIDE   every STRIDE-th fp32 bit pattern (1: all 2^32), plus every pattern
//                          near the fp16/bf16 rounding boundaries, through round_t<c10::BFloat16>
//                          and round_t<c10::Half> against static_cast<float>(c10::X(v)) (what the
//                          CPU kernels computed before round_t was shared); and every fp16/bf16
//                          bit pattern through the bits -> float conversions.
// Prints the number of patterns compared and the first mismatches; exits 1 on any mismatch.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "element_type.h"

namespace {

uint32_t bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
float from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

int64_t compared = 0, mismatches = 0;

void check(uint32_t pattern) {
  const float v = from_bits(pattern);
  const uint32_t want_bf = bits(static_cast<float>(c10::BFloat16(v)));
  const uint32_t got_bf = bits(dspark::round_t<c10::BFloat16>(v));
  const uint32_t want_h = bits(static_cast<float>(c10::Half(v)));
  const uint32_t got_h = bits(dspark::round_t<c10::Half>(v));
  ++compared;
  if ((want_bf != got_bf || want_h != got_h) && ++mismatches <= 10)
    std::printf("mismatch at 0x%08x: bf16 %08x want %08x, fp16 %08x want %08x\n", pattern, got_bf,
                want_bf, got_h, want_h);
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1;
  for (uint64_t p = 0; p <= 0xffffffffull; p += stride) check(static_cast<uint32_t>(p));
  // Near every rounding boundary: each fp32 exponent and sign, mantissas whose dropped bits are
  // just below, at and just above the halfway point (bf16 drops 16 bits, normal fp16 13), and
  // the low mantissas that decide fp16 subnormals.
  for (uint32_t sign = 0; sign < 2; ++sign)
    for (uint32_t e = 0; e < 256; ++e)
      for (uint32_t kept = 0; kept < 64; ++kept)
        for (int32_t d = -2; d <= 2; ++d) {
          const uint32_t base = sign << 31 | e << 23 | (kept * 0x1ffffu) % 0x800000u;
          for (uint32_t shift : {13u, 16u, 14u, 20u, 24u}) {
            const uint32_t mant = ((base >> shift) << shift | (1u << (shift - 1))) & 0x7fffffu;
            check((base & 0xff800000u) | ((mant + static_cast<uint32_t>(d)) & 0x7fffffu));
          }
        }
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const uint16_t u = static_cast<uint16_t>(h);
    ++compared;
    const bool ok_h = bits(dspark::half_bits_to_float(u)) ==
                      bits(static_cast<float>(c10::Half(u, c10::Half::from_bits())));
    const bool ok_bf = bits(dspark::bf16_bits_to_float(u)) ==
                       bits(static_cast<float>(c10::BFloat16(u, c10::BFloat16::from_bits())));
    if (!(ok_h && ok_bf) && ++mismatches <= 10)
      std::printf("mismatch at 16-bit pattern 0x%04x: fp16 %d bf16 %d\n", h, ok_h, ok_bf);
  }
  std::printf("compared %lld, mismatches %lld\n", static_cast<long long>(compared),
              static_cast<long long>(mismatches));
  return mismatches ? 1 : 0;
}
