// csrc/cpu/kv_commit_cpu.cpp: CPU kernel of dspark::kv_commit. Every request is checked first
// (bad data raises before anything moves, with the message the CUDA path reads back), then each
// task (dspark/kv_commit.h: a request's layer, K|V and head plane, or its layer and K|V when
// paged) copies its moved rows in increasing depth, which is overlap-safe row by row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "dspark/kv_commit.h"
#include "kv_commit_checks.h"

namespace dspark {
namespace {

// k_cache, v_cache [L, B, H, S, D] or [L, P, page_size, H, D] (updated); start, accept_count [B];
// accept_nodes [B, W]; node_offsets [B + 1]; block_table [B, pages_per_request]?
// -> lengths [B] i64, freed [B, F]
std::tuple<at::Tensor, at::Tensor> kv_commit_cpu(at::Tensor& k_cache, at::Tensor& v_cache,
                                                 const at::Tensor& start,
                                                 const at::Tensor& accept_nodes,
                                                 const at::Tensor& accept_count,
                                                 const at::Tensor& node_offsets,
                                                 const std::optional<at::Tensor>& block_table) {
  KvCommitParams p = kv_commit_params(k_cache, v_cache, start, accept_nodes, accept_count,
                                      node_offsets, block_table);
  std::vector<int64_t> first(p.B);
  for (int64_t b = 0; b < p.B; ++b) raise_on_kv_status(kv_check_request(p, b, &first[b]));
  auto outputs = kv_commit_outputs(p, k_cache, block_table);
  const int64_t tasks = p.B * 2 * p.L * p.groups;
  at::parallel_for(0, tasks, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t g = t % p.groups, layer = t / p.groups % p.L;
      const bool is_v = t / (p.groups * p.L) % 2;
      const int64_t b = t / (p.groups * p.L * 2);
      char* base =
          (is_v ? p.v + layer * p.v_layer : p.k + layer * p.k_layer) + kv_task_offset(p, b, g);
      const int64_t s0 = p.start[b], off = p.offsets[b];
      for (int64_t d = first[b]; d <= p.count[b]; ++d)  // increasing depth: never an overwrite
        std::memcpy(base + kv_slot_offset(p, b, s0 + d),
                    base + kv_slot_offset(p, b, s0 + p.nodes[b * p.W + d] - off), p.row_bytes);
    }
  });
  for (int64_t b = 0; b < p.B; ++b) kv_request_outputs(p, b, 0);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("kv_commit", &kv_commit_cpu); }

}  // namespace dspark
