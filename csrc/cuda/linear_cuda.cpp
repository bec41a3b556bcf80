// csrc/cuda/linear_cuda.cpp: CUDA entry point of dspark::fused_linear (tensors -> raw pointers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/tensor_args.h"

namespace dspark {
namespace {

// Bytes of activations a block stages at once (include/dspark/linear.cuh: linear_stage): 0 / unset
// = the default, -1 = the rule before 2026-12-06 s14 (8 KB / column tiles per token), or a positive
// budget; read per call, for A/B measurements (bench/bench_linear.py). Same bits for any value.
int stage_budget() {
  const char* env = std::getenv("DSPARK_LINEAR_STAGE_BYTES");
  if (!env || !*env) return 0;
  char* end = nullptr;
  const long b = std::strtol(env, &end, 10);
  DSPARK_CHECK_VALUE(*end == '\0' && b >= -1 && b <= (1 << 20),
                     "DSPARK_LINEAR_STAGE_BYTES must be an integer in [-1, 1048576], got '", env,
                     "'");
  return int(b);
}

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
  a.stage_budget = stage_budget();
  const cudaError_t err = launch_linear(a, c10::cuda::getCurrentCUDAStream());
  DSPARK_CHECK(err == cudaSuccess,
               "dspark::fused_linear kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("fused_linear", &fused_linear_cuda); }

}  // namespace dspark
