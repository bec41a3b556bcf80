// dspark/kv_commit.cuh: dspark::kv_commit as one kernel for every layer, K and V, both layouts
// (graph-capturable: static grid, no host sync).
//
// Bandwidth: a move is a byte copy (any dtype), so each thread owns one 16-byte column (8 bf16;
// narrower vectors only when the caches' alignment forces them) of one task (dspark/kv_commit.h:
// a request's layer, K|V and head plane, or its layer and K|V in the paged layout) and walks the
// task's moved rows in increasing depth, kKvBatch rows' loads in flight before their stores.
// Consecutive threads own consecutive columns, so a warp reads and writes whole 256-byte head
// rows (contiguous) or 512-byte spans of one token row (paged): full sectors, coalesced.
// Overlap safety is by order, not staging (dspark/kv_commit.h: moving rows in increasing depth
// never reads an overwritten slot): the thread that reads a column of a slot is the only one
// that writes that column of any slot of the task, so program order is the only ordering needed
// — no barrier, no shared memory.
//
// Grid (x, B, 2): y = request, z = K|V, x = blocks over the (layer, group, column) threads of one
// request's K or V, plus one more x block: at (x last, 0, 0) it checks every request and writes
// lengths, freed pages and the status word (no memset: the caller reads what it wrote), at other
// (x last, y, z) it exits. Every moving thread re-checks its own request with the same rule
// (dspark/kv_commit.h), so an invalid request is never touched, read back or not. A request is
// ~2 KB of metadata read by thousands of threads: L1/L2 hits after the first.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dspark/common.h"
#include "dspark/kv_commit.h"

namespace dspark {
namespace cuda {

constexpr int kKvThreads = 128;
constexpr int kKvBatch = 8;  // rows per thread whose loads are in flight together (128 B)

// Checks every request, writes lengths / freed and the status word (one block).
__device__ __forceinline__ void kv_commit_report(const KvCommitParams& p) {
  __shared__ int32_t bits;
  if (threadIdx.x == 0) bits = 0;
  __syncthreads();
  int32_t mine = 0;
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    int64_t first;
    const int32_t bad = kv_check_request(p, b, &first);
    kv_request_outputs(p, b, bad);
    mine |= bad;
  }
  if (mine) atomicOr(&bits, mine);
  __syncthreads();
  if (threadIdx.x == 0) *p.status = bits;
}

// Grid (ceil(L * groups * cols / kKvThreads) + 1, B, 2), block kKvThreads; cols = row_bytes /
// sizeof(Vec). Shapes as in KvCommitParams.
template <typename Vec>
__global__ void __launch_bounds__(kKvThreads) kv_commit_kernel(KvCommitParams p, int32_t cols) {
  if (blockIdx.x == gridDim.x - 1) {  // block-uniform
    if (blockIdx.y == 0 && blockIdx.z == 0) kv_commit_report(p);
    return;
  }
  const int64_t b = blockIdx.y;
  const int32_t i = int32_t(blockIdx.x) * kKvThreads + int32_t(threadIdx.x);
  const int32_t task = i / cols, col = i - task * cols;  // task = layer * groups + group
  const int32_t layer = task / int32_t(p.groups);
  if (layer >= p.L) return;
  int64_t first;
  if (kv_check_request(p, b, &first) != 0) return;
  const int64_t c = p.count[b];  // first = c + 1 when nothing moves (a chain, inactive)
  if (first > c) return;
  char* cache = blockIdx.z ? p.v + layer * p.v_layer : p.k + layer * p.k_layer;
  char* base = cache + kv_task_offset(p, b, task - layer * int32_t(p.groups)) +
               int64_t(col) * int64_t(sizeof(Vec));
  const int64_t s0 = p.start[b], off = p.offsets[b];
  const int64_t* path = p.nodes + b * p.W;
  for (int64_t d0 = first; d0 <= c; d0 += kKvBatch) {
    Vec row[kKvBatch];
#pragma unroll
    for (int j = 0; j < kKvBatch; ++j)  // sources: read once, never again (evict first)
      if (d0 + j <= c)
        row[j] = __ldcs(
            reinterpret_cast<const Vec*>(base + kv_slot_offset(p, b, s0 + path[d0 + j] - off)));
#pragma unroll
    for (int j = 0; j < kKvBatch; ++j)  // destinations: the next decode step reads them
      if (d0 + j <= c) *reinterpret_cast<Vec*>(base + kv_slot_offset(p, b, s0 + d0 + j)) = row[j];
  }
}

// The widest vector (16, 8, 4, 2 or 1 bytes) that every row start is aligned to: the caches'
// bases, their layer strides and the row size (plane and token offsets are multiples of it).
inline int kv_vector_bytes(const KvCommitParams& p) {
  const uint64_t bits = uint64_t(reinterpret_cast<uintptr_t>(p.k)) |
                        uint64_t(reinterpret_cast<uintptr_t>(p.v)) | uint64_t(p.k_layer) |
                        uint64_t(p.v_layer) | uint64_t(p.row_bytes);
  int vec = 16;
  while (vec > 1 && bits % uint64_t(vec) != 0) vec /= 2;
  return vec;
}

template <typename Vec>
cudaError_t launch_kv_commit_as(const KvCommitParams& p, cudaStream_t stream) {
  const int64_t cols = p.row_bytes / int64_t(sizeof(Vec));
  const int64_t movers = p.L * p.groups * cols;  // threads per (request, K|V)
  const dim3 grid(unsigned(ceil_div(movers, kKvThreads) + 1), unsigned(p.B), 2);
  kv_commit_kernel<Vec><<<grid, kKvThreads, 0, stream>>>(p, int32_t(cols));
  return cudaGetLastError();
}

// Host checks: 1 <= B <= kKvMaxRequests, L * groups * row_bytes <= kKvMaxLayerBytes.
inline cudaError_t launch_kv_commit(const KvCommitParams& p, cudaStream_t stream) {
  switch (kv_vector_bytes(p)) {
    case 16: return launch_kv_commit_as<uint4>(p, stream);
    case 8: return launch_kv_commit_as<uint2>(p, stream);
    case 4: return launch_kv_commit_as<unsigned int>(p, stream);
    case 2: return launch_kv_commit_as<unsigned short>(p, stream);
    default: return launch_kv_commit_as<unsigned char>(p, stream);
  }
}

}  // namespace cuda
}  // namespace dspark
