// dspark/markov_draft.cuh: CUDA dspark::markov_draft, two kernels per draft step k:
//   MarkovLogitsKernel grid C * ceil(R / RB), 512 threads: one block per (512-entry chunk, RB
//                      rows): stages the RB rows' W1[x_{k-1}] in shared memory, streams the
//                      chunk's W2 columns ONCE for all RB rows (each thread: 1 column x RB rows
//                      of fp32 accumulators, j in order), adds U, writes z_k to the workspace and
//                      (its first 128 threads, 4 columns each) the chunk's statistics (greedy:
//                      max + first argmax; sampled: local base + sum of e) in row_stats.cuh's
//                      layout, so finalize_row reads them unchanged
//   MarkovDrawKernel   grid R, 256 threads: top-k/top-p rows run filtered_row over z_k (block);
//                      the block stages the row's chunk partials in shared memory, warp 0
//                      finalizes them (finalize_partials, finalize_row's arithmetic), warp 1
//                      computes the confidence logit; then the block draws x_k by inverse CDF in
//                      index order, exactly as sample's DrawKernel does for a request without
//                      drafts (keyed coin)
//   MarkovProbsKernel  grid (R, C) (return_probs only): q_k(v) = e(v) / S into probs[:, k]
//   MarkovConfPrefixKernel (confidence head only) once before step 1: the h part of every
//                      confidence logit, grid ceil(R * G / 4), a warp per (request, step)
// Step k + 1 reads x_k from the tokens output: stream order is the only dependency, so the 2-3
// launches per step capture into a CUDA graph as they are.
// Why RB <= 16 rows per block: the chunk's logits of every row fit shared memory; R = 64 runs 4
// row blocks per chunk back to back (adjacent block ids), which share the chunk's W2 bytes
// through L2. Why a column per thread: each column's sum is one chain over j (the CPU's order),
// so a block has rank / kUnroll dependent trips to memory; 512 threads put 4x the bytes of the
// 128-thread version (4 columns a thread, 2026-12-06 s8-s14) in flight per trip, in half the
// trips (s14: the op took 589 µs for 7 steps at V 8256 where the loop of small kernels took 281).
#pragma once
#include <type_traits>

#include "dspark/markov_draw.cuh"
#include "dspark/sync.cuh"  // zero_words

