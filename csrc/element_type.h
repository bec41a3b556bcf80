// csrc/element_type.h: ATen's element types -> dspark::ElementType (include/dspark/numeric.h).
// Type level for the CPU kernels (so that round_t<scalar_t> rounds like the stored dtype), value
// level for the CUDA entry points (the dtype tag of their launch arguments).
#pragma once
#include <ATen/core/Tensor.h>

#include "dspark/numeric.h"

namespace dspark {

template <>
struct ElementTypeOf<c10::BFloat16> {
  static constexpr ElementType value = ElementType::kBFloat16;
};
template <>
struct ElementTypeOf<c10::Half> {
  static constexpr ElementType value = ElementType::kFloat16;
};
// ATen's dispatch macros instantiate the CPU kernels for double too, although the ops accept only
// float32 / bfloat16 / float16; rounding a float through double is exact, as through float.
template <>
struct ElementTypeOf<double> {
  static constexpr ElementType value = ElementType::kFloat32;
};

// Element type of a float32 / bfloat16 / float16 tensor (the entry points check the dtype first).
inline ElementType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return ElementType::kBFloat16;
    case at::kHalf: return ElementType::kFloat16;
    default: return ElementType::kFloat32;
  }
}

}  // namespace dspark
