// csrc/cpu/verify_cpu.cpp: CPU kernels of dspark::verify and dspark::sample. Both live here
// because sample is verify of requests with no drafts: the same row statistics and the same draw
// (node 0, sampling coin), so the two ops cannot drift apart.
// Same definitions as the CUDA kernels (include/dspark/*.h) and dspark/reference.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "checks.h"
#include "dspark/row.h"
#include "dspark/verify_rules.h"

namespace dspark {
namespace {

// Statistics of one logits row: greedy argmax, or base, top-k/top-p threshold and total mass.
template <typename scalar_t>
int32_t row_stats(const scalar_t* w, int64_t V, float temperature, int64_t top_k, float top_p,
                  RowInfo& info) {
  info = RowInfo{-1, 1.0, 0.0f, 0.0f, -INFINITY, 0};
  int64_t finite = 0;
  for (int64_t v = 0; v < V; ++v) {
    const float x = static_cast<float>(w[v]);
    if (bad_logit(x)) return kBadLogits;
    finite += x > -INFINITY;
  }
  if (finite == 0) return kEmptyRow;
  if (is_greedy(temperature)) {
    info.greedy = 1;
    float best = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      const float x = static_cast<float>(w[v]);
      if (x > best) {  // strictly: the first of equal maxima
        best = x;
        info.argmax = v;
      }
    }
    return 0;
  }
  info.inv_t = inverse_temperature(temperature);
  std::vector<float> t(V);
  float tmax = -INFINITY;
  for (int64_t v = 0; v < V; ++v) {
    const float x = static_cast<float>(w[v]);
    t[v] = log2_scaled(x, info.inv_t);
    if (bad_scaled_logit(x, t[v])) return kBadLogits;
    tmax = std::max(tmax, t[v]);
  }
  info.nbase = std::floor(tmax);
  float keep = -INFINITY;
  if (top_k > 0 && top_k < finite) {  // k-th largest t, counting ties
    std::vector<float> sorted(t);
    std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(),
                     std::greater<float>());
    keep = sorted[top_k - 1];
  }
  if (top_p < 1.0f) {  // smallest set of largest-t entries (ties kept together) with mass >= p
    std::vector<std::pair<float, int64_t>> kept;  // (t, fixed-point mass)
    int64_t total = 0;
    for (int64_t v = 0; v < V; ++v) {
      if (!(t[v] >= keep)) continue;
      const int64_t m = fixed_mass(t[v], info.nbase);
      kept.emplace_back(t[v], m);
      total += m;
    }
    std::sort(kept.begin(), kept.end(), [](auto& a, auto& b) { return a.first > b.first; });
    const int64_t need = top_p_need(top_p, total);
    int64_t cum = 0;
    for (size_t i = 0; i < kept.size(); ++i) {
      cum += kept[i].second;
      const bool group_end = i + 1 == kept.size() || kept[i + 1].first != kept[i].first;
      if (group_end && cum >= need) {
        keep = std::max(keep, kept[i].first);
        break;
      }
    }
  }
  info.t_keep = keep;
  double s = 0.0;
  for (int64_t v = 0; v < V; ++v) s += t[v] >= keep ? scaled_exp(t[v], info.nbase) : 0.0;
  info.total = s;
  return 0;
}

// Draws from r(v) (unnormalized) by inverse CDF in index order; r == 0 falls back to p itself.
template <typename scalar_t, typename ResidualFn>
int64_t draw(const scalar_t* w, int64_t V, const RowInfo& info, double u, ResidualFn&& residual) {
  double z = 0.0;
  for (int64_t v = 0; v < V; ++v) z += residual(v, row_e(info, v, static_cast<float>(w[v])));
  const bool fallback = z == 0.0;  // residual mass vanished: the target row itself is exact
  if (fallback) z = info.total;
  const double target = u * z;
  double cum = 0.0;
  int64_t last = -1;
  for (int64_t v = 0; v < V; ++v) {
    double r = row_e(info, v, static_cast<float>(w[v]));
    if (!fallback) r = residual(v, r);
    if (r > 0.0) {
      last = v;
      cum += r;
      if (cum > target) return v;
    }
  }
  return last;  // rounding put target at or past the total: the last entry with mass
}

