// csrc/cuda/tensor_args.h: tensor -> launch-argument helpers shared by the CUDA entry points.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <optional>
#include <type_traits>

#include "checks.h"  // DSPARK_CHECK_VALUE
#include "cuda/launch.h"
#include "element_type.h"  // element_type(tensor)

namespace dspark {

template <typename T = void>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  if constexpr (std::is_void_v<T>) return t.has_value() ? t->data_ptr() : nullptr;
  else return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// An A/B switch (read per call): environment variable `name` as an integer >= 1, at most 64
// (the most rows a decode_attention call and query vectors a pass can use); 0 when unset or
// empty.
inline int ab_switch(const char* name) {
  const char* env = std::getenv(name);
  if (!env || !*env) return 0;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  DSPARK_CHECK_VALUE(*end == '\0' && v >= 1, name, " must be an integer >= 1, got '", env, "'");
  return int(v < 64 ? v : 64);
}

}  // namespace dspark
