// csrc/cuda/tensor_args.h: tensor -> launch-argument helpers shared by the CUDA entry points.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <type_traits>

#include "cuda/launch.h"

namespace dspark {

// Element type of a float32 / bfloat16 / float16 tensor (the entry points check the dtype first).
inline LogitsType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return LogitsType::kBFloat16;
    case at::kHalf: return LogitsType::kFloat16;
    default: return LogitsType::kFloat32;
  }
}

template <typename T = void>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  if constexpr (std::is_void_v<T>) return t.has_value() ? t->data_ptr() : nullptr;
  else return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace dspark