template <typename scalar_t, typename q_t>
void verify_kernel(const scalar_t* logits, int64_t V, const int64_t* offsets, int64_t R,
                   const int64_t* tokens, const int64_t* parents, const q_t* q,
                   const std::vector<RowInfo>& rows, const int64_t* seeds, const int64_t* positions,
                   const double* uniforms, int64_t W, int64_t* out_tokens, int64_t* out_count,
                   int64_t* out_nodes, std::atomic<int32_t>& status) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rejected;
    std::vector<double> zs;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = offsets[r], n = offsets[r + 1] - o;
      auto coin = [&](int64_t node, uint64_t purpose) {
        return node_coin(uniforms, seeds, positions, r, o, node, purpose);
      };
      auto qv = [&](int64_t node, int64_t v) -> double {
        if (!q) return 1.0;
        const double x = static_cast<double>(q[(o + node) * V + v]);
        if (const int32_t bad = draft_prob_status(x)) status |= bad;  // no atomic op when valid
        return x;
      };
      int64_t cur = 0, accepted = 0;
      out_nodes[r * W] = o;
      while (true) {
        const RowInfo& info = rows[o + cur];
        const scalar_t* w = logits + (o + cur) * V;
        rejected.clear();
        zs.clear();
        auto residual = [&](int64_t v, double e) {
          for (size_t i = 0; i < rejected.size(); ++i) {
            const int64_t j = rejected[i];
            e = residual_step(e, !q, v, tokens[o + j], q ? qv(j, v) : 1.0, zs[i]);
          }
          return e;
        };
        double z = info.total;
        int64_t next = -1;
        for (int64_t j = cur + 1; j < n && next < 0; ++j) {
          if (parents[o + j] != cur) continue;
          const int64_t x = tokens[o + j];
          const double rx = residual(x, row_e(info, x, static_cast<float>(w[x])));
          if (accepts(coin(j, kAcceptCoin), qv(j, x), z, rx)) {
            next = j;
            break;
          }
          rejected.push_back(j);
          zs.push_back(z);
          if (!q) {
            z = onehot_rejected_total(z, rx);
          } else {
            double s = 0.0;
            for (int64_t v = 0; v < V; ++v)
              s += residual(v, row_e(info, v, static_cast<float>(w[v])));
            z = s;
          }
        }
        if (next < 0) {
          out_tokens[r * W + accepted] = draw(w, V, info, coin(cur, kSampleCoin), residual);
          break;
        }
        out_tokens[r * W + accepted] = tokens[o + next];
        ++accepted;
        out_nodes[r * W + accepted] = o + next;
        cur = next;
      }
      out_count[r] = accepted;
    }
  });
}

template <typename scalar_t>
std::vector<RowInfo> all_row_stats(const at::Tensor& logits, const int64_t* row_request,
                                   const float* temp, const int64_t* top_k, const float* top_p,
                                   std::atomic<int32_t>& status) {
  const int64_t N = logits.size(0), V = logits.size(1);
  std::vector<RowInfo> rows(N);
  const scalar_t* base = logits.data_ptr<scalar_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = row_request[i];
      status |= row_stats(base + i * V, V, temp[r], top_k[r], top_p[r], rows[i]);
    }
  });
  return rows;
}

