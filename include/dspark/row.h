// dspark/row.h: what a backend knows about one logits row after its statistics pass, the
// per-entry unnormalized probability e(v) that every later step recomputes from the logits, and
// the rules of that pass both backends share (parameter and logit checks, the top-p cut).
#pragma once
#include <cmath>
#include <cstdint>

#include "dspark/common.h"
#include "dspark/prob.h"

namespace dspark {

struct RowInfo {
  int64_t argmax;  // greedy rows: the token (smallest index among equal maxima)
  double total;    // S = sum of e(v) over the kept support (1 for greedy rows)
  float inv_t;     // fp32 1/T (unused for greedy rows)
  float nbase;     // N = floor(max_v t(v))
  float t_keep;    // entries with t(v) >= t_keep are kept (top-k/top-p); -inf keeps all
  int32_t greedy;  // 1 when T < kGreedyTemperature
};

DSPARK_HD bool is_greedy(float temperature) { return temperature < kGreedyTemperature; }

// Status bits for one request's sampling parameters. `random`: the call passed seeds and
// positions or uniforms; greedy requests draw nothing, so an all-greedy call needs neither.
DSPARK_HD int32_t param_status(float temperature, int64_t top_k, float top_p, bool random) {
  int32_t s = 0;
  const bool temperature_ok = temperature >= 0.0f && temperature < INFINITY;  // NaN fails
  if (!temperature_ok) s |= kBadTemperature;
  else if (!random && !is_greedy(temperature)) s |= kNoRandomness;
  if (top_k < 0) s |= kBadTopK;
  if (!(top_p > 0.0f && top_p <= 1.0f)) s |= kBadTopP;
  return s;
}
DSPARK_HD float inverse_temperature(float temperature) { return 1.0f / temperature; }

// Unnormalized target probability of token v given its logit w (p(v) = e / info.total).
DSPARK_HD double row_e(const RowInfo& info, int64_t v, float w) {
  if (info.greedy) return v == info.argmax ? 1.0 : 0.0;
  const float t = log2_scaled(w, info.inv_t);
  return t >= info.t_keep ? scaled_exp(t, info.nbase) : 0.0;
}

// A logit that is NaN or +inf is bad input; -inf is a masked entry.
DSPARK_HD bool bad_logit(float w) { return std::isnan(w) || w == INFINITY; }
// A logit that is not masked but whose t = w / T * log2(e) is not finite: w / T overflowed.
DSPARK_HD bool bad_scaled_logit(float w, float t) { return w > -INFINITY && !std::isfinite(t); }

// Top-p keeps the smallest set of largest entries whose fixed-point mass reaches this many units
// of the kept total: ceil(top_p * total), at least 1 and at most total.
DSPARK_HD int64_t top_p_need(float top_p, int64_t total) {
  const double want = ceil(static_cast<double>(top_p) * static_cast<double>(total));
  if (want >= static_cast<double>(total)) return total;
  const int64_t need = static_cast<int64_t>(want);
  return need > 1 ? need : 1;
}

}  // namespace dspark
