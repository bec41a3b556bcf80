// csrc/cuda/verify_cuda.cpp: CUDA entry points of dspark::verify and dspark::sample (sample is
// verify of root-only requests: one launch path serves both; by default the fused kernel,
// include/dspark/verify_fused.cuh, or the staged ones, include/dspark/verify.cuh).
// Tensors -> raw pointers; the kernels (include/dspark/verify.cuh) validate data on device and
// raise a status word; outside CUDA-graph capture it is read back and turned into a ValueError.
// During capture no host sync happens: bad data then yields -1 tokens, never an invalid access.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/launch_status.h"
#include "cuda/tensor_args.h"

namespace dspark {
namespace {

// The implementation this call runs: the switch (csrc/checks.h: cuda_verify_impl), unless the
// fused kernel's grid would not fit.
VerifyImpl pick_impl(int64_t R, int64_t W, int64_t V, bool has_q) {
  const VerifyImpl wanted = cuda_verify_impl() == 1 ? VerifyImpl::kStaged : VerifyImpl::kFused;
  return verify_impl_for(wanted, R, W, V, has_q);
}

// a.impl set: allocates the status word (the fused kernel's counters after it: the launch
// clears them) and the workspace in one buffer (one allocation, fewer cold pages on the fused
// kernel's latency chain), launches, and outside capture reads the status back.
void run_and_check(VerifyArgs& a, const at::Tensor& like, const char* op) {
  const int64_t control = (verify_control_words(a.impl, a.R) * 4 + 255) / 256 * 256;
  const int64_t bytes =
      control + static_cast<int64_t>(verify_workspace_bytes(a.impl, a.N, a.R, a.W, a.V));
  at::Tensor buffer = at::empty({bytes}, like.options().dtype(at::kByte));
  uint8_t* base = buffer.data_ptr<uint8_t>();
  a.status = reinterpret_cast<int32_t*>(base);
  a.workspace = base + control;
  check_launch(launch_verify(a, c10::cuda::getCurrentCUDAStream()),
               buffer.slice(0, 0, 4).view(at::kInt), op,
               [op](int32_t s) { raise_on_status(s, op); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_cuda(
    const at::Tensor& target_logits, const at::Tensor& node_offsets, const at::Tensor& draft_tokens,
    const at::Tensor& parents, const std::optional<at::Tensor>& draft_probs,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& positions,
    const std::optional<at::Tensor>& uniforms, int64_t max_nodes) {
  const auto d =
      check_verify_args(target_logits, node_offsets, draft_tokens, parents, draft_probs,
                        temperature, top_k, top_p, seeds, positions, uniforms, max_nodes);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  auto opts = draft_tokens.options();
  at::Tensor out_tokens = at::empty({d.R, d.W}, opts);
  at::Tensor out_count = at::empty({d.R}, opts);
  at::Tensor out_nodes = at::empty({d.R, d.W}, opts);
  VerifyArgs a{};
  a.logits = target_logits.data_ptr();
  a.logits_type = element_type(target_logits);
  a.draft_probs = draft_probs ? draft_probs->data_ptr() : nullptr;
  a.draft_type = !draft_probs                                ? DraftType::kNone
                 : draft_probs->scalar_type() == at::kDouble ? DraftType::kFloat64
                                                             : DraftType::kFloat32;
  a.N = d.N;
  a.V = d.V;
  a.R = d.R;
  a.W = d.W;
  a.offsets = node_offsets.data_ptr<int64_t>();
  a.tokens = draft_tokens.data_ptr<int64_t>();
  a.parents = parents.data_ptr<int64_t>();
  a.temperature = temperature.data_ptr<float>();
  a.top_k = top_k.data_ptr<int64_t>();
  a.top_p = top_p.data_ptr<float>();
  a.seeds = ptr_or_null<int64_t>(seeds);
  a.positions = ptr_or_null<int64_t>(positions);
  a.uniforms = ptr_or_null<double>(uniforms);
  a.out_tokens = out_tokens.data_ptr<int64_t>();
  a.out_count = out_count.data_ptr<int64_t>();
  a.out_nodes = out_nodes.data_ptr<int64_t>();
  a.impl = pick_impl(d.R, d.W, d.V, draft_probs.has_value());
  run_and_check(a, target_logits, "verify");
  return {out_tokens, out_count, out_nodes};
}

std::tuple<at::Tensor, at::Tensor> sample_cuda(const at::Tensor& logits,
                                               const at::Tensor& temperature,
                                               const at::Tensor& top_k, const at::Tensor& top_p,
                                               const std::optional<at::Tensor>& seeds,
                                               const std::optional<at::Tensor>& positions,
                                               const std::optional<at::Tensor>& uniforms,
                                               bool return_probs) {
  const auto d = check_sample_args(logits, temperature, top_k, top_p, seeds, positions, uniforms);
  const c10::cuda::CUDAGuard guard(logits.device());
  const VerifyImpl impl = pick_impl(d.R, 1, d.V, false);
  // A sample is verify of root-only requests: node r is request r's root, drawn with coin (r, 1).
  // The fused kernel reads them as such (no offsets, parents, tokens; uniforms [R]); the staged
  // kernels need them spelled out.
  auto lopts = logits.options().dtype(at::kLong);
  at::Tensor offsets, parents, tokens_in;
  std::optional<at::Tensor> u2;
  if (impl == VerifyImpl::kStaged) {
    offsets = at::arange(d.R + 1, lopts);
    parents = at::full({d.R}, -1, lopts);
    tokens_in = at::zeros({d.R}, lopts);
    if (uniforms) {
      u2 = at::zeros({d.R, 2}, uniforms->options());
      u2->select(1, 1).copy_(*uniforms);
    }
  }
  at::Tensor tokens = at::empty({d.R}, lopts);
  at::Tensor probs = at::empty({return_probs ? d.R : 0, d.V}, logits.options().dtype(at::kDouble));
  VerifyArgs a{};
  a.logits = logits.data_ptr();
  a.logits_type = element_type(logits);
  a.draft_type = DraftType::kNone;
  a.N = d.R;
  a.V = d.V;
  a.R = d.R;
  a.W = 1;
  a.impl = impl;
  if (impl == VerifyImpl::kStaged) {
    a.offsets = offsets.data_ptr<int64_t>();
    a.tokens = tokens_in.data_ptr<int64_t>();
    a.parents = parents.data_ptr<int64_t>();
    a.uniforms = ptr_or_null<double>(u2);
  } else {
    a.uniforms = ptr_or_null<double>(uniforms);
  }
  a.temperature = temperature.data_ptr<float>();
  a.top_k = top_k.data_ptr<int64_t>();
  a.top_p = top_p.data_ptr<float>();
  a.seeds = ptr_or_null<int64_t>(seeds);
  a.positions = ptr_or_null<int64_t>(positions);
  a.out_tokens = tokens.data_ptr<int64_t>();
  a.probs = return_probs ? probs.data_ptr<double>() : nullptr;
  run_and_check(a, logits, "sample");
  return {tokens, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("verify", &verify_cuda);
  m.impl("sample", &sample_cuda);
}

}  // namespace dspark
