// dspark/row.h: what a backend knows about one logits row after its statistics pass, and the
// per-entry unnormalized probability e(v) that every later step recomputes from the logits.
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

// Status bits for one request's sampling parameters.
DSPARK_HD int32_t param_status(float temperature, int64_t top_k, float top_p) {
  int32_t s = 0;
  if (!(temperature >= 0.0f && temperature < INFINITY)) s |= kBadTemperature;  // NaN too
  if (top_k < 0) s |= kBadTopK;
  if (!(top_p > 0.0f && top_p <= 1.0f)) s |= kBadTopP;
  return s;
}

DSPARK_HD bool is_greedy(float temperature) { return temperature < kGreedyTemperature; }
DSPARK_HD float inverse_temperature(float temperature) { return 1.0f / temperature; }

// Unnormalized target probability of token v given its logit w (p(v) = e / info.total).
DSPARK_HD double row_e(const RowInfo& info, int64_t v, float w) {
  if (info.greedy) return v == info.argmax ? 1.0 : 0.0;
  const float t = log2_scaled(w, info.inv_t);
  return t >= info.t_keep ? scaled_exp(t, info.nbase) : 0.0;
}

// Residual after rejected siblings: r <- max(r - q_j(v) * Z_j, 0) for each rejected j in order.
// One-hot drafts (no draft_probs) zero the rejected token instead (same value, since r <= Z).
DSPARK_HD double residual_step(double r, bool onehot, int64_t v, int64_t token, double qv, double z) {
  if (onehot) return v == token ? 0.0 : r;
  const double d = r - qv * z;
  return d > 0.0 ? d : 0.0;
}

}  // namespace dspark
