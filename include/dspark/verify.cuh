// dspark/verify.cuh: CUDA verify/sample. After the row statistics (row_stats.cuh):
//   WalkKernel          grid R         validate the request, finalize its rows' statistics,
//                                      walk its tree: accept/reject children in
//                                      index order (recursive rejection sampling), record where
//                                      the last token is drawn from and which siblings failed
//   ResidualChunkKernel grid (R, C/8)  residual mass per chunk where siblings were rejected
//   DrawKernel          grid R         inverse-CDF draw: pick the chunk, scan inside it
//   ProbsKernel         grid (R, C)    sample(return_probs=True): p(v) = e(v) / S
// Launch order and workspace layout live in `launch_verify` at the bottom.
#pragma once
#include <type_traits>

#include "dspark/block_draw.cuh"
#include "dspark/row_stats.cuh"
#include "dspark/sync.cuh"  // zero_words
#include "dspark/verify_rules.h"
#include "dspark/verify_walk.cuh"

namespace dspark {
namespace cuda {

// One block per request: open it (outputs, data checks), finalize its rows' statistics (one
// warp per row), walk its tree (verify_walk.cuh).
template <typename S, typename Q>
__global__ void WalkKernel(VerifyParams<S, Q> p, VerifyWorkspace ws) {
  const int64_t r = blockIdx.x;
  int64_t o, n;
  request_rows(p, r, o, n);
  if (open_request(p, ws, r, o, n)) return;
  finalize_request_rows(p, ws, r, o, n, kChunk);
  walk_tree(p, ws, r, o, n);
}

// blockDim.x == 256: one warp per chunk.
template <typename S, typename Q>
__global__ void ResidualChunkKernel(VerifyParams<S, Q> p, VerifyWorkspace ws) {
  const int64_t r = blockIdx.x, b = blockIdx.y * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int64_t row = ws.final_row[r];
  if (row < 0 || ws.n_rej[r] == 0 || b >= p.C) return;
  const int64_t o = p.offsets[r];
  const RowInfo info = ws.info[row];
  const S* w = p.logits + row * p.V;
  double part = 0.0;
  for (int64_t v = b * kChunk + (threadIdx.x & 31); v < min(p.V, (b + 1) * kChunk); v += 32)
    part += residual_at(p, ws, r, o, info, w, ws.n_rej[r], v);
  part = warp_sum(part);
  if ((threadIdx.x & 31) == 0) ws.resid_chunk[r * p.C + b] = part;
}

// blockDim.x == kDrawThreads (block_draw.cuh).
template <typename S, typename Q>
__global__ void DrawKernel(VerifyParams<S, Q> p, VerifyWorkspace ws) {
  const int64_t r = blockIdx.x;
  const int64_t row = ws.final_row[r];
  if (row < 0) return;
  const int64_t o = p.offsets[r];
  const RowInfo info = ws.info[row];
  const S* w = p.logits + row * p.V;
  const int32_t nrej_all = ws.n_rej[r];
  __shared__ double sm_sums[kMaxVocab / kChunk + 1];
  // Chunk masses into shared memory; each thread owns a contiguous run of chunks.
  const int64_t per = ceil_div(p.C, blockDim.x), b0 = threadIdx.x * per, b1 = min(p.C, b0 + per);
  bool fallback = false;
  double z = 0.0;
  for (int pass = 0; pass < 2; ++pass) {
    const double* src =
        (nrej_all > 0 && !fallback) ? ws.resid_chunk + r * p.C : ws.chunk_sum + row * p.C;
    double mine = 0.0;
    for (int64_t b = b0; b < b1; ++b) {
      sm_sums[b] = src[b];
      mine += sm_sums[b];
    }
    z = block_reduce(mine, SumOp(), 0.0);
    if (z != 0.0 || fallback || nrej_all == 0) break;
    fallback = true;  // the residual vanished: draw from the target row itself
  }
  if (fallback) z = info.total;
  const int32_t nrej = fallback ? 0 : nrej_all;  // fallback is the same in every thread
  const int64_t token = block_draw<kChunk>(sm_sums, p.C, p.V, ws.job_u[r] * z, [&](int64_t v) {
    return residual_at(p, ws, r, o, info, w, nrej, v);
  });
  if (threadIdx.x == 0) {
    const int32_t acc = ws.accepted[r];
    p.out_tokens[r * p.W + acc] = token;
    if (p.out_count) p.out_count[r] = acc;
  }
}

template <typename S, typename Q>
__global__ void ProbsKernel(VerifyParams<S, Q> p, VerifyWorkspace ws) {
  const int64_t r = blockIdx.x, b = blockIdx.y;
  if (ws.final_row[r] < 0) return;
  const RowInfo info = ws.info[r];
  const S* w = p.logits + r * p.V;
  for (int64_t v = b * kChunk + threadIdx.x; v < min(p.V, (b + 1) * kChunk); v += blockDim.x)
    p.probs[r * p.V + v] = row_e(info, v, to_f(w[v])) / info.total;
}

// The workspace layout, written once: every piece of VerifyWorkspace in order, each 8-byte
// aligned and sized by its element type times its count. The entry point sizes the buffer with
// it (csrc/cuda/verify_kernels.cu) and launch_verify carves it, so the two cannot disagree.
struct VerifyWorkspaceLayout {
  VerifyWorkspace ws;  // the pieces (all nullptr when only sizing)
  size_t bytes;        // total size
};

// N rows, R requests, output width W, vocabulary V in chunks of `chunk` entries (the staged
// kernels' kChunk, the fused kernel's kWarpChunk); base: the buffer, or nullptr to size only.
inline VerifyWorkspaceLayout verify_workspace_layout(int64_t N, int64_t R, int64_t W, int64_t V,
                                                     void* base, int64_t chunk = kChunk) {
  const int64_t C = ceil_div(V, chunk);
  VerifyWorkspaceLayout l{};
  auto place = [&](auto*& piece, int64_t count) {
    using T = std::remove_pointer_t<std::remove_reference_t<decltype(piece)>>;
    piece = base ? reinterpret_cast<T*>(static_cast<char*>(base) + l.bytes) : nullptr;
    l.bytes += static_cast<size_t>(ceil_div(count * static_cast<int64_t>(sizeof(T)), 8) * 8);
  };
  // take(count, pieces...): the pieces, in order, each of `count` entries.
  auto take = [&](int64_t count, auto*&... pieces) { (place(pieces, count), ...); };
  VerifyWorkspace& ws = l.ws;
  take(N, ws.info);
  take(N * C, ws.chunk_base, ws.chunk_wmax, ws.chunk_sum, ws.chunk_widx);
  take(R, ws.n_rej, ws.accepted, ws.final_row, ws.job_u);
  take(R * W, ws.rej_node, ws.rej_z);
  take(R * C, ws.resid_chunk);
  take(N, ws.f_parent, ws.f_token, ws.f_e, ws.f_q, ws.f_u, ws.row_owner);
  static_assert(sizeof(VerifyWorkspace) == 18 * sizeof(void*),
                "every VerifyWorkspace piece needs its place in a take() above");
  return l;
}

template <typename S, typename Q>
cudaError_t launch_verify(VerifyParams<S, Q> p, void* workspace, cudaStream_t stream) {
  p.C = ceil_div(p.V, kChunk);
  p.vec_loads = (p.V * sizeof(S)) % 16 == 0 && reinterpret_cast<uintptr_t>(p.logits) % 16 == 0;
  const VerifyWorkspace ws = verify_workspace_layout(p.N, p.R, p.W, p.V, workspace).ws;
  const cudaError_t err = zero_words(p.status, 1, stream);
  if (err != cudaSuccess) return err;
  // An empty batch (then N == 0) launches nothing: a grid of zero blocks is a launch error.
  if (p.R == 0) return cudaSuccess;
  const int warps = 8;  // 256-thread blocks
  RowOwnerKernel<<<ceil_div(p.N, 256), 256, 0, stream>>>(p, ws);
  // Requests/rows go in grid x (up to 2^31 - 1); chunks in y (at most 1024 for kMaxVocab).
  RowStatsKernel<<<dim3(p.N, 1 + ceil_div(p.C, warps * kChunksPerWarp)), 256, 0, stream>>>(p, ws);
  WalkKernel<<<p.R, 128, 0, stream>>>(p, ws);
  ResidualChunkKernel<<<dim3(p.R, ceil_div(p.C, warps)), 256, 0, stream>>>(p, ws);
  DrawKernel<<<p.R, kDrawThreads, 0, stream>>>(p, ws);
  if (p.probs) ProbsKernel<<<dim3(p.R, p.C), 256, 0, stream>>>(p, ws);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dspark
