// csrc/cpu/linear_cpu.cpp: CPU kernel of dspark::fused_linear (same roundings as
// include/dspark/linear.cuh and dspark/reference.py: intermediates rounded to the input dtype,
// fp32 accumulation; only the order of the fp32 additions differs from the GPU).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "element_type.h"  // round_t<scalar_t>

namespace dspark {
namespace {

// xhat [M, K] in fp32 (each value already rounded through T, as a stored intermediate would be).
template <typename T>
std::vector<float> prologue(const T* x, const T* g, int64_t M, int64_t K, int kind, float eps) {
  std::vector<float> xhat(M * K);
  for (int64_t m = 0; m < M; ++m) {
    float* out = xhat.data() + m * K;
    if (kind == 2) {  // silu(gate) * up, x row = [gate | up]
      const T* row = x + m * 2 * K;
      for (int64_t k = 0; k < K; ++k) {
        const float a = static_cast<float>(row[k]);
        out[k] = round_t<T>(round_t<T>(a / (1.0f + std::exp(-a))) * static_cast<float>(row[K + k]));
      }
      continue;
    }
    const T* row = x + m * K;
    float inv = 1.0f;
    if (kind == 1) {
      float ss = 0.0f;
      for (int64_t k = 0; k < K; ++k) ss += static_cast<float>(row[k]) * static_cast<float>(row[k]);
      inv = 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
    }
    for (int64_t k = 0; k < K; ++k) {
      const float v = static_cast<float>(row[k]);
      out[k] = kind == 1 ? round_t<T>(static_cast<float>(g[k]) * round_t<T>(v * inv)) : v;
    }
  }
  return xhat;
}

at::Tensor fused_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& norm_weight, double eps,
                            bool silu_gate) {
  const auto d = check_fused_linear_args(x, weight, bias, residual, norm_weight, eps, silu_gate);
  at::Tensor out = at::empty({d.M, d.N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "fused_linear_cpu", [&] {
        const std::vector<float> xhat = prologue<scalar_t>(
            x.data_ptr<scalar_t>(), norm_weight ? norm_weight->data_ptr<scalar_t>() : nullptr, d.M,
            d.K, d.prologue, static_cast<float>(eps));
        const scalar_t* w = weight.data_ptr<scalar_t>();
        const scalar_t* b = bias ? bias->data_ptr<scalar_t>() : nullptr;
        const scalar_t* res = residual ? residual->data_ptr<scalar_t>() : nullptr;
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, d.N, 16, [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n) {
            const scalar_t* wn = w + n * d.K;
            for (int64_t m = 0; m < d.M; ++m) {
              const float* xm = xhat.data() + m * d.K;
              float acc = 0.0f;
              for (int64_t k = 0; k < d.K; ++k) acc += static_cast<float>(wn[k]) * xm[k];
              if (b) acc += static_cast<float>(b[n]);
              float y = round_t<scalar_t>(acc);
              if (res) y = static_cast<float>(res[m * d.N + n]) + y;
              o[m * d.N + n] = static_cast<scalar_t>(y);
            }
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("fused_linear", &fused_linear_cpu); }

}  // namespace dspark
