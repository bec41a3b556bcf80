// dspark/schedule.h: the rules of dspark::schedule_prefix and dspark::schedule_budget (the prefix
// scheduler, docs/method.md "Scheduling"), shared by the CPU loops (csrc/cpu/schedule_cpu.cpp)
// and the CUDA kernel (dspark/schedule.cuh) so both follow one definition. No torch, no CUDA
// headers. The executable spec is dspark/reference.py (schedule_prefix, schedule_budget).
//
// NOTE(exactness): every backend must pick the same lengths, so each quantity is defined bit for
// bit and independent of the summation order:
//   a_{r,j}  = a_{r,j-1} * double(c_{r,j})  in float64, left to right (a_{r,-1} = 1)
//   q_{r,j}  = floor(a_{r,j} * 2^44)        int64; a candidate iff j < draft_lengths[r], q >= 1
//   tau_n    = (R + sum of the n first candidates' q) in units of 2^-44: int64, exact in any order
//   Theta_n  = (double(tau_n) * 2^-44) * double(SPS[R + n - 1])   two roundings, no FMA
// Candidates are ranked by one 64-bit key, ascending: (2^44 - q, j, r). Keys are unique, and a
// request's keys increase with j (q never increases: c <= 1, and ties go to the smaller j), so
// every prefix of the ranking is prefix-closed per request.
#pragma once
#include <cstdint>

#include "dspark/common.h"

