// dspark/kv_commit.h: the per-request rules of dspark::kv_commit (KV-cache compaction after
// verify), shared by the CPU loops (csrc/cpu/kv_commit_cpu.cpp) and the CUDA kernel
// (dspark/kv_commit.cuh), so both backends check, move and report by one definition. No torch,
// no CUDA headers. The executable spec is dspark/reference.py (kv_commit).
//
// Request b verified a token tree of n_b = node_offsets[b + 1] - node_offsets[b] nodes whose
// K/V the target forward wrote at slots start[b] + j (node j, root j = 0). verify accepted the
// path accept_nodes[b, 0..c] (flat ids, root first), c = accept_count[b]. Afterwards slot
// start + d holds the K/V of the path's node at depth d, for d = 0..c, and the request's cache
// length is start + c + 1. A path's local ids u_d = accept_nodes[b, d] - node_offsets[b] are
// 0 at the root and strictly increasing (a parent's index is below its child's), so u_d >= d:
// every move goes to a lower slot or stays, and the rows with u_d == d (a chain prefix, the
// whole path for a chain) need no move at all.
//
// Why moving rows in increasing depth is overlap-safe without staging: row d reads slot u_d
// and writes slot d. Slots written before row d are the slots d' < d <= u_d, so row d's source
// is still unwritten; slot d itself is the source of no later row d'' > d (u_d'' >= d'' > d).
// So a thread that owns one column of a row and walks the rows in increasing depth, issuing a
// batch of loads before that batch's stores, never reads a slot it or anyone else overwrote.
//
// Layouts. Every (layer, K|V) is an independent copy problem over "rows" of row_bytes bytes:
//   contiguous: cache [L, B, H, S, D]: one task per (b, layer, K|V, head), row = D elements,
//               slot s at byte s * row_bytes of the (b, head) plane of S slots;
//   paged:      cache [L, P, page_size, H, D] + block_table [B, pages_per_request]: one task per
//               (b, layer, K|V), row = one token's H * D elements, slot s of request b at
//               token (block_table[b, s / page_size] * page_size + s % page_size).
#pragma once
#include <cstdint>

#include "dspark/common.h"

