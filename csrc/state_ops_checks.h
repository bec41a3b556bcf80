// csrc/state_ops_checks.h: argument checks of dspark::commit_tokens and dspark::ngram_propose
// (metadata only: dtypes, shapes, devices, contiguity, scalar ranges), the kernels' parameters
// bound to the checked tensors, and the message of their data errors.
#pragma once
#include <ATen/ATen.h>

#include "dspark/state_ops.h"

namespace dspark {

// Checks the arguments; returns the kernel's parameters (status is the CUDA caller's).
CommitParams commit_tokens_params(const at::Tensor& tokens, const at::Tensor& n_tokens,
                                  const at::Tensor& active, const at::Tensor& out_tokens,
                                  const at::Tensor& accept_count, const at::Tensor& stop_tokens,
                                  const at::Tensor& prompt_lens, const at::Tensor& max_new,
                                  const at::Tensor& round_active, const at::Tensor& round_accepts,
                                  const at::Tensor& rounds, const at::Tensor& any_active);

// Checks the arguments; returns the kernel's parameters but drafts (allocate [B, gamma + 1]
// after the checks) and status (the CUDA caller's).
NgramParams ngram_propose_params(const at::Tensor& tokens, const at::Tensor& n_tokens,
                                 int64_t gamma, int64_t max_ngram, int64_t min_ngram);

// Turns a state-op status word (StateStatusBit flags) into a ValueError naming the argument.
void raise_on_state_status(int32_t status, const char* op);

}  // namespace dspark
