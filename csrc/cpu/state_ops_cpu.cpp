// csrc/cpu/state_ops_cpu.cpp: CPU kernels of dspark::commit_tokens and dspark::ngram_propose.
// Plain loops over the per-request rules of dspark/state_ops.h (the CUDA kernels apply the same
// rules). Bad data raises before anything is written, with the messages the CUDA path reads back.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dspark/state_ops.h"
#include "state_ops_checks.h"

namespace dspark {
namespace {

void commit_tokens_cpu(at::Tensor& tokens, at::Tensor& n_tokens, at::Tensor& active,
                       const at::Tensor& out_tokens, const at::Tensor& accept_count,
                       const at::Tensor& stop_tokens, const at::Tensor& prompt_lens,
                       const at::Tensor& max_new, at::Tensor& round_active,
                       at::Tensor& round_accepts, at::Tensor& rounds, at::Tensor& any_active) {
  CommitParams p =
      commit_tokens_params(tokens, n_tokens, active, out_tokens, accept_count, stop_tokens,
                           prompt_lens, max_new, round_active, round_accepts, rounds, any_active);
  for (int64_t b = 0; b < p.B; ++b)
    if (p.n_tokens[b] < 0) raise_on_state_status(kNegativeNTokens, "commit_tokens");
  const int64_t row = commit_log_row(*p.rounds, p.R);
  bool any = false;
  for (int64_t b = 0; b < p.B; ++b) {
    p.round_active[row * p.B + b] = p.active[b];  // active at the round's start
    p.round_accepts[row * p.B + b] = p.accept_count[b];
    any |= commit_request(p, b);
  }
  *p.rounds += 1;
  *p.any_active = any;
}

at::Tensor ngram_propose_cpu(const at::Tensor& tokens, const at::Tensor& n_tokens, int64_t gamma,
                             int64_t max_ngram, int64_t min_ngram) {
  NgramParams p = ngram_propose_params(tokens, n_tokens, gamma, max_ngram, min_ngram);
  at::Tensor drafts = at::empty({p.B, gamma + 1}, tokens.options());
  p.drafts = drafts.data_ptr<int64_t>();
  for (int64_t b = 0; b < p.B; ++b)
    if (!ngram_n_valid(p.n_tokens[b], p.C))
      raise_on_state_status(kNTokensOutOfRange, "ngram_propose");
  at::parallel_for(0, p.B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t n = p.n_tokens[b];
      const int64_t* row = p.tokens + b * p.C;
      // The lexicographic maximum of (L(j), j) (dspark/state_ops.h): from the end backwards,
      // a strictly longer match replaces the best; L(j) = top cannot be beaten.
      const int64_t top = ngram_top_size(p, n);
      int64_t best_len = 0, best_j = -1;
      for (int64_t j = n - 2; j >= 0 && best_len < top && top >= p.min_ngram; --j) {
        const int64_t len = ngram_match_length(row, j, n, top);
        if (len > best_len) best_len = len, best_j = j;
      }
      const int64_t cont = ngram_continuation(best_len, best_j, n, p.min_ngram);
      int64_t* out = p.drafts + b * (p.gamma + 1);
      for (int64_t k = 0; k <= p.gamma; ++k) out[k] = ngram_draft(row, n, cont, k);
    }
  });
  return drafts;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("commit_tokens", &commit_tokens_cpu);
  m.impl("ngram_propose", &ngram_propose_cpu);
}

}  // namespace dspark
