// dspark/state_ops.h: the per-request rules of dspark::commit_tokens and dspark::ngram_propose,
// shared by the CPU loops (csrc/cpu/state_ops_cpu.cpp) and the CUDA kernels
// (dspark/state_ops.cuh), so both backends follow one definition. No torch, no CUDA headers.
//
// The executable spec is dspark/reference.py (commit_tokens, ngram_propose): the engine's
// SpecState.append + log_round and NgramDrafter.propose, written as functions of tensors.
#pragma once
#include <cstdint>

#include "dspark/common.h"

namespace dspark {

// Bits of the state ops' status word (their own word: these ops raise no sampling errors).
// The CPU computes the same word and raises on it (csrc/state_ops_checks.cpp has the messages).
enum StateStatusBit : int32_t {
  kNegativeNTokens = 1 << 0,    // commit_tokens: n_tokens < 0
  kNTokensOutOfRange = 1 << 1,  // ngram_propose: n_tokens outside [1, C]
};

// dspark::commit_tokens. B requests, capacity C, W = out_tokens' width, S stop tokens per
// request, R = rows of the round log. Every array is contiguous, row-major.
struct CommitParams {
  int64_t* tokens;              // [B, C] committed tokens (updated)
  int64_t* n_tokens;            // [B] (updated)
  bool* active;                 // [B] (updated)
  const int64_t* out_tokens;    // [B, W] accepted drafts, then the bonus; -1 padded
  const int64_t* accept_count;  // [B]
  const int64_t* stop_tokens;   // [B, S] -1 padded
  const int64_t* prompt_lens;   // [B]
  const int64_t* max_new;       // [B]
  bool* round_active;           // [R, B] row min(rounds, R - 1) <- active before the commit
  int64_t* round_accepts;       // [R, B] same row <- accept_count
  int64_t* rounds;              // [] (incremented)
  bool* any_active;             // [] <- any(active) after the commit
  int32_t* status;              // [] StateStatusBit flags
  int64_t B, C, W, S, R;
};

// The round-log row a commit writes: min(rounds, R - 1); a negative counter (never produced by
// the engine) logs to row 0 rather than outside the log.
DSPARK_HD int64_t commit_log_row(int64_t rounds, int64_t R) {
  return rounds < 0 ? 0 : rounds > R - 1 ? R - 1 : rounds;
}

// Commits request b (the round log is the caller's: it needs the counter before any increment)
// and returns whether b is active afterwards.
//   add = accept_count + 1 for an active request (else 0), clamped to [0, W]: counts outside
//   [0, W - 1] never come from verify; clamping keeps every backend in bounds and identical.
//   tokens[b, min(n + k, C - 1)] = out_tokens[b, k] for k < add, in increasing k (should
//   several k clamp onto slot C - 1, the last one wins; the engine sizes C so none do).
//   A stop token among the kept ones, or n + add - prompt_len >= max_new, ends the request.
// n_tokens < 0 is invalid (the reference's gather raises): the request is left untouched.
DSPARK_HD bool commit_request(const CommitParams& p, int64_t b) {
  const bool was_active = p.active[b];
  const int64_t n = p.n_tokens[b];
  if (n < 0) return was_active;
  int64_t add = was_active ? p.accept_count[b] + 1 : 0;
  add = add < 0 ? 0 : add > p.W ? p.W : add;
  int64_t* row = p.tokens + b * p.C;
  const int64_t* out = p.out_tokens + b * p.W;
  const int64_t* stops = p.stop_tokens + b * p.S;
  bool stop = false;
  for (int64_t k = 0; k < add; ++k) {
    const int64_t slot = n + k < p.C - 1 ? n + k : p.C - 1;
    row[slot] = out[k];
    // -1 padding is compared too, as in the reference (kept tokens are real ids, never -1).
    for (int64_t s = 0; s < p.S; ++s) stop |= out[k] == stops[s];
  }
  const int64_t n_new = n + add;
  p.n_tokens[b] = n_new;
  const bool now_active = was_active && !stop && n_new - p.prompt_lens[b] < p.max_new[b];
  p.active[b] = now_active;
  return now_active;
}

// dspark::ngram_propose. B requests, capacity C; drafts [B, gamma + 1].
// gamma's bound: a chain of gamma + 1 nodes is the most dspark::verify takes (max_nodes <= 4096);
// it also keeps a mistyped gamma from sizing a [B, gamma + 1] output of terabytes.
constexpr int64_t kNgramMaxGamma = 4095;
struct NgramParams {
  const int64_t* tokens;    // [B, C]: request b's committed tokens are tokens[b, :n_tokens[b]]
  const int64_t* n_tokens;  // [B], valid in [1, C]
  int64_t* drafts;          // [B, gamma + 1]: the anchor tokens[b, n - 1], then gamma drafts
  int32_t* status;          // [] StateStatusBit flags
  int64_t B, C, gamma, max_ngram, min_ngram;
};

// A request's anchor is tokens[b, n - 1]: n must lie in [1, C].
DSPARK_HD bool ngram_n_valid(int64_t n, int64_t C) { return n >= 1 && n <= C; }

// One pass instead of one per size. The reference tries size = max_ngram .. min_ngram and takes
// the first size whose suffix tokens[n - size, n) occurs earlier, at the largest window start
// `begin` (with begin + size < n), continuing at begin + size. Index the windows by their last
// position j = begin + size - 1 in [0, n - 2] and let L(j) be how many tokens ending at j equal
// those ending at the anchor n - 1 (capped at `top`, below). The window of size s ending at j
// matches iff L(j) >= s, so the winning size is s* = max_j L(j) (if >= min_ngram), and its most
// recent occurrence ends at the largest j with L(j) = s*: cont = j + 1. So each backend finds
// the lexicographic maximum of (L(j), j) and stops early once L(j) = top.

// Largest size that can match: sizes >= C are skipped (the reference's `size >= C: continue`),
// and a size >= n has no window that ends before the anchor.
DSPARK_HD int64_t ngram_top_size(const NgramParams& p, int64_t n) {
  int64_t top = p.max_ngram;
  if (top > p.C - 1) top = p.C - 1;
  if (top > n - 1) top = n - 1;
  return top;
}

// L(j): the common length (at most top) of the token runs ending at j and at the anchor n - 1.
DSPARK_HD int64_t ngram_match_length(const int64_t* row, int64_t j, int64_t n, int64_t top) {
  int64_t len = 0;
  while (len < top && len <= j && row[j - len] == row[n - 1 - len]) ++len;
  return len;
}

// Where the drafts continue, given the maximal L(j) and the largest j attaining it: after that
// occurrence if it is long enough, else at the anchor itself (no match: the anchor repeats).
DSPARK_HD int64_t ngram_continuation(int64_t best_len, int64_t best_j, int64_t n,
                                     int64_t min_ngram) {
  return best_len >= min_ngram ? best_j + 1 : n - 1;
}

// Column k of a request's drafts row, given its continuation start `cont` (n - 1 without a
// match): the anchor at k = 0, then the tokens from cont on, repeated with period n - cont.
DSPARK_HD int64_t ngram_draft(const int64_t* row, int64_t n, int64_t cont, int64_t k) {
  return k == 0 ? row[n - 1] : row[cont + (k - 1) % (n - cont)];
}

}  // namespace dspark