namespace dspark {

// Bits of the scheduler's status word (its own word). The CPU computes the same word and raises
// on it (csrc/schedule_checks.cpp has the messages).
enum ScheduleStatusBit : int32_t {
  kBadConfidence = 1 << 0,   // a confidence within a request's draft length outside [0, 1]/NaN
  kBadDraftLength = 1 << 1,  // draft_lengths outside [0, gamma]
  kBadSps = 1 << 2,          // an SPS entry <= 0, NaN or inf
};

// What the kernel computes: the four modes of schedule_prefix, and schedule_budget.
enum ScheduleMode : int32_t {
  kScheduleSync = 0,       // Algorithm 1: greedy admission, stop at the first non-improvement
  kScheduleAsync = 1,      // the top `budget` candidates, no stop
  kScheduleThreshold = 2,  // the leading drafts with c >= threshold
  kScheduleFixed = 3,      // every draft
  kScheduleBudget = 4,     // schedule_budget: argmax of Theta over the whole greedy path
};

constexpr int kScheduleFracBits = 44;  // survival a in units of 2^-44
constexpr int kScheduleRequestBits = 14;
constexpr int kSchedulePosBits = 5;
constexpr int64_t kScheduleOne = int64_t(1) << kScheduleFracBits;             // a = 1
constexpr double kScheduleScale = 17592186044416.0;                           // 2^44
constexpr double kScheduleUnit = 1.0 / kScheduleScale;                        // 2^-44 (exact)
constexpr int64_t kScheduleMaxGamma = int64_t(1) << kSchedulePosBits;         // 32
constexpr int64_t kScheduleMaxRequests = int64_t(1) << kScheduleRequestBits;  // 16384
// R * gamma: one CUDA block sorts every candidate key in shared memory (8 bytes each, 128 KB).
// The int64 sums stay below (R + R * gamma) * 2^44 <= 2^59.
constexpr int64_t kScheduleMaxCandidates = 16384;

constexpr uint64_t kNoCandidate = ~uint64_t(0);  // sorts after every real key

// Which bitonic sort the CUDA kernel runs (dspark/schedule.cuh; the lengths are the same). kAuto:
// the register sort up to kScheduleRegisterSortMaxKeys padded keys, the group sort above.
// Measured 2026-12-06 s13 (H100, graph replay, sync mode, n_pad / 2 threads), registers vs
// group: 7.4 / 8.2 us at R = 1 (64 keys), 8.1 / 9.0 at R = 16, 9.9 / 11.0 at R = 64 (512 keys),
// 19.1 / 16.3 at R = 256 (2048 keys).
enum class ScheduleSort : int { kAuto = 0, kRegisters = 1, kGroup = 2 };
constexpr int kScheduleRegisterSortMaxKeys = 1024;

// dspark::schedule_prefix / schedule_budget. R requests, gamma drafts each, Bmax SPS entries.
struct ScheduleParams {
  const float* confidences;      // [R, gamma] per-position conditional acceptance c_{r,j}
  const int64_t* draft_lengths;  // [R] in [0, gamma]
  const float* sps;              // [Bmax] steps/s of a verify of B = index + 1 tokens, or null
  const int64_t* budget;         // [] async: candidates to admit (clamped to [0, M]), or null
  int64_t* out;                  // [R] verify lengths, or [] the budget (kScheduleBudget)
  int32_t* status;               // [] ScheduleStatusBit flags (CUDA)
  int64_t R, gamma, Bmax;
  double threshold;  // kScheduleThreshold: admit while c >= threshold
  int32_t mode;      // ScheduleMode
};

DSPARK_HD bool schedule_mode_sorts(int32_t mode) {
  return mode == kScheduleSync || mode == kScheduleAsync || mode == kScheduleBudget;
}

// The key of candidate (r, j) with quantized survival q >= 1.
DSPARK_HD uint64_t schedule_key(int64_t q, int64_t j, int64_t r) {
  return (uint64_t(kScheduleOne - q) << (kSchedulePosBits + kScheduleRequestBits)) |
         (uint64_t(j) << kScheduleRequestBits) | uint64_t(r);
}
DSPARK_HD int64_t key_survival(uint64_t key) {
  return kScheduleOne - int64_t(key >> (kSchedulePosBits + kScheduleRequestBits));
}
DSPARK_HD int64_t key_request(uint64_t key) {
  return int64_t(key & ((uint64_t(1) << kScheduleRequestBits) - 1));
}

// floor(a * 2^44) for a in [0, 1]: the product is exact (a power of two), the cast truncates.
DSPARK_HD int64_t quantize_survival(double a) { return int64_t(a * kScheduleScale); }

// Theta = tau * SPS(B), tau in units of 2^-44 (int64 -> double rounds to nearest everywhere).
DSPARK_HD double schedule_theta(int64_t tau, float sps) {
  return (double(tau) * kScheduleUnit) * double(sps);
}

DSPARK_HD bool sps_entry_valid(float s) { return s > 0.f && s <= 3.402823466e38f; }  // NaN: no

// Request r's status bits: its draft length, then its confidences within that length (entries
// past it are never read). 0 = valid.
DSPARK_HD int32_t schedule_request_status(const ScheduleParams& p, int64_t r) {
  const int64_t len = p.draft_lengths[r];
  if (len < 0 || len > p.gamma) return kBadDraftLength;
  const float* c = p.confidences + r * p.gamma;
  for (int64_t j = 0; j < len; ++j)
    if (!(c[j] >= 0.f && c[j] <= 1.f)) return kBadConfidence;
  return 0;
}

// Hands request r's candidate keys to put(j, key) for j in [0, gamma) (kNoCandidate past the
// last candidate) and returns how many it has. A request must be valid
// (schedule_request_status == 0). put lets the CUDA kernel place keys in its padded layout.
template <typename Put>
DSPARK_HD int64_t request_keys_to(const ScheduleParams& p, int64_t r, Put put) {
  const int64_t len = p.draft_lengths[r];
  const float* c = p.confidences + r * p.gamma;
  double a = 1.0;
  int64_t n = 0;
  for (int64_t j = 0; j < p.gamma; ++j) {
    int64_t q = 0;
    if (j < len) {
      a = a * double(c[j]);
      q = quantize_survival(a);
    }
    put(j, q >= 1 ? schedule_key(q, j, r) : kNoCandidate);
    n += q >= 1;
  }
  return n;
}

// request_keys_to writing keys[0, gamma).
DSPARK_HD int64_t request_keys(const ScheduleParams& p, int64_t r, uint64_t* keys) {
  return request_keys_to(p, r, [keys](int64_t j, uint64_t key) { keys[j] = key; });
}

// Modes without ranking: the threshold's leading run, or the whole draft (valid request).
DSPARK_HD int64_t unranked_length(const ScheduleParams& p, int64_t r) {
  const int64_t len = p.draft_lengths[r];
  if (p.mode == kScheduleFixed) return len;
  const float* c = p.confidences + r * p.gamma;
  int64_t l = 0;
  while (l < len && double(c[l]) >= p.threshold) ++l;
  return l;
}

// The greedy path's step n >= 1 admits the n-th ranked candidate (survival q): tau goes from
// tau_n - q to tau_n and B from R + n - 1 to R + n. Whether Algorithm 1 stops there: B past the
// table, or Theta not strictly above the previous step's.
DSPARK_HD bool sync_stops(const ScheduleParams& p, int64_t n, int64_t tau_n, int64_t q) {
  const int64_t B = p.R + n;
  if (B > p.Bmax) return true;
  return !(schedule_theta(tau_n, p.sps[B - 1]) > schedule_theta(tau_n - q, p.sps[B - 2]));
}

// Theta at step n of the path (tau_n in units of 2^-44), or -1 when R + n is past the table
// (never the budget: every Theta in the table is > 0 for R >= 1).
DSPARK_HD double budget_theta(const ScheduleParams& p, int64_t n, int64_t tau_n) {
  const int64_t B = p.R + n;
  return B >= 1 && B <= p.Bmax ? schedule_theta(tau_n, p.sps[B - 1]) : -1.0;
}

// Request r's verify length when `last` is the last admitted key (n* >= 1): its leading
// candidates with keys <= last, recomputed as request_keys does (valid request).
DSPARK_HD int64_t admitted_length(const ScheduleParams& p, int64_t r, uint64_t last) {
  const int64_t len = p.draft_lengths[r];
  const float* c = p.confidences + r * p.gamma;
  double a = 1.0;
  int64_t l = 0;
  for (; l < len; ++l) {
    a = a * double(c[l]);
    const int64_t q = quantize_survival(a);
    if (q < 1 || schedule_key(q, l, r) > last) break;
  }
  return l;
}

}  // namespace dspark
