// csrc/cuda/dispatch.cuh (.cu only): calls f(T{}) with the CUDA element type an ElementType names.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/launch.h"

namespace dspark {

template <typename F>
cudaError_t with_element_type(ElementType t, F&& f) {
  switch (t) {
    case ElementType::kBFloat16: return f(__nv_bfloat16{});
    case ElementType::kFloat16: return f(__half{});
    default: return f(float{});
  }
}

}  // namespace dspark
