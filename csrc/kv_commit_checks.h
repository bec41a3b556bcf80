// csrc/kv_commit_checks.h: argument checks of dspark::kv_commit (metadata only: dtypes, shapes,
// devices, contiguity, size limits), the kernel's parameters bound to the checked tensors, its
// outputs, and the messages of its data errors.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "dspark/kv_commit.h"

namespace dspark {

// Checks the arguments; returns the kernel's parameters but the outputs and status.
//   k_cache, v_cache [L, B, H, S, D] (block_table None) or [L, P, page_size, H, D]
//   start, accept_count [B] i64; accept_nodes [B, W] i64; node_offsets [B + 1] i64;
//   block_table [B, pages_per_request] i32|i64 or None
KvCommitParams kv_commit_params(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& start, const at::Tensor& accept_nodes,
                                const at::Tensor& accept_count, const at::Tensor& node_offsets,
                                const std::optional<at::Tensor>& block_table);

// Allocates lengths [B] i64 and freed [B, F] (block_table's dtype; i64 [B, 0] when contiguous)
// on the caches' device and binds them to p.
std::tuple<at::Tensor, at::Tensor> kv_commit_outputs(KvCommitParams& p, const at::Tensor& k_cache,
                                                     const std::optional<at::Tensor>& block_table);

// Turns kv_commit's status word (KvStatusBit flags) into a ValueError naming the argument.
void raise_on_kv_status(int32_t status);

}  // namespace dspark
