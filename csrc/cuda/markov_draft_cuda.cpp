// csrc/cuda/markov_draft_cuda.cpp: CUDA entry point of dspark::markov_draft (tensors -> raw
// pointers; kernels: include/dspark/markov_draft.cuh). The kernels validate data on device and
// raise a status word; outside CUDA-graph capture, with sync checks on, it is read back and turned
// into a ValueError. Without the read-back the kernels stay in bounds: a request with a bad
// anchor, bad parameters or an empty logits row gets -1 tokens from there on.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "checks.h"
#include "cuda/launch_status.h"
#include "cuda/markov_draft_launch.h"
#include "cuda/tensor_args.h"
#include "markov_checks.h"

namespace dspark {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> markov_draft_cuda(
    const at::Tensor& base_logits, const at::Tensor& anchors, const at::Tensor& w1,
    const at::Tensor& w2, const std::optional<at::Tensor>& hidden,
    const std::optional<at::Tensor>& conf_weight, const std::optional<at::Tensor>& conf_bias,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& seeds, const at::Tensor& positions, bool return_probs) {
  const MarkovDims d =
      check_markov_draft_args(base_logits, anchors, w1, w2, hidden, conf_weight, conf_bias,
                              temperature, top_k, top_p, seeds, positions);
  const c10::cuda::CUDAGuard guard(base_logits.device());
  at::Tensor tokens = at::empty({d.R, d.G}, anchors.options());
  at::Tensor conf = at::empty({d.conf ? d.R : 0, d.G}, base_logits.options().dtype(at::kFloat));
  at::Tensor probs =
      at::empty({return_probs ? d.R : 0, d.G, d.V}, base_logits.options().dtype(at::kDouble));
  if (d.R == 0) return {tokens, conf, probs};
  at::Tensor workspace = at::empty({static_cast<int64_t>(markov_workspace_bytes(d.R, d.G, d.V))},
                                   base_logits.options().dtype(at::kByte));
  at::Tensor status = at::empty({1}, base_logits.options().dtype(at::kInt));
  MarkovArgs a{};
  a.base_logits = base_logits.data_ptr();
  a.w1 = w1.data_ptr();
  a.w2 = w2.data_ptr();
  a.hidden = ptr_or_null(hidden);
  a.conf_weight = ptr_or_null(conf_weight);
  a.conf_bias = ptr_or_null(conf_bias);
  a.anchors = anchors.data_ptr<int64_t>();
  a.temperature = temperature.data_ptr<float>();
  a.top_k = top_k.data_ptr<int64_t>();
  a.top_p = top_p.data_ptr<float>();
  a.seeds = seeds.data_ptr<int64_t>();
  a.positions = positions.data_ptr<int64_t>();
  a.tokens = tokens.data_ptr<int64_t>();
  a.conf_logits = d.conf ? conf.data_ptr<float>() : nullptr;
  a.probs = return_probs ? probs.data_ptr<double>() : nullptr;
  a.status = status.data_ptr<int32_t>();
  a.workspace = workspace.data_ptr();
  a.R = d.R, a.G = d.G, a.V = d.V, a.rank = d.rank, a.d = d.d;
  // DSPARK_MARKOV_PDL=off: plain stream order between the steps' kernels (A/B; the same bits)
  const char* env = std::getenv("DSPARK_MARKOV_PDL");
  const std::string pdl = env ? env : "";
  DSPARK_CHECK_VALUE(pdl.empty() || pdl == "on" || pdl == "off",
                     "DSPARK_MARKOV_PDL must be on or off, got '", pdl, "'");
  a.pdl = pdl != "off";
  a.logits_type = element_type(base_logits);
  a.weight_type = element_type(w1);
  check_launch(launch_markov_draft(a, c10::cuda::getCurrentCUDAStream()), status, "markov_draft",
               raise_on_markov_status);
  return {tokens, conf, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("markov_draft", &markov_draft_cuda); }

}  // namespace dspark
