// csrc/cuda/kv_commit_cuda.cpp: CUDA entry point of dspark::kv_commit (tensors ->
// dspark/kv_commit.h parameters). Data checks run in the kernel, which writes the status word
// itself (no memset); like the other ops it is read back (a host sync) only with sync checks on
// and outside CUDA-graph capture. Without the read-back the kernel stays in bounds: an invalid
// request is not touched and gets length -1 and no freed pages.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/kv_commit_launch.h"
#include "cuda/launch_status.h"
#include "kv_commit_checks.h"

namespace dspark {
namespace {

// Shapes as in csrc/cpu/kv_commit_cpu.cpp.
std::tuple<at::Tensor, at::Tensor> kv_commit_cuda(at::Tensor& k_cache, at::Tensor& v_cache,
                                                  const at::Tensor& start,
                                                  const at::Tensor& accept_nodes,
                                                  const at::Tensor& accept_count,
                                                  const at::Tensor& node_offsets,
                                                  const std::optional<at::Tensor>& block_table) {
  KvCommitParams p = kv_commit_params(k_cache, v_cache, start, accept_nodes, accept_count,
                                      node_offsets, block_table);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  auto outputs = kv_commit_outputs(p, k_cache, block_table);
  if (p.B == 0) return outputs;  // no block would write the status word
  at::Tensor status = at::empty({1}, k_cache.options().dtype(at::kInt));  // written by the kernel
  p.status = status.data_ptr<int32_t>();
  check_launch(launch_kv_commit(p, c10::cuda::getCurrentCUDAStream()), status, "kv_commit",
               raise_on_kv_status);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("kv_commit", &kv_commit_cuda); }

}  // namespace dspark
