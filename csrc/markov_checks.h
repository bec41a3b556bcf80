// csrc/markov_checks.h: argument checks of dspark::markov_draft (metadata only: dtypes, shapes,
// devices, contiguity) and the message of its data errors (StatusBit flags).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "dspark/markov_draft.h"  // kMarkovMaxRank

namespace dspark {

// R requests, G draft steps, V vocabulary, rank of the Markov factors, d hidden size (0 without
// the confidence head, then `conf` is false).
struct MarkovDims {
  int64_t R, G, V, rank, d;
  bool conf;
};

MarkovDims check_markov_draft_args(const at::Tensor& base_logits, const at::Tensor& anchors,
                                   const at::Tensor& w1, const at::Tensor& w2,
                                   const std::optional<at::Tensor>& hidden,
                                   const std::optional<at::Tensor>& conf_weight,
                                   const std::optional<at::Tensor>& conf_bias,
                                   const at::Tensor& temperature, const at::Tensor& top_k,
                                   const at::Tensor& top_p, const at::Tensor& seeds,
                                   const at::Tensor& positions);

// Turns a markov_draft status word into a ValueError naming the bad argument.
void raise_on_markov_status(int32_t status);

}  // namespace dspark
