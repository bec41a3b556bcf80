// csrc/cpu/attention_cpu.cpp: CPU kernel of dspark::decode_attention (same roundings as
// include/dspark/attention.cuh and dspark/reference.py; fp32 scores, softmax and sums).
// Every row is computed on its own, over its virtual slots in order (the cache below the
// block's first slot, then its ancestors by depth): its bits do not depend on the number of
// rows, on the other rows or on the cache size, so a verified row equals the decode of the same
// token (the CUDA kernels keep the same property with their own, chunked, order).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "dspark/common.h"
#include "element_type.h"  // round_t<scalar_t>

namespace dspark {
namespace {

// x [D] in place: optional RMSNorm with weight w, then rotary at position pos.
template <typename T>
void norm_rope(float* x, const T* w, float eps, const float* inv_freq, float pos, int64_t D) {
  if (w) {
    float ss = 0.0f;
    for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d)
      x[d] = round_t<T>(static_cast<float>(w[d]) * round_t<T>(x[d] * inv));
  }
  const int64_t half = D / 2;
  std::vector<float> out(D);
  for (int64_t d = 0; d < D; ++d) {
    const float f = pos * inv_freq[d % half];
    const float c = round_t<T>(std::cos(f)), s = round_t<T>(std::sin(f));
    const float rot = d < half ? -x[d + half] : x[d - half];
    out[d] = round_t<T>(round_t<T>(x[d] * c) + round_t<T>(rot * s));
  }
  std::copy(out.begin(), out.end(), x);
}

at::Tensor decode_attention_cpu(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                                int64_t layer, const at::Tensor& positions,
                                const at::Tensor& inv_freq,
                                const std::optional<at::Tensor>& q_norm_weight,
                                const std::optional<at::Tensor>& k_norm_weight, double eps,
                                int64_t num_heads, int64_t window,
                                const std::optional<at::Tensor>& parents) {
  const auto d =
      check_decode_attention_args(qkv, k_cache, v_cache, layer, positions, inv_freq, q_norm_weight,
                                  k_norm_weight, eps, num_heads, window, parents);
  const int64_t B = d.B, T = d.T, G = d.H / d.Hkv, D = d.D, W = (d.H + 2 * d.Hkv) * D;
  const int64_t* start = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    if (start[b] < 0 || start[b] + T > d.S) raise_on_status(kBadPosition, "decode_attention");
  // Depth and ancestors (anc[b][j][depth]) of every row; a chain when parents is None.
  std::vector<int64_t> depth(B * T), anc(B * T * T);
  const int64_t* par = parents ? parents->data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < T; ++j) {
      const int64_t q = par ? par[b * T + j] : j - 1;
      if (q < -1 || q >= j) raise_on_status(kBadParent, "decode_attention");
      depth[b * T + j] = q < 0 ? 0 : depth[b * T + q] + 1;
      for (int64_t a = 0; q >= 0 && a < depth[b * T + j]; ++a)
        anc[(b * T + j) * T + a] = anc[(b * T + q) * T + a];
      anc[(b * T + j) * T + depth[b * T + j]] = j;
    }
  }
  at::Tensor out = d.three_d ? at::empty({B, T, d.H * D}, qkv.options())
                             : at::empty({B, d.H * D}, qkv.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, qkv.scalar_type(), "decode_attention_cpu", [&] {
        const scalar_t* src_all = qkv.data_ptr<scalar_t>();
        scalar_t* kc = k_cache.data_ptr<scalar_t>();
        scalar_t* vc = v_cache.data_ptr<scalar_t>();
        const scalar_t* qn = q_norm_weight ? q_norm_weight->data_ptr<scalar_t>() : nullptr;
        const scalar_t* kn = k_norm_weight ? k_norm_weight->data_ptr<scalar_t>() : nullptr;
        const float* freq = inv_freq.data_ptr<float>();
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, B * d.Hkv, 1, [&](int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item) {
            const int64_t b = item / d.Hkv, kvh = item % d.Hkv, st = start[b];
            const int64_t head = ((layer * B + b) * d.Hkv + kvh) * d.S;  // slot 0 of this head
            std::vector<float> k(D), q(D), scores;
            for (int64_t j = 0; j < T; ++j) {  // the block's rows into their slots st + j
              const scalar_t* src = src_all + (b * T + j) * W;
              for (int64_t e = 0; e < D; ++e) k[e] = static_cast<float>(src[(d.H + kvh) * D + e]);
              norm_rope<scalar_t>(k.data(), kn, static_cast<float>(eps), freq,
                                  static_cast<float>(st + depth[b * T + j]), D);
              for (int64_t e = 0; e < D; ++e) {
                kc[(head + st + j) * D + e] = static_cast<scalar_t>(k[e]);
                vc[(head + st + j) * D + e] = src[(d.H + d.Hkv + kvh) * D + e];
              }
            }
            for (int64_t j = 0; j < T; ++j) {
              const int64_t* path = anc.data() + (b * T + j) * T;
              const int64_t p = st + depth[b * T + j];
              const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
              // virtual slot v -> cache slot: the cache below st, then the ancestor at depth v - st
              auto slot = [&](int64_t v) { return v < st ? v : st + path[v - st]; };
              const scalar_t* src = src_all + (b * T + j) * W;
              for (int64_t g = 0; g < G; ++g) {
                const int64_t h = kvh * G + g;
                for (int64_t e = 0; e < D; ++e) q[e] = static_cast<float>(src[h * D + e]);
                norm_rope<scalar_t>(q.data(), qn, static_cast<float>(eps), freq,
                                    static_cast<float>(p), D);
                scores.assign(p - lo + 1, 0.0f);
                float mx = -INFINITY;
                for (int64_t v = lo; v <= p; ++v) {
                  float s = 0.0f;
                  for (int64_t e = 0; e < D; ++e)
                    s += q[e] * static_cast<float>(kc[(head + slot(v)) * D + e]);
                  scores[v - lo] = s * scale;
                  mx = std::max(mx, scores[v - lo]);
                }
                float total = 0.0f;
                for (float& s : scores) total += (s = std::exp(s - mx));
                for (int64_t e = 0; e < D; ++e) {
                  float acc = 0.0f;
                  for (int64_t v = lo; v <= p; ++v)
                    acc += scores[v - lo] * static_cast<float>(vc[(head + slot(v)) * D + e]);
                  o[((b * T + j) * d.H + h) * D + e] = static_cast<scalar_t>(acc / total);
                }
              }
            }
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace dspark
