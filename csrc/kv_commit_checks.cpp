// csrc/kv_commit_checks.cpp: every caller error of dspark::kv_commit names the argument.
#include "kv_commit_checks.h"

#include <string>

#include "checks.h"

namespace dspark {
namespace {

// A per-request index tensor: int64, on the caches' device, contiguous, `dims`-D with size(0) n.
void check_index(const at::Tensor& t, const at::Tensor& cache, int64_t dims, int64_t n,
                 const char* name) {
  DSPARK_CHECK_DIM(t, dims, name);
  DSPARK_CHECK_SIZE(t, 0, n, name);
  DSPARK_CHECK(t.device() == cache.device(), name, " must be on ", cache.device(),
               " like k_cache, got ", t.device());
  DSPARK_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Contiguous past the layer dim (the layer stride may be anything that keeps layers apart: a
// view of one layer-major buffer holding K and V, say).
void check_cache_strides(const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;  // nothing is addressed
  int64_t expect = 1;
  for (int64_t i = t.dim() - 1; i >= 1; --i) {
    DSPARK_CHECK(t.size(i) <= 1 || t.stride(i) == expect, name,
                 " must be contiguous past its layer dim (dim 0), got strides ", t.strides());
    expect *= t.size(i);
  }
  DSPARK_CHECK(t.size(0) <= 1 || t.stride(0) >= expect, name,
               "'s layer stride must be >= one layer's elements (", expect, "), got ", t.stride(0));
}

}  // namespace

KvCommitParams kv_commit_params(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& start, const at::Tensor& accept_nodes,
                                const at::Tensor& accept_count, const at::Tensor& node_offsets,
                                const std::optional<at::Tensor>& block_table) {
  const bool paged = block_table.has_value();
  DSPARK_CHECK(k_cache.dim() == 5, "k_cache must be a 5-D tensor (",
               paged ? "[L, P, page_size, H, D] with a block_table" : "[L, B, H, S, D]",
               "), got shape ", k_cache.sizes());
  DSPARK_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ",
               k_cache.sizes(), ", got ", v_cache.sizes());
  DSPARK_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(),
                    "v_cache must have the dtype of k_cache (", k_cache.scalar_type(), "), got ",
                    v_cache.scalar_type());
  DSPARK_CHECK(v_cache.device() == k_cache.device(), "v_cache must be on ", k_cache.device(),
               " like k_cache, got ", v_cache.device());
  check_cache_strides(k_cache, "k_cache");
  check_cache_strides(v_cache, "v_cache");
  DSPARK_CHECK(k_cache.numel() == 0 || k_cache.data_ptr() != v_cache.data_ptr(),
               "k_cache and v_cache must be different tensors");
  DSPARK_CHECK_DIM(start, 1, "start");
  const int64_t B = start.size(0);
  for (const auto& [t, name] :
       {std::pair{start, "start"}, std::pair{accept_nodes, "accept_nodes"},
        std::pair{accept_count, "accept_count"}, std::pair{node_offsets, "node_offsets"}})
    DSPARK_CHECK_DTYPE(t, at::kLong, name);
  check_index(start, k_cache, 1, B, "start");
  check_index(accept_count, k_cache, 1, B, "accept_count");
  check_index(accept_nodes, k_cache, 2, B, "accept_nodes");
  check_index(node_offsets, k_cache, 1, B + 1, "node_offsets");
  DSPARK_CHECK_VALUE(accept_nodes.size(1) >= 1,
                     "accept_nodes must have at least one column (the root), got shape ",
                     accept_nodes.sizes());
  DSPARK_CHECK_VALUE(B <= kKvMaxRequests, "at most ", kKvMaxRequests,
                     " requests per call (start has ", B, ")");
  const int64_t L = k_cache.size(0), elt = k_cache.element_size();
  KvCommitParams p{};
  p.k = static_cast<char*>(k_cache.data_ptr());
  p.v = static_cast<char*>(v_cache.data_ptr());
  p.k_layer = k_cache.stride(0) * elt;
  p.v_layer = v_cache.stride(0) * elt;
  p.start = start.data_ptr<int64_t>();
  p.nodes = accept_nodes.data_ptr<int64_t>();
  p.count = accept_count.data_ptr<int64_t>();
  p.offsets = node_offsets.data_ptr<int64_t>();
  p.B = B;
  p.W = accept_nodes.size(1);
  p.L = L;
  if (paged) {
    const at::Tensor& bt = *block_table;
    DSPARK_CHECK_TYPE(bt.scalar_type() == at::kInt || bt.scalar_type() == at::kLong,
                      "block_table must have dtype int32 or int64, got ", bt.scalar_type());
    check_index(bt, k_cache, 2, B, "block_table");
    const int64_t page_size = k_cache.size(2);
    DSPARK_CHECK_VALUE(page_size >= 1, "page_size (k_cache.size(2)) must be >= 1, got shape ",
                       k_cache.sizes());
    p.block_table = bt.data_ptr();
    p.table64 = bt.scalar_type() == at::kLong;
    p.groups = 1;
    p.row_bytes = k_cache.size(3) * k_cache.size(4) * elt;
    p.page_size = page_size;
    p.page_shift = -1;
    for (int shift = 0; shift < 62; ++shift)
      if (int64_t(1) << shift == page_size) p.page_shift = shift;
    p.table_width = bt.size(1);
    p.num_pages = k_cache.size(1);
    p.F = ceil_div(p.W - 1, page_size);
  } else {
    DSPARK_CHECK(k_cache.size(1) == B, "k_cache must have size ", B,
                 " in dim 1 (one [H, S, D] block per request, [L, B, H, S, D]; pass a "
                 "block_table for a paged cache), got shape ",
                 k_cache.sizes());
    p.groups = k_cache.size(2);
    p.row_bytes = k_cache.size(4) * elt;
    p.slots = k_cache.size(3);
    p.F = 0;
    p.page_shift = -1;
  }
  DSPARK_CHECK_VALUE(L * p.groups * p.row_bytes <= kKvMaxLayerBytes,
                     "k_cache's rows are too large: L * H * D * element size must be <= ",
                     kKvMaxLayerBytes, " bytes");
  return p;
}

std::tuple<at::Tensor, at::Tensor> kv_commit_outputs(KvCommitParams& p, const at::Tensor& k_cache,
                                                     const std::optional<at::Tensor>& block_table) {
  const auto opts = k_cache.options().dtype(block_table ? block_table->scalar_type() : at::kLong);
  at::Tensor lengths = at::empty({p.B}, k_cache.options().dtype(at::kLong));
  at::Tensor freed = at::empty({p.B, p.F}, opts);
  p.lengths = lengths.data_ptr<int64_t>();
  p.freed = freed.data_ptr();
  return {lengths, freed};
}

void raise_on_kv_status(int32_t status) {
  if (status == 0) return;
  std::string msg = "dspark::kv_commit: bad input:";
  if (status & kKvBadOffsets)
    msg +=
        " node_offsets must give each request 1 to W nodes (W = accept_nodes' width) at "
        "flat ids >= 0;";
  if (status & kKvBadCount)
    msg += " accept_count must lie in [-1, n - 1] (-1: inactive; n = the request's nodes);";
  if (status & kKvBadPath)
    msg +=
        " accept_nodes must be a root-to-node path: the request's root, then increasing node "
        "ids of the request (flat ids, as verify returns them);";
  if (status & kKvBadStart)
    msg += " start must be >= 0 with start + n <= S, the cache's slots (n = the request's nodes);";
  if (status & kKvShortBlockTable)
    msg +=
        " block_table too short: start + n must be <= pages_per_request * page_size "
        "(n = the request's nodes);";
  if (status & kKvBadPage)
    msg += " block_table holds a page id outside [0, P) for the verified block's slots;";
  msg.pop_back();
  TORCH_CHECK_VALUE(false, msg);  // a single std::string: no stream formatting
}

}  // namespace dspark
