// csrc/cuda/schedule_cuda.cpp: CUDA entry points of dspark::schedule_prefix and
// dspark::schedule_budget (tensors -> dspark/schedule.h parameters). Data checks run in the
// kernel, which writes the status word itself (no memset); like the other ops it is read back
// (a host sync) only with sync checks on and outside CUDA-graph capture. Without the read-back
// the kernel stays in bounds and defined (dspark/schedule.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "checks.h"
#include "cuda/launch_status.h"
#include "cuda/schedule_launch.h"
#include "schedule_checks.h"

namespace dspark {
namespace {

// The sorting modes' block size: the launcher's choice, or DSPARK_SCHEDULE_THREADS (a power
// of two in [32, 1024]; read per call) for A/B measurements (bench/bench_schedule.py
// --threads). The lengths are the same for any value.
int threads_override() {
  const char* env = std::getenv("DSPARK_SCHEDULE_THREADS");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long t = std::strtol(env, &end, 10);
  DSPARK_CHECK_VALUE(*end == '\0' && t >= 32 && t <= 1024 && (t & (t - 1)) == 0,
                     "DSPARK_SCHEDULE_THREADS must be a power of two in [32, 1024], got '", env,
                     "'");
  return int(t);
}

// DSPARK_SCHEDULE_SORT (read per call): "registers" or "group" forces that sort (the A/B of
// bench/bench_schedule.py --sorts); unset or "auto": the launcher's choice by key count.
ScheduleSort sort_choice() {
  const char* env = std::getenv("DSPARK_SCHEDULE_SORT");
  if (env == nullptr || *env == '\0') return ScheduleSort::kAuto;
  const std::string v(env);
  DSPARK_CHECK_VALUE(v == "auto" || v == "registers" || v == "group",
                     "DSPARK_SCHEDULE_SORT must be 'auto', 'registers' or 'group', got '", v, "'");
  return v == "registers" ? ScheduleSort::kRegisters
         : v == "group"   ? ScheduleSort::kGroup
                          : ScheduleSort::kAuto;
}

// Launches p (out set here) and, where allowed, raises on the kernel's status word.
void run(ScheduleParams& p, const at::Tensor& out, const char* op) {
  const int threads = threads_override();
  const ScheduleSort sort = sort_choice();
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor status = at::empty({1}, out.options().dtype(at::kInt));  // written by the kernel
  p.out = out.data_ptr<int64_t>();
  p.status = status.data_ptr<int32_t>();
  check_launch(launch_schedule(p, c10::cuda::getCurrentCUDAStream(), threads, sort), status, op,
               [op](int32_t s) { raise_on_schedule_status(s, op); });
}

at::Tensor schedule_prefix_cuda(const at::Tensor& confidences, const at::Tensor& draft_lengths,
                                const std::optional<at::Tensor>& sps, c10::string_view mode,
                                double threshold, const std::optional<at::Tensor>& budget) {
  ScheduleParams p =
      schedule_prefix_params(confidences, draft_lengths, sps, mode, threshold, budget);
  at::Tensor out = at::empty({p.R}, draft_lengths.options());
  run(p, out, "schedule_prefix");
  return out;
}

at::Tensor schedule_budget_cuda(const at::Tensor& confidences, const at::Tensor& draft_lengths,
                                const at::Tensor& sps) {
  ScheduleParams p = schedule_budget_params(confidences, draft_lengths, sps);
  at::Tensor out = at::empty({}, draft_lengths.options());
  run(p, out, "schedule_budget");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("schedule_prefix", &schedule_prefix_cuda);
  m.impl("schedule_budget", &schedule_budget_cuda);
}

}  // namespace dspark