namespace dspark {
namespace cuda {

// The workspace: z_k [R, V] fp32, the confidence lanes' h part [R, G, kConfLanes] fp32, then
// the row statistics (RowInfo [R], chunk partials [R, C]), each piece 16-byte aligned.
// base == nullptr: only the size.
inline size_t markov_workspace(int64_t R, int64_t G, int64_t V, void* base, float** logits,
                               float** conf_prefix, VerifyWorkspace* ws) {
  const int64_t C = ceil_div(V, kChunk);
  size_t bytes = 0;
  auto place = [&](auto** piece, int64_t count) {
    using T = std::remove_pointer_t<std::remove_reference_t<decltype(*piece)>>;
    if (base) *piece = reinterpret_cast<T*>(static_cast<char*>(base) + bytes);
    bytes += static_cast<size_t>(ceil_div(count * static_cast<int64_t>(sizeof(T)), 16) * 16);
  };
  float *l = nullptr, *prefix = nullptr;
  VerifyWorkspace w{};
  place(&l, R * V);
  place(&prefix, R * G * kConfLanes);
  place(&w.info, R);
  place(&w.chunk_base, R * C);
  place(&w.chunk_wmax, R * C);
  place(&w.chunk_sum, R * C);
  place(&w.chunk_widx, R * C);
  if (logits) *logits = l;
  if (conf_prefix) *conf_prefix = prefix;
  if (ws) *ws = w;
  return bytes;
}

// Rows per logits block: the batch rounded up to a power of two, at most kMarkovMaxRows, with
// the staged W1 rows within kMarkovSmemFloats.
inline int markov_block_rows(int64_t R, int64_t rank) {
  int rows = 1;
  while (rows < kMarkovMaxRows && rows < R && 2 * rows * rank <= kMarkovSmemFloats) rows *= 2;
  return rows;
}

// Programmatic dependent launch (dspark/pdl.cuh) of every kernel after step 1's logits kernel:
// a Hopper+ device running sm_90 code of these kernels (a compute_80 build JIT-compiled there
// has no griddepcontrol.wait). asked: MarkovArgs::pdl (0 off, 1 where usable). Cached per device.
inline cudaError_t markov_pdl(int asked, bool* out) {
  *out = false;
  return asked ? sm90_paths(MarkovDrawKernel<float, float>, out) : cudaSuccess;
}

template <typename U, typename W, int RB>
cudaError_t launch_markov_logits(const MarkovParams<U, W>& p, int64_t k, bool pdl,
                                 cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(p.C * ceil_div(p.R, RB));
  const int64_t floats = RB * (p.rank > kChunk ? p.rank : kChunk);  // <= kMarkovSmemFloats
  return launch_ex(pdl, MarkovLogitsKernel<U, W, RB>, dim3(grid), dim3(kMarkovGemmThreads),
                   static_cast<size_t>(floats) * sizeof(float), stream, p, k);
}

template <typename U, typename W>
cudaError_t launch_markov_logits_rows(const MarkovParams<U, W>& p, int rows, int64_t k, bool pdl,
                                      cudaStream_t stream) {
  switch (rows) {
    case 1: return launch_markov_logits<U, W, 1>(p, k, pdl, stream);
    case 2: return launch_markov_logits<U, W, 2>(p, k, pdl, stream);
    case 4: return launch_markov_logits<U, W, 4>(p, k, pdl, stream);
    case 8: return launch_markov_logits<U, W, 8>(p, k, pdl, stream);
    default: return launch_markov_logits<U, W, 16>(p, k, pdl, stream);
  }
}

// Host checks: R >= 1, G >= 1, 1 <= V <= kMaxVocab, 1 <= rank <= kMarkovMaxRank, dtypes.
template <typename U, typename W>
cudaError_t launch_markov_draft(const MarkovArgs& a, cudaStream_t stream) {
  MarkovParams<U, W> p{};
  p.base = static_cast<const U*>(a.base_logits);
  p.w1 = static_cast<const W*>(a.w1);
  p.w2 = static_cast<const W*>(a.w2);
  p.hidden = static_cast<const W*>(a.hidden);
  p.conf_w = static_cast<const W*>(a.conf_weight);
  p.conf_b = static_cast<const W*>(a.conf_bias);
  p.anchors = a.anchors, p.temperature = a.temperature, p.top_k = a.top_k, p.top_p = a.top_p;
  p.seeds = a.seeds, p.positions = a.positions;
  p.tokens = a.tokens, p.conf = a.conf_logits, p.probs = a.probs, p.status = a.status;
  p.R = a.R, p.G = a.G, p.V = a.V, p.rank = a.rank, p.d = a.d;
  p.C = ceil_div(a.V, kChunk);
  markov_workspace(a.R, a.G, a.V, a.workspace, &p.logits, &p.conf_prefix, &p.ws);
  cudaError_t err = zero_words(p.status, 1, stream);
  if (err != cudaSuccess) return err;
  if (p.conf) {
    const int64_t blocks = ceil_div(p.R * p.G, kMarkovPrefixWarps);
    MarkovConfPrefixKernel<U, W>
        <<<static_cast<unsigned>(blocks), kMarkovPrefixWarps * 32, 0, stream>>>(p);
  }
  const int rows = markov_block_rows(p.R, p.rank);
  bool pdl = false;
  if ((err = markov_pdl(a.pdl, &pdl)) != cudaSuccess) return err;
  for (int64_t k = 0; k < p.G; ++k) {
    // step 1's logits kernel in plain stream order (after the status zeroing and the prefix)
    err = launch_markov_logits_rows<U, W>(p, rows, k, pdl && k > 0, stream);
    if (err != cudaSuccess) return err;
    err = launch_ex(pdl, MarkovDrawKernel<U, W>, dim3(static_cast<unsigned>(p.R)),
                    dim3(kDrawThreads), 0, stream, p, k);
    if (err == cudaSuccess && p.probs)
      err = launch_ex(pdl, MarkovProbsKernel<U, W>,
                      dim3(static_cast<unsigned>(p.R), static_cast<unsigned>(p.C)), dim3(256), 0,
                      stream, p, k);
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dspark
