// csrc/cuda/state_ops_cuda.cpp: CUDA entry points of dspark::commit_tokens and
// dspark::ngram_propose (tensors -> dspark/state_ops.h parameter structs). Data checks run in the
// kernels, which write a status word themselves (no memset); like verify/sample/decode_attention
// it is read back (a host sync) only with sync checks on and outside CUDA-graph capture. Without
// the read-back the kernels stay in bounds: a commit skips a request with n_tokens < 0, and
// ngram_propose returns a row of -1 for n_tokens outside [1, C].
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch_status.h"
#include "cuda/state_ops_launch.h"
#include "state_ops_checks.h"

namespace dspark {
namespace {

// The launch error, then (sync checks on, no capture) the status word: dspark::check_launch.
void check_state_launch(cudaError_t err, const at::Tensor& status, const char* op) {
  check_launch(err, status, op, [op](int32_t s) { raise_on_state_status(s, op); });
}

void commit_tokens_cuda(at::Tensor& tokens, at::Tensor& n_tokens, at::Tensor& active,
                        const at::Tensor& out_tokens, const at::Tensor& accept_count,
                        const at::Tensor& stop_tokens, const at::Tensor& prompt_lens,
                        const at::Tensor& max_new, at::Tensor& round_active,
                        at::Tensor& round_accepts, at::Tensor& rounds, at::Tensor& any_active) {
  CommitParams p =
      commit_tokens_params(tokens, n_tokens, active, out_tokens, accept_count, stop_tokens,
                           prompt_lens, max_new, round_active, round_accepts, rounds, any_active);
  const c10::cuda::CUDAGuard guard(tokens.device());
  // Launched for B = 0 too: the round counter and any_active are still updated.
  at::Tensor status = at::empty({1}, tokens.options().dtype(at::kInt));  // written by the kernel
  p.status = status.data_ptr<int32_t>();
  check_state_launch(launch_commit_tokens(p, c10::cuda::getCurrentCUDAStream()), status,
                     "commit_tokens");
}

at::Tensor ngram_propose_cuda(const at::Tensor& tokens, const at::Tensor& n_tokens, int64_t gamma,
                              int64_t max_ngram, int64_t min_ngram) {
  NgramParams p = ngram_propose_params(tokens, n_tokens, gamma, max_ngram, min_ngram);
  const c10::cuda::CUDAGuard guard(tokens.device());
  at::Tensor drafts = at::empty({p.B, gamma + 1}, tokens.options());
  if (p.B == 0) return drafts;  // no block would write the status word
  at::Tensor status = at::empty({1}, tokens.options().dtype(at::kInt));  // written by the kernel
  p.drafts = drafts.data_ptr<int64_t>();
  p.status = status.data_ptr<int32_t>();
  check_state_launch(launch_ngram_propose(p, c10::cuda::getCurrentCUDAStream()), status,
                     "ngram_propose");
  return drafts;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("commit_tokens", &commit_tokens_cuda);
  m.impl("ngram_propose", &ngram_propose_cuda);
}

}  // namespace dspark
