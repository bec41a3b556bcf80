// csrc/cpu/schedule_cpu.cpp: CPU kernels of dspark::schedule_prefix and dspark::schedule_budget.
// Plain loops over the rules of dspark/schedule.h (the CUDA kernel applies the same rules, so
// both return the same lengths bit for bit). Bad data raises with the messages the CUDA path
// reads back.
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dspark/schedule.h"
#include "schedule_checks.h"

namespace dspark {
namespace {

void raise_on_bad_data(const ScheduleParams& p, const char* op) {
  int32_t status = 0;
  for (int64_t r = 0; r < p.R; ++r) status |= schedule_request_status(p, r);
  if (p.sps != nullptr)
    for (int64_t b = 0; b < p.Bmax; ++b)
      if (!sps_entry_valid(p.sps[b])) status |= kBadSps;
  raise_on_schedule_status(status, op);
}

// Every mode: lengths into p.out[0, R), or the budget into p.out[0] (valid data).
void schedule_cpu(const ScheduleParams& p) {
  if (!schedule_mode_sorts(p.mode)) {
    for (int64_t r = 0; r < p.R; ++r) p.out[r] = unranked_length(p, r);
    return;
  }
  std::vector<uint64_t> keys(size_t(p.R * p.gamma));
  int64_t M = 0;  // candidates
  for (int64_t r = 0; r < p.R; ++r) M += request_keys(p, r, keys.data() + r * p.gamma);
  std::sort(keys.begin(), keys.end());  // unique keys: the candidates first, in rank order
  int64_t n_star = 0;                   // admitted: the first n_star ranked candidates
  int64_t tau = p.R * kScheduleOne;     // before the first candidate
  if (p.mode == kScheduleAsync) {
    n_star = std::clamp<int64_t>(*p.budget, 0, M);
  } else if (p.mode == kScheduleSync) {
    n_star = M;
    for (int64_t i = 0; i < M; ++i) {
      const int64_t q = key_survival(keys[size_t(i)]);
      tau += q;
      if (sync_stops(p, i + 1, tau, q)) {
        n_star = i;
        break;
      }
    }
  } else {  // kScheduleBudget: the first argmax of Theta over the whole path
    double best = budget_theta(p, 0, tau);
    int64_t best_n = 0;
    for (int64_t i = 0; i < M; ++i) {
      tau += key_survival(keys[size_t(i)]);
      const double theta = budget_theta(p, i + 1, tau);
      if (theta > best) best = theta, best_n = i + 1;
    }
    p.out[0] = best >= 0.0 ? best_n : 0;
    return;
  }
  for (int64_t r = 0; r < p.R; ++r)
    p.out[r] = n_star >= 1 ? admitted_length(p, r, keys[size_t(n_star - 1)]) : 0;
}

at::Tensor schedule_prefix_cpu(const at::Tensor& confidences, const at::Tensor& draft_lengths,
                               const std::optional<at::Tensor>& sps, c10::string_view mode,
                               double threshold, const std::optional<at::Tensor>& budget) {
  ScheduleParams p =
      schedule_prefix_params(confidences, draft_lengths, sps, mode, threshold, budget);
  at::Tensor out = at::empty({p.R}, draft_lengths.options());
  p.out = out.data_ptr<int64_t>();
  raise_on_bad_data(p, "schedule_prefix");
  schedule_cpu(p);
  return out;
}

at::Tensor schedule_budget_cpu(const at::Tensor& confidences, const at::Tensor& draft_lengths,
                               const at::Tensor& sps) {
  ScheduleParams p = schedule_budget_params(confidences, draft_lengths, sps);
  at::Tensor out = at::empty({}, draft_lengths.options());
  p.out = out.data_ptr<int64_t>();
  raise_on_bad_data(p, "schedule_budget");
  schedule_cpu(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("schedule_prefix", &schedule_prefix_cpu);
  m.impl("schedule_budget", &schedule_budget_cpu);
}

}  // namespace dspark