int32_t check_params_and_uniforms(int64_t R, const float* temp, const int64_t* top_k,
                                  const float* top_p, const double* u, int64_t n_u, bool random) {
  int32_t s = 0;
  for (int64_t r = 0; r < R; ++r) s |= param_status(temp[r], top_k[r], top_p[r], random);
  for (int64_t i = 0; u && i < n_u; ++i) s |= uniform_status(u[i]);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_cpu(
    const at::Tensor& target_logits, const at::Tensor& node_offsets, const at::Tensor& draft_tokens,
    const at::Tensor& parents, const std::optional<at::Tensor>& draft_probs,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& uniforms, int64_t max_nodes) {
  const auto d =
      check_verify_args(target_logits, node_offsets, draft_tokens, parents, draft_probs,
                        temperature, top_k, top_p, seeds, positions, uniforms, max_nodes);
  const int64_t* off = node_offsets.data_ptr<int64_t>();
  const int64_t* tok = draft_tokens.data_ptr<int64_t>();
  const int64_t* par = parents.data_ptr<int64_t>();
  // Data checks of the small tensors first: offsets gate every later index.
  int32_t st = 0;
  for (int64_t r = 0; r < d.R && !st; ++r)
    st |= offsets_status(r, d.R, off[r], off[r + 1], d.N, d.W);
  raise_on_status(st, "verify");
  std::vector<int64_t> row_request(d.N);
  for (int64_t r = 0; r < d.R; ++r) {
    for (int64_t j = 0; j < off[r + 1] - off[r]; ++j) {
      const int64_t i = off[r] + j;
      row_request[i] = r;
      st |= node_status(j, par[i], tok[i], d.V);
    }
  }
  const float* temp = temperature.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  const float* p = top_p.data_ptr<float>();
  const double* u = uniforms ? uniforms->data_ptr<double>() : nullptr;
  st |= check_params_and_uniforms(d.R, temp, k, p, u, d.N * 2, seeds || uniforms);
  raise_on_status(st, "verify");

  auto opts = draft_tokens.options();
  at::Tensor out_tokens = at::full({d.R, d.W}, -1, opts);
  at::Tensor out_count = at::zeros({d.R}, opts);
  at::Tensor out_nodes = at::full({d.R, d.W}, -1, opts);
  std::atomic<int32_t> status{0};
  const auto dtype = target_logits.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "verify_cpu", [&] {
    auto rows = all_row_stats<scalar_t>(target_logits, row_request.data(), temp, k, p, status);
    raise_on_status(status.load(), "verify");
    auto run = [&](auto* q) {
      verify_kernel(target_logits.data_ptr<scalar_t>(), d.V, off, d.R, tok, par, q, rows,
                    seeds ? seeds->data_ptr<int64_t>() : nullptr,
                    positions ? positions->data_ptr<int64_t>() : nullptr, u, d.W,
                    out_tokens.data_ptr<int64_t>(), out_count.data_ptr<int64_t>(),
                    out_nodes.data_ptr<int64_t>(), status);
    };
    if (!draft_probs) run(static_cast<const float*>(nullptr));
    else if (draft_probs->scalar_type() == at::kFloat) run(draft_probs->data_ptr<float>());
    else run(draft_probs->data_ptr<double>());
  });
  raise_on_status(status.load(), "verify");
  return {out_tokens, out_count, out_nodes};
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits,
                                              const at::Tensor& temperature,
                                              const at::Tensor& top_k, const at::Tensor& top_p,
                                              const std::optional<at::Tensor>& seeds,
                                              const std::optional<at::Tensor>& positions,
                                              const std::optional<at::Tensor>& uniforms,
                                              bool return_probs) {
  const auto d = check_sample_args(logits, temperature, top_k, top_p, seeds, positions, uniforms);
  const float* temp = temperature.data_ptr<float>();
  const int64_t* k = top_k.data_ptr<int64_t>();
  const float* p = top_p.data_ptr<float>();
  const double* u = uniforms ? uniforms->data_ptr<double>() : nullptr;
  raise_on_status(check_params_and_uniforms(d.R, temp, k, p, u, d.R, seeds || uniforms), "sample");
  const int64_t* seed = seeds ? seeds->data_ptr<int64_t>() : nullptr;
  const int64_t* pos = positions ? positions->data_ptr<int64_t>() : nullptr;
  at::Tensor tokens = at::empty({d.R}, logits.options().dtype(at::kLong));
  at::Tensor probs = at::zeros({return_probs ? d.R : 0, d.V}, logits.options().dtype(at::kDouble));
  std::vector<int64_t> row_request(d.R);
  for (int64_t r = 0; r < d.R; ++r) row_request[r] = r;
  std::atomic<int32_t> status{0};
  const auto dtype = logits.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "sample_cpu", [&] {
    auto rows = all_row_stats<scalar_t>(logits, row_request.data(), temp, k, p, status);
    raise_on_status(status.load(), "sample");
    const scalar_t* base = logits.data_ptr<scalar_t>();
    int64_t* out = tokens.data_ptr<int64_t>();
    double* pr = probs.data_ptr<double>();
    at::parallel_for(0, d.R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* w = base + r * d.V;
        // Node 0, sampling coin: the same draw verify makes for a request with no drafts.
        const double coin = u ? u[r] : node_coin(nullptr, seed, pos, r, 0, 0, kSampleCoin);
        out[r] = draw(w, d.V, rows[r], coin, [](int64_t, double e) { return e; });
        for (int64_t v = 0; return_probs && v < d.V; ++v)
          pr[r * d.V + v] = row_e(rows[r], v, static_cast<float>(w[v])) / rows[r].total;
      }
    });
  });
  return {tokens, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("verify", &verify_cpu);
  m.impl("sample", &sample_cpu);
}

}  // namespace dspark
