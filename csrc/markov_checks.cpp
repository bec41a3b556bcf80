// csrc/markov_checks.cpp: every caller error of dspark::markov_draft names the argument.
#include "markov_checks.h"

#include <string>

#include "checks.h"
#include "dspark/common.h"

namespace dspark {
namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Same device as base_logits, contiguous, and (if given) the weights' dtype.
void check_like(const at::Tensor& base, const at::Tensor& t, const char* name,
                std::optional<at::ScalarType> dtype) {
  DSPARK_CHECK(t.device() == base.device(), name, " must be on ", base.device(),
               " like base_logits, got ", t.device());
  DSPARK_CHECK(t.is_contiguous(), name, " must be contiguous");
  if (dtype)
    DSPARK_CHECK_TYPE(t.scalar_type() == *dtype, name, " must have the dtype of w1 (", *dtype,
                      "), got ", t.scalar_type());
}

}  // namespace

MarkovDims check_markov_draft_args(const at::Tensor& base_logits, const at::Tensor& anchors,
                                   const at::Tensor& w1, const at::Tensor& w2,
                                   const std::optional<at::Tensor>& hidden,
                                   const std::optional<at::Tensor>& conf_weight,
                                   const std::optional<at::Tensor>& conf_bias,
                                   const at::Tensor& temperature, const at::Tensor& top_k,
                                   const at::Tensor& top_p, const at::Tensor& seeds,
                                   const at::Tensor& positions) {
  DSPARK_CHECK(base_logits.dim() == 3, "base_logits must be a 3-D tensor [R, gamma, V], got shape ",
               base_logits.sizes());
  const int64_t R = base_logits.size(0), G = base_logits.size(1), V = base_logits.size(2);
  DSPARK_CHECK_VALUE(G >= 1, "base_logits must have gamma >= 1 draft steps (dim 1), got shape ",
                     base_logits.sizes());
  DSPARK_CHECK_VALUE(V >= 1 && V <= kMaxVocab, "base_logits vocabulary size must be in [1, ",
                     kMaxVocab, "], got ", V);
  check_like(base_logits, base_logits, "base_logits", std::nullopt);
  DSPARK_CHECK_DIM(w1, 2, "w1");
  DSPARK_CHECK_DIM(w2, 2, "w2");
  const auto wt = w1.scalar_type();
  DSPARK_CHECK_TYPE(is_float_type(wt), "w1 must be float32, bfloat16 or float16, got ", wt);
  const int64_t rank = w1.size(1);
  DSPARK_CHECK_VALUE(w1.size(0) == V, "w1 must be [V, rank] with V = ", V,
                     " rows (one per token, like base_logits), got shape ", w1.sizes());
  DSPARK_CHECK_VALUE(rank >= 1 && rank <= kMarkovMaxRank, "w1's rank (dim 1) must be in [1, ",
                     kMarkovMaxRank, "], got shape ", w1.sizes());
  DSPARK_CHECK_VALUE(w2.size(0) == rank && w2.size(1) == V, "w2 must be [rank, V] = [", rank, ", ",
                     V, "] to match w1 ", w1.sizes(), " and base_logits, got shape ", w2.sizes());
  check_like(base_logits, w1, "w1", wt);
  check_like(base_logits, w2, "w2", wt);
  const auto bt = base_logits.scalar_type();
  DSPARK_CHECK_TYPE(bt == at::kFloat || bt == wt,
                    "base_logits must be float32 or the dtype of w1 (", wt, "), got ", bt);
  DSPARK_CHECK_DIM(anchors, 1, "anchors");
  DSPARK_CHECK_SIZE(anchors, 0, R, "anchors");
  DSPARK_CHECK_DTYPE(anchors, at::kLong, "anchors");
  check_like(base_logits, anchors, "anchors", std::nullopt);
  const int given = hidden.has_value() + conf_weight.has_value() + conf_bias.has_value();
  DSPARK_CHECK_VALUE(given == 0 || given == 3,
                     "hidden, conf_weight and conf_bias must be given together (the confidence "
                     "head) or not at all");
  int64_t d = 0;
  if (given == 3) {
    DSPARK_CHECK(hidden->dim() == 3 && hidden->size(0) == R && hidden->size(1) == G,
                 "hidden must be [R, gamma, d] = [", R, ", ", G,
                 ", d] like base_logits, got shape ", hidden->sizes());
    d = hidden->size(2);
    check_like(base_logits, *hidden, "hidden", wt);
    DSPARK_CHECK(conf_weight->dim() == 1 && conf_weight->size(0) == d + rank,
                 "conf_weight must be [d + rank] = [", d + rank,
                 "] (the confidence head's weight over [hidden; W1 row]), got shape ",
                 conf_weight->sizes());
    check_like(base_logits, *conf_weight, "conf_weight", wt);
    DSPARK_CHECK(conf_bias->numel() == 1 && conf_bias->dim() <= 1,
                 "conf_bias must hold one value ([] or [1]), got shape ", conf_bias->sizes());
    check_like(base_logits, *conf_bias, "conf_bias", wt);
  }
  check_request_params(base_logits, R, temperature, top_k, top_p, seeds, positions, false);
  return {R, G, V, rank, d, given == 3};
}

void raise_on_markov_status(int32_t status) {
  static const StatusWording wording{
      " base_logits + the Markov bias contain NaN or +inf (or logit/temperature overflows "
      "float32);",
      " a draft logits row has no finite entry (all -inf);",
      " anchors must be token ids in [0, V);"};
  raise_on_status(status, "markov_draft", wording);
}

}  // namespace dspark
