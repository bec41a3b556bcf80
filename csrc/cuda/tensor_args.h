// csrc/cuda/tensor_args.h: tensor -> launch-argument helpers shared by the CUDA entry points.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <type_traits>

#include "cuda/launch.h"
#include "element_type.h"  // element_type(tensor)

namespace dspark {

template <typename T = void>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  if constexpr (std::is_void_v<T>) return t.has_value() ? t->data_ptr() : nullptr;
  else return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace dspark