namespace dspark {

// Bits of kv_commit's status word (its own word; csrc/kv_commit_checks.cpp has the messages).
enum KvStatusBit : int32_t {
  kKvBadOffsets = 1 << 0,       // node_offsets[b + 1] <= node_offsets[b], < 0, or n_b > W
  kKvBadCount = 1 << 1,         // accept_count < -1 or >= n_b
  kKvBadPath = 1 << 2,          // accept_nodes[b, :c + 1] not the root then increasing ids < n_b
  kKvBadStart = 1 << 3,         // start < 0, or start + n_b > S (contiguous)
  kKvShortBlockTable = 1 << 4,  // paged: start + n_b > pages_per_request * page_size
  kKvBadPage = 1 << 5,          // paged: a page id of the block's slots outside [0, P)
};

// Limits of the CUDA launch (checked on the host for both backends): requests are grid.y, and a
// request's (layer, group, 16-byte column) threads are counted in int32.
constexpr int64_t kKvMaxRequests = 65535;
constexpr int64_t kKvMaxLayerBytes = int64_t(1) << 30;  // L * groups * row_bytes, int32 room

// dspark::kv_commit. B requests, W = accept_nodes' width, L layers. Arrays contiguous.
struct KvCommitParams {
  char* k;                   // K cache base (see the layouts above); layer l at k + l * k_layer
  char* v;                   // V cache base, same shape
  int64_t k_layer, v_layer;  // bytes between layers (any stride >= one layer's bytes)
  const int64_t* start;      // [B] slot of each request's root
  const int64_t* nodes;      // [B, W] flat node ids: root, then the accepted path; -1 padded
  const int64_t* count;      // [B] accepted drafts; -1 = inactive request (nothing moved)
  const int64_t* offsets;    // [B + 1] verify's node_offsets (flat ids of each request)
  const void* block_table;   // [B, pages_per_request] int32 or int64; null: contiguous
  bool table64;              // block_table's entries are int64
  int64_t* lengths;          // [B] out: start + c + 1; start if inactive; -1 if invalid
  void* freed;               // [B, F] out (paged): pages that became free, -1 padded
  int32_t* status;           // [] KvStatusBit flags (CUDA; the CPU raises)
  int64_t B, W, L, F;
  int64_t groups;     // tasks per (request, layer, K|V): H (contiguous) or 1 (paged)
  int64_t row_bytes;  // bytes per slot and task: D * elt (contiguous) or H * D * elt (paged)
  int64_t slots;      // contiguous: S, the slots of a (request, head) plane
  int64_t page_size, table_width, num_pages;  // paged only
  int page_shift;  // log2(page_size) for a power of two, else -1 (64-bit division is slow on GPUs)
};

DSPARK_HD bool kv_paged(const KvCommitParams& p) { return p.block_table != nullptr; }

// Entry i of request b's block-table row (the caller keeps i < table_width).
DSPARK_HD int64_t kv_table(const KvCommitParams& p, int64_t b, int64_t i) {
  const int64_t at = b * p.table_width + i;
  return p.table64 ? static_cast<const int64_t*>(p.block_table)[at]
                   : static_cast<const int32_t*>(p.block_table)[at];
}

// Logical page of slot s >= 0, and its row within the page.
DSPARK_HD int64_t kv_page_index(const KvCommitParams& p, int64_t s) {
  return p.page_shift >= 0 ? s >> p.page_shift : s / p.page_size;
}
DSPARK_HD int64_t kv_page_row(const KvCommitParams& p, int64_t s) {
  return p.page_shift >= 0 ? s & (p.page_size - 1) : s % p.page_size;
}

// Slots request b may use: the plane's S, or what its block-table row covers.
DSPARK_HD int64_t kv_capacity(const KvCommitParams& p) {
  return kv_paged(p) ? p.table_width * p.page_size : p.slots;
}

// Checks request b (0 = fine) and sets *first to the first depth whose row moves (c + 1: none).
// An inactive request (c = -1) is fine and moves nothing; its other inputs are not used.
// Latency, not arithmetic, is what this costs a moving thread: so the scalars are loaded in one
// batch of independent loads (in bounds for any b < B, used or not), and the loops accumulate
// flags without early exits, unrolled on the GPU, so their loads are issued together too.
DSPARK_HD int32_t kv_check_request(const KvCommitParams& p, int64_t b, int64_t* first) {
  const int64_t* path = p.nodes + b * p.W;
  const int64_t c = p.count[b], off = p.offsets[b], end = p.offsets[b + 1], s = p.start[b];
  const int64_t root = path[0];
  *first = c + 1;
  if (c == -1) return 0;
  if (c < -1) return kKvBadCount;
  const int64_t n = end - off;
  if (off < 0 || n < 1 || n > p.W) return kKvBadOffsets;
  if (c >= n) return kKvBadCount;
  bool bad = root != off;
  int64_t prev = 0, moved = c + 1;
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
  for (int64_t d = 1; d <= c; ++d) {
    const int64_t u = path[d] - off;
    bad |= u <= prev || u >= n;
    if (u != d && moved > d) moved = d;
    prev = u;
  }
  if (bad) return kKvBadPath;
  if (s < 0) return kKvBadStart;
  if (s > kv_capacity(p) - n) return kv_paged(p) ? kKvShortBlockTable : kKvBadStart;
  if (kv_paged(p)) {
    bool out = false;
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
    for (int64_t i = kv_page_index(p, s); i <= kv_page_index(p, s + n - 1); ++i) {
      const int64_t page = kv_table(p, b, i);
      out |= page < 0 || page >= p.num_pages;
    }
    if (out) return kKvBadPage;
  }
  *first = moved;
  return 0;
}

// Byte offset of task (b, group g) within one layer's K or V: the (b, head) plane, or 0.
DSPARK_HD int64_t kv_task_offset(const KvCommitParams& p, int64_t b, int64_t g) {
  return kv_paged(p) ? 0 : (b * p.groups + g) * p.slots * p.row_bytes;
}

// Byte offset of request b's slot s within its task (slot checked by kv_check_request).
DSPARK_HD int64_t kv_slot_offset(const KvCommitParams& p, int64_t b, int64_t s) {
  if (!kv_paged(p)) return s * p.row_bytes;
  const int64_t page = kv_table(p, b, kv_page_index(p, s));
  return (page * p.page_size + kv_page_row(p, s)) * p.row_bytes;
}

// Writes request b's outputs given its check result: lengths[b], and (paged) freed[b, :] = the
// block-table entries of the pages the verified block used (slots < start + n_b) past those the
// new length keeps, -1 padded, in block_table's dtype. At most F = ceil((W - 1) / page_size) of
// them: the kept length is >= start + 1 and n_b <= W.
DSPARK_HD void kv_request_outputs(const KvCommitParams& p, int64_t b, int32_t bad) {
  const int64_t c = p.count[b];
  p.lengths[b] = bad ? -1 : p.start[b] + c + 1;
  if (!kv_paged(p)) return;
  int64_t keep = 0, used = 0;
  if (bad == 0 && c >= 0) {
    keep = ceil_div(p.start[b] + c + 1, p.page_size);
    used = ceil_div(p.start[b] + p.offsets[b + 1] - p.offsets[b], p.page_size);
  }
  for (int64_t j = 0; j < p.F; ++j) {
    const int64_t page = keep + j < used ? kv_table(p, b, keep + j) : -1;
    if (p.table64) static_cast<int64_t*>(p.freed)[b * p.F + j] = page;
    else static_cast<int32_t*>(p.freed)[b * p.F + j] = static_cast<int32_t>(page);
  }
}

}  // namespace dspark
