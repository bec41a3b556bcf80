// csrc/cuda/linear_cuda.cpp: CUDA entry point of dspark::fused_linear (tensors -> raw pointers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/tensor_args.h"

namespace dspark {
namespace {

at::Tensor fused_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& norm_weight, double eps,
                             bool silu_gate) {
  const auto d = check_fused_linear_args(x, weight, bias, residual, norm_weight, eps, silu_gate);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({d.M, d.N}, x.options());
  if (d.M == 0 || d.N == 0) return out;
  LinearArgs a{};
  a.dtype = element_type(x);
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.bias = ptr_or_null(bias);
  a.residual = ptr_or_null(residual);
  a.norm_weight = ptr_or_null(norm_weight);
  a.out = out.data_ptr();
  a.M = d.M;
  a.N = d.N;
  a.K = d.K;
  a.eps = static_cast<float>(eps);
  a.prologue = d.prologue;
  const cudaError_t err = launch_linear(a, c10::cuda::getCurrentCUDAStream());
  DSPARK_CHECK(err == cudaSuccess,
               "dspark::fused_linear kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("fused_linear", &fused_linear_cuda); }

}  // namespace dspark
