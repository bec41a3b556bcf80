// csrc/state_ops_checks.cpp: every caller error of the state ops names the argument.
#include "state_ops_checks.h"

#include <string>

#include "checks.h"

namespace dspark {
namespace {

// dtype, device (that of `tokens`, which every state tensor shares) and contiguity.
void check_like_tokens(const at::Tensor& tokens, const at::Tensor& t, at::ScalarType dtype,
                       const char* name) {
  DSPARK_CHECK_DTYPE(t, dtype, name);
  DSPARK_CHECK(t.device() == tokens.device(), name, " must be on ", tokens.device(),
               " like tokens, got ", t.device());
  DSPARK_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A [B] vector (per-request value) of the given dtype.
void check_per_request(const at::Tensor& tokens, const at::Tensor& t, at::ScalarType dtype,
                       const char* name) {
  DSPARK_CHECK_DIM(t, 1, name);
  DSPARK_CHECK_SIZE(t, 0, tokens.size(0), name);
  check_like_tokens(tokens, t, dtype, name);
}

void check_tokens(const at::Tensor& tokens) {
  DSPARK_CHECK_DIM(tokens, 2, "tokens");
  check_like_tokens(tokens, tokens, at::kLong, "tokens");
  DSPARK_CHECK_VALUE(tokens.size(1) >= 1,
                     "tokens must have at least one column (capacity C >= 1), "
                     "got shape ",
                     tokens.sizes());
}

}  // namespace

CommitParams commit_tokens_params(const at::Tensor& tokens, const at::Tensor& n_tokens,
                                  const at::Tensor& active, const at::Tensor& out_tokens,
                                  const at::Tensor& accept_count, const at::Tensor& stop_tokens,
                                  const at::Tensor& prompt_lens, const at::Tensor& max_new,
                                  const at::Tensor& round_active, const at::Tensor& round_accepts,
                                  const at::Tensor& rounds, const at::Tensor& any_active) {
  check_tokens(tokens);
  const int64_t B = tokens.size(0);
  check_per_request(tokens, n_tokens, at::kLong, "n_tokens");
  check_per_request(tokens, active, at::kBool, "active");
  check_per_request(tokens, accept_count, at::kLong, "accept_count");
  check_per_request(tokens, prompt_lens, at::kLong, "prompt_lens");
  check_per_request(tokens, max_new, at::kLong, "max_new");
  for (const auto& [t, name] :
       {std::pair{out_tokens, "out_tokens"}, std::pair{stop_tokens, "stop_tokens"}}) {
    DSPARK_CHECK_DIM(t, 2, name);
    DSPARK_CHECK_SIZE(t, 0, B, name);
    check_like_tokens(tokens, t, at::kLong, name);
  }
  DSPARK_CHECK_VALUE(out_tokens.size(1) >= 1,
                     "out_tokens must have at least one column "
                     "(W >= 1: the bonus token), got shape ",
                     out_tokens.sizes());
  for (const auto& [t, name, dtype] : {std::tuple{round_active, "round_active", at::kBool},
                                       std::tuple{round_accepts, "round_accepts", at::kLong}}) {
    DSPARK_CHECK_DIM(t, 2, name);
    DSPARK_CHECK_SIZE(t, 1, B, name);
    check_like_tokens(tokens, t, dtype, name);
  }
  DSPARK_CHECK_VALUE(round_active.size(0) >= 1,
                     "round_active must have at least one row "
                     "(Rmax >= 1), got shape ",
                     round_active.sizes());
  DSPARK_CHECK(round_accepts.size(0) == round_active.size(0), "round_accepts must have shape [",
               round_active.size(0), ", ", B, "] like round_active, got ", round_accepts.sizes());
  for (const auto& [t, name, dtype] :
       {std::tuple{rounds, "rounds", at::kLong}, std::tuple{any_active, "any_active", at::kBool}}) {
    DSPARK_CHECK(t.dim() == 0, name, " must be a 0-D tensor, got shape ", t.sizes());
    check_like_tokens(tokens, t, dtype, name);
  }
  CommitParams p{};
  p.tokens = tokens.data_ptr<int64_t>();
  p.n_tokens = n_tokens.data_ptr<int64_t>();
  p.active = active.data_ptr<bool>();
  p.out_tokens = out_tokens.data_ptr<int64_t>();
  p.accept_count = accept_count.data_ptr<int64_t>();
  p.stop_tokens = stop_tokens.data_ptr<int64_t>();
  p.prompt_lens = prompt_lens.data_ptr<int64_t>();
  p.max_new = max_new.data_ptr<int64_t>();
  p.round_active = round_active.data_ptr<bool>();
  p.round_accepts = round_accepts.data_ptr<int64_t>();
  p.rounds = rounds.data_ptr<int64_t>();
  p.any_active = any_active.data_ptr<bool>();
  p.B = B;
  p.C = tokens.size(1);
  p.W = out_tokens.size(1);
  p.S = stop_tokens.size(1);
  p.R = round_active.size(0);
  return p;
}

NgramParams ngram_propose_params(const at::Tensor& tokens, const at::Tensor& n_tokens,
                                 int64_t gamma, int64_t max_ngram, int64_t min_ngram) {
  check_tokens(tokens);
  check_per_request(tokens, n_tokens, at::kLong, "n_tokens");
  DSPARK_CHECK_VALUE(gamma >= 1 && gamma <= kNgramMaxGamma, "gamma must be in [1, ", kNgramMaxGamma,
                     "] (drafts per request; verify takes chains of at most ", kNgramMaxGamma + 1,
                     " nodes), got ", gamma);
  DSPARK_CHECK_VALUE(min_ngram >= 1 && min_ngram <= max_ngram,
                     "need 1 <= min_ngram <= max_ngram, got min_ngram ", min_ngram, ", max_ngram ",
                     max_ngram);
  NgramParams p{};
  p.tokens = tokens.data_ptr<int64_t>();
  p.n_tokens = n_tokens.data_ptr<int64_t>();
  p.B = tokens.size(0);
  p.C = tokens.size(1);
  p.gamma = gamma;
  p.max_ngram = max_ngram;
  p.min_ngram = min_ngram;
  return p;
}

void raise_on_state_status(int32_t status, const char* op) {
  if (status == 0) return;
  std::string msg = std::string("dspark::") + op + ": bad input:";
  if (status & kNegativeNTokens) msg += " n_tokens must be >= 0;";
  if (status & kNTokensOutOfRange)
    msg += " n_tokens must lie in [1, C] (a request's anchor is its last committed token);";
  msg.pop_back();
  TORCH_CHECK_VALUE(false, msg);  // a single std::string: no stream formatting
}

}  // namespace dspark
