// dspark/state_ops.cuh: the speculative step's bookkeeping as one kernel each (graph-capturable:
// static grids, no host sync, deterministic).
//
// commit_tokens: one block of up to 1024 threads strides over the B requests (B is small: a few
// hundred at most), each thread applying commit_request (dspark/state_ops.h) to its requests;
// the round log, the counter and any(active) need the whole batch, which one block has, so
// block-wide ORs (__syncthreads_or) give any_active and the status word with no atomics and no
// zero-filled buffer.
//
// ngram_propose: one block per request, one pass over the context for every n-gram size at once
// (dspark/state_ops.h explains why the lexicographic maximum of (match length L(j), end j)
// gives the reference's answer). The block scans end positions j from the anchor backwards in
// chunks of kNgramThreads * kNgramPerThread, each thread loading its positions' tokens together
// and extending only those equal to the anchor; a match of the longest possible size ends the
// scan (the common case: the most recent occurrence is near the end). Two block max-reductions
// then give (L, j), and the block writes the anchor and the gamma drafts.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dspark/block_reduce.cuh"
#include "dspark/common.h"
#include "dspark/state_ops.h"

namespace dspark {
namespace cuda {

constexpr int kNgramThreads = 128;
constexpr int kNgramPerThread = 4;  // positions per thread per chunk (independent loads)

// Grid (1), block min(1024, B rounded up to a warp) threads. Shapes as in CommitParams.
__global__ void commit_tokens_kernel(CommitParams p) {
  const int64_t rounds = *p.rounds;  // read by every thread before thread 0 increments it
  const int64_t row = commit_log_row(rounds, p.R);
  int any = 0, bad = 0;
  for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x) {
    p.round_active[row * p.B + b] = p.active[b];  // active at the round's start
    p.round_accepts[row * p.B + b] = p.accept_count[b];
    bad |= p.n_tokens[b] < 0;
    any |= commit_request(p, b);
  }
  any = __syncthreads_or(any);  // also the barrier after every thread's read of *p.rounds
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    *p.rounds = rounds + 1;
    *p.any_active = any != 0;
    *p.status = bad ? int32_t(kNegativeNTokens) : 0;
  }
}

inline cudaError_t launch_commit_tokens(const CommitParams& p, cudaStream_t stream) {
  int64_t threads = (p.B + 31) / 32 * 32;
  threads = threads < 32 ? 32 : threads > 1024 ? 1024 : threads;
  commit_tokens_kernel<<<1, unsigned(threads), 0, stream>>>(p);
  return cudaGetLastError();
}

// Grid (B), block kNgramThreads. Shapes as in NgramParams; an invalid n_tokens gives a row of -1.
__global__ void __launch_bounds__(kNgramThreads) ngram_propose_kernel(NgramParams p) {
  const int64_t b = blockIdx.x;
  if (b == 0) {  // one block writes the whole status word: the caller needs no memset
    int bad = 0;
    for (int64_t i = threadIdx.x; i < p.B; i += blockDim.x)
      bad |= !ngram_n_valid(p.n_tokens[i], p.C);
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) *p.status = bad ? int32_t(kNTokensOutOfRange) : 0;
  }
  const int64_t n = p.n_tokens[b];
  int64_t* out = p.drafts + b * (p.gamma + 1);
  if (!ngram_n_valid(n, p.C)) {  // block-uniform: nothing of the row is read
    for (int64_t k = threadIdx.x; k <= p.gamma; k += blockDim.x) out[k] = -1;
    return;
  }
  const int64_t* row = p.tokens + b * p.C;
  const int64_t top = ngram_top_size(p, n);
  const int64_t anchor = row[n - 1];
  // This thread's lexicographic maximum of (L(j), j) (dspark/state_ops.h) over its positions,
  // visited in decreasing j, so a strictly longer match is the only one that replaces the best.
  int64_t best_len = 0, best_j = -1;
  for (int64_t hi = n - 2; hi >= 0 && top >= p.min_ngram; hi -= kNgramThreads * kNgramPerThread) {
    int64_t last[kNgramPerThread];  // the token at each j first, all loads in flight together
#pragma unroll
    for (int i = 0; i < kNgramPerThread; ++i) {
      const int64_t j = hi - threadIdx.x - i * kNgramThreads;
      last[i] = j >= 0 ? row[j] : ~anchor;  // never the anchor
    }
#pragma unroll
    for (int i = 0; i < kNgramPerThread; ++i) {
      const int64_t j = hi - threadIdx.x - i * kNgramThreads;
      if (last[i] != anchor) continue;  // L(j) = 0 (also for j < 0)
      const int64_t len = ngram_match_length(row, j, n, top);
      if (len > best_len) best_len = len, best_j = j;
    }
    // A match of length top ends the scan: every later chunk has smaller positions.
    if (__syncthreads_or(best_len == top)) break;
  }
  const int64_t s = block_reduce(best_len, MaxOp{}, int64_t(0));
  const int64_t j = block_reduce(best_len == s ? best_j : int64_t(-1), MaxOp{}, int64_t(-1));
  const int64_t cont = ngram_continuation(s, j, n, p.min_ngram);
  for (int64_t k = threadIdx.x; k <= p.gamma; k += blockDim.x)
    out[k] = ngram_draft(row, n, cont, k);
}

// Host checks: B >= 1 (an empty batch launches nothing), gamma >= 1, 1 <= min_ngram <= max_ngram.
inline cudaError_t launch_ngram_propose(const NgramParams& p, cudaStream_t stream) {
  ngram_propose_kernel<<<unsigned(p.B), kNgramThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dspark
