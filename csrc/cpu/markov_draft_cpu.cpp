// csrc/cpu/markov_draft_cpu.cpp: CPU kernel of dspark::markov_draft. Per step: the corrected
// logits z_k of every request (the bias MACs of dspark/markov_draft.h, j in order), their data
// checks, then dspark::sample itself on z_k (called through the dispatcher, so the draw and the
// distribution cannot drift from sample's), and the confidence logits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "checks.h"
#include "dspark/markov_draft.h"
#include "dspark/row.h"
#include "element_type.h"  // round_t of ATen's 16-bit types
#include "markov_checks.h"

namespace dspark {
namespace {

// z [R, V] of step k: z(v) = fp32(U[r, k, v]) + round_W(sum_j W1[prev[r], j] * W2[j, v]).
// Tasks are (row, block of kBlock columns): each reads its W2 columns once per row.
template <typename U, typename W>
void step_logits(const U* base, const W* w1, const W* w2, const int64_t* prev, int64_t R, int64_t G,
                 int64_t k, int64_t V, int64_t rank, float* z) {
  constexpr int64_t kBlock = 1024;
  const int64_t nb = ceil_div(V, kBlock);
  at::parallel_for(0, R * nb, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(kBlock);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t r = t / nb, v0 = (t % nb) * kBlock, n = std::min(kBlock, V - v0);
      std::fill(acc.begin(), acc.begin() + n, 0.0f);
      const W* e = w1 + prev[r] * rank;
      for (int64_t j = 0; j < rank; ++j) {
        const float a = static_cast<float>(e[j]);
        const W* row = w2 + j * V + v0;
        for (int64_t i = 0; i < n; ++i)
          acc[i] = markov_mac<W>(acc[i], a, static_cast<float>(row[i]));
      }
      const U* u = base + (r * G + k) * V + v0;
      float* out = z + r * V + v0;
      for (int64_t i = 0; i < n; ++i) out[i] = add_rn(static_cast<float>(u[i]), round_t<W>(acc[i]));
    }
  });
}

// The checks sample's row statistics make (dspark/row.h), raised under markov_draft's name.
int32_t row_status(const float* z, int64_t V, float temperature) {
  const bool greedy = is_greedy(temperature);
  const float inv_t = greedy ? 0.0f : inverse_temperature(temperature);
  int64_t finite = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (bad_logit(z[v]) || (!greedy && bad_scaled_logit(z[v], log2_scaled(z[v], inv_t))))
      return kBadLogits;
    finite += z[v] > -INFINITY;
  }
  return finite ? 0 : kEmptyRow;
}

// The confidence logit round_W(w . [h ; e] + b) in kConfLanes partials and the fixed tree.
template <typename W>
float conf_logit(const W* h, const W* e, const W* w, const W* b, int64_t d, int64_t rank) {
  float part[kConfLanes] = {};
  for (int64_t i = 0; i < d + rank; ++i) {
    const float x = static_cast<float>(i < d ? h[i] : e[i - d]);
    part[i % kConfLanes] = markov_mac<W>(part[i % kConfLanes], static_cast<float>(w[i]), x);
  }
  return round_t<W>(add_rn(conf_tree(part), static_cast<float>(b[0])));
}

using SampleSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&, bool);

std::tuple<at::Tensor, at::Tensor, at::Tensor> markov_draft_cpu(
    const at::Tensor& base_logits, const at::Tensor& anchors, const at::Tensor& w1,
    const at::Tensor& w2, const std::optional<at::Tensor>& hidden,
    const std::optional<at::Tensor>& conf_weight, const std::optional<at::Tensor>& conf_bias,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& seeds, const at::Tensor& positions, bool return_probs) {
  const MarkovDims d =
      check_markov_draft_args(base_logits, anchors, w1, w2, hidden, conf_weight, conf_bias,
                              temperature, top_k, top_p, seeds, positions);
  at::Tensor tokens = at::empty({d.R, d.G}, anchors.options());
  at::Tensor conf = at::zeros({d.conf ? d.R : 0, d.G}, base_logits.options().dtype(at::kFloat));
  at::Tensor probs =
      at::zeros({return_probs ? d.R : 0, d.G, d.V}, base_logits.options().dtype(at::kDouble));
  if (d.R == 0) return {tokens, conf, probs};
  // Data checks of the small tensors first: the anchors index W1.
  const int64_t* x0 = anchors.data_ptr<int64_t>();
  const float* temp = temperature.data_ptr<float>();
  int32_t st = 0;
  for (int64_t r = 0; r < d.R; ++r) {
    if (x0[r] < 0 || x0[r] >= d.V) st |= kBadToken;
    st |= param_status(temp[r], top_k.data_ptr<int64_t>()[r], top_p.data_ptr<float>()[r], true);
  }
  raise_on_markov_status(st);
  static const auto sample =
      c10::Dispatcher::singleton().findSchemaOrThrow("dspark::sample", "").typed<SampleSig>();
  at::Tensor z = at::empty({d.R, d.V}, base_logits.options().dtype(at::kFloat));
  at::Tensor prev = anchors;  // reassigned to each step's tokens, never written
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w1.scalar_type(), "markov_w", [&] {
    using W = scalar_t;
    const W* pw1 = w1.data_ptr<W>();
    for (int64_t k = 0; k < d.G; ++k) {
      const int64_t* pv = prev.data_ptr<int64_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kBFloat16, at::kHalf, base_logits.scalar_type(), "markov_u", [&] {
            step_logits(base_logits.data_ptr<scalar_t>(), pw1, w2.data_ptr<W>(), pv, d.R, d.G, k,
                        d.V, d.rank, z.data_ptr<float>());
          });
      std::atomic<int32_t> status{0};
      at::parallel_for(0, d.R, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r)
          status |= row_status(z.data_ptr<float>() + r * d.V, d.V, temp[r]);
      });
      raise_on_markov_status(status.load());
      if (d.conf) {
        float* out = conf.data_ptr<float>();
        const W* h = hidden->data_ptr<W>();
        for (int64_t r = 0; r < d.R; ++r)
          out[r * d.G + k] =
              conf_logit(h + (r * d.G + k) * d.d, pw1 + pv[r] * d.rank, conf_weight->data_ptr<W>(),
                         conf_bias->data_ptr<W>(), d.d, d.rank);
      }
      // The draw of step k is sample's, keyed by (seed, positions + k, node 0, sampling coin).
      auto [tok, q] = sample.call(z, temperature, top_k, top_p, seeds, positions + k, std::nullopt,
                                  return_probs);
      tokens.select(1, k).copy_(tok);
      if (return_probs) probs.select(1, k).copy_(q);
      prev = tok;
    }
  });
  return {tokens, conf, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("markov_draft", &markov_draft_cpu); }

}  // namespace dspark
