// csrc/schedule_checks.cpp: every caller error of the prefix scheduler names the argument.
#include "schedule_checks.h"

#include <string>

#include "checks.h"

namespace dspark {
namespace {

int32_t parse_mode(std::string_view mode) {
  if (mode == "sync") return kScheduleSync;
  if (mode == "async") return kScheduleAsync;
  if (mode == "threshold") return kScheduleThreshold;
  if (mode == "fixed") return kScheduleFixed;
  DSPARK_CHECK_VALUE(false, "mode must be one of 'sync', 'async', 'threshold', 'fixed', got '",
                     std::string(mode), "'");
  return -1;
}

void check_like_confidences(const at::Tensor& conf, const at::Tensor& t, at::ScalarType dtype,
                            const char* name) {
  DSPARK_CHECK_DTYPE(t, dtype, name);
  DSPARK_CHECK(t.device() == conf.device(), name, " must be on ", conf.device(),
               " like confidences, got ", t.device());
  DSPARK_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// confidences [R, gamma] f32, draft_lengths [R] i64, sps [Bmax >= 1] f32 (if given).
ScheduleParams common_params(const at::Tensor& conf, const at::Tensor& lengths,
                             const at::Tensor* sps) {
  DSPARK_CHECK_DIM(conf, 2, "confidences");
  check_like_confidences(conf, conf, at::kFloat, "confidences");
  const int64_t R = conf.size(0), gamma = conf.size(1);
  DSPARK_CHECK_VALUE(gamma <= kScheduleMaxGamma, "confidences must have at most ",
                     kScheduleMaxGamma, " columns (gamma), got shape ", conf.sizes());
  DSPARK_CHECK_VALUE(R <= kScheduleMaxRequests, "confidences must have at most ",
                     kScheduleMaxRequests, " rows (requests), got shape ", conf.sizes());
  DSPARK_CHECK_VALUE(R * gamma <= kScheduleMaxCandidates,
                     "confidences must have at most R * gamma = ", kScheduleMaxCandidates,
                     " entries (one CUDA block ranks them), got shape ", conf.sizes());
  DSPARK_CHECK_DIM(lengths, 1, "draft_lengths");
  DSPARK_CHECK_SIZE(lengths, 0, R, "draft_lengths");
  check_like_confidences(conf, lengths, at::kLong, "draft_lengths");
  ScheduleParams p{};
  p.confidences = conf.data_ptr<float>();
  p.draft_lengths = lengths.data_ptr<int64_t>();
  p.R = R;
  p.gamma = gamma;
  if (sps != nullptr) {
    DSPARK_CHECK_DIM(*sps, 1, "sps");
    check_like_confidences(conf, *sps, at::kFloat, "sps");
    DSPARK_CHECK_VALUE(sps->size(0) >= 1,
                       "sps must have at least one entry (SPS of a 1-token verify), got shape ",
                       sps->sizes());
    p.sps = sps->data_ptr<float>();
    p.Bmax = sps->size(0);
  }
  return p;
}

}  // namespace

ScheduleParams schedule_prefix_params(const at::Tensor& confidences,
                                      const at::Tensor& draft_lengths,
                                      const std::optional<at::Tensor>& sps, std::string_view mode,
                                      double threshold, const std::optional<at::Tensor>& budget) {
  const int32_t m = parse_mode(mode);
  ScheduleParams p =
      common_params(confidences, draft_lengths, sps.has_value() ? &sps.value() : nullptr);
  p.mode = m;
  DSPARK_CHECK_VALUE(threshold >= 0.0 && threshold <= 1.0, "threshold must lie in [0, 1], got ",
                     std::to_string(threshold));
  p.threshold = threshold;
  DSPARK_CHECK_VALUE(m != kScheduleSync || sps.has_value(),
                     "sps (the steps-per-second table) is required in sync mode");
  if (m == kScheduleAsync) {
    DSPARK_CHECK_VALUE(budget.has_value(),
                       "budget (a 0-D int64 tensor, from schedule_budget) is required in async "
                       "mode");
    DSPARK_CHECK(budget->dim() == 0, "budget must be a 0-D tensor, got shape ", budget->sizes());
    check_like_confidences(confidences, *budget, at::kLong, "budget");
    p.budget = budget->data_ptr<int64_t>();
  }
  return p;
}

ScheduleParams schedule_budget_params(const at::Tensor& confidences,
                                      const at::Tensor& draft_lengths, const at::Tensor& sps) {
  ScheduleParams p = common_params(confidences, draft_lengths, &sps);
  p.mode = kScheduleBudget;
  return p;
}

void raise_on_schedule_status(int32_t status, const char* op) {
  if (status == 0) return;
  std::string msg = std::string("dspark::") + op + ": bad input:";
  if (status & kBadConfidence)
    msg += " confidences must lie in [0, 1] (no NaN) within each request's draft length;";
  if (status & kBadDraftLength) msg += " draft_lengths must lie in [0, gamma];";
  if (status & kBadSps) msg += " sps entries must be finite and > 0;";
  msg.pop_back();
  TORCH_CHECK_VALUE(false, msg);  // a single std::string: no stream formatting
}

}  // namespace dspark
