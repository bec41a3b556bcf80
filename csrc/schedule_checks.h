// csrc/schedule_checks.h: argument checks of dspark::schedule_prefix and dspark::schedule_budget
// (metadata and scalars: dtypes, shapes, devices, contiguity, mode, threshold), the kernels'
// parameters bound to the checked tensors, and the messages of their data errors.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "dspark/schedule.h"

namespace dspark {

// Checks the arguments of schedule_prefix; returns the kernel's parameters but out and status
// (the caller's, after allocating them).
ScheduleParams schedule_prefix_params(const at::Tensor& confidences,
                                      const at::Tensor& draft_lengths,
                                      const std::optional<at::Tensor>& sps, std::string_view mode,
                                      double threshold, const std::optional<at::Tensor>& budget);

// Checks the arguments of schedule_budget; returns the kernel's parameters (mode kScheduleBudget)
// but out and status.
ScheduleParams schedule_budget_params(const at::Tensor& confidences,
                                      const at::Tensor& draft_lengths, const at::Tensor& sps);

// Turns a scheduler status word (ScheduleStatusBit flags) into a ValueError naming the argument.
void raise_on_schedule_status(int32_t status, const char* op);

}  // namespace dspark
