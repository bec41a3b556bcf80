// dspark/schedule.cuh: the prefix scheduler (dspark::schedule_prefix, dspark::schedule_budget)
// as one kernel of one block: graph-capturable (static grid, no host sync), deterministic, and
// cheap at serving sizes (R * gamma <= a few thousand candidates).
//
// The block holds every candidate key (dspark/schedule.h) in shared memory, padded to a power
// of two n_pad >= 64 with kNoCandidate, and
//   1. copies the confidences into shared memory (coalesced), then checks each request and
//      writes its keys (one thread per request: gamma is small);
//   2. sorts the keys with a bitonic network (log2(n_pad) * (log2(n_pad) + 1) / 2 passes): up to
//      1024 keys with each thread holding n_pad / T keys in registers (passes within a warp are
//      shuffles, only the strides past a warp go through shared memory: bitonic_sort_registers),
//      above that with the group sort (bitonic_sort: four passes per trip through shared
//      memory), the faster of the two at each size (H100, 2026-12-06 s13: ScheduleSort);
//   3. scans the ranked survivals in int64 (exact, so the order of the sum does not matter) and
//      finds Algorithm 1's first non-improvement (sync) or the first argmax of Theta (budget)
//      with block reductions;
//   4. gives each request its length: its keys up to the last admitted one.
// Threshold and fixed modes need no ranking: step 1 writes the lengths.
//
// Without the status read-back (sync checks off, graph capture) the kernel stays in bounds and
// defined: an invalid request (bad length or confidence) has no candidates and length 0; a bad
// SPS table makes the sync lengths and the budget 0.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dspark/block_reduce.cuh"
#include "dspark/schedule.h"

namespace dspark {
namespace cuda {

constexpr int kScheduleMaxThreads = 1024;

struct MinOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const {
    return a < b ? a : b;
  }
};

// Exclusive prefix sum of one int64 per thread, in thread order (integer adds: exact).
__device__ inline int64_t block_exclusive_scan_i64(int64_t v) {
  __shared__ int64_t warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int64_t incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t up = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += up;
  }
  __syncthreads();  // earlier readers of warp_sums are done
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int64_t s = lane < nwarps ? warp_sums[lane] : 0;
    int64_t run = s;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t up = __shfl_up_sync(0xffffffffu, run, o);
      if (lane >= o) run += up;
    }
    if (lane < nwarps) warp_sums[lane] = run - s;
  }
  __syncthreads();
  return warp_sums[warp] + incl - v;
}

// Keys live in shared memory with one unused slot after every 16 (key_slot): a thread's keys
// are a power-of-two stride apart, and without the pad the threads of a half-warp would hit
// the same banks (64 B apart at stride 1).
__device__ __forceinline__ int key_slot(int64_t i) { return int(i + (i >> 4)); }
__host__ __device__ inline size_t schedule_slots(int n_pad) {
  return size_t(n_pad) + size_t(n_pad) / 16;
}

// Compare-exchange: (a, b) ascending when up, descending otherwise.
__device__ __forceinline__ void order_pair(uint64_t& a, uint64_t& b, bool up) {
  if ((a > b) == up) {
    const uint64_t t = a;
    a = b, b = t;
  }
}

// C consecutive passes of bitonic stage k, strides jl << (C - 1) down to jl, from registers:
// each group loads the 2^C keys that those passes compare only among themselves
// (i0 + m * jl), runs the passes, stores them back. The keys differ only in bits below k, so
// one direction serves the group.
template <int C>
__device__ inline void bitonic_passes(uint64_t* s, int n, int k, int jl) {
  constexpr int E = 1 << C;
  const int lb = __ffs(jl) - 1;
  for (int g = threadIdx.x; g < (n >> C); g += blockDim.x) {
    const int i0 = ((g >> lb) << (lb + C)) | (g & (jl - 1));
    const bool up = (i0 & k) == 0;
    uint64_t v[E];
#pragma unroll
    for (int m = 0; m < E; ++m) v[m] = s[key_slot(i0 + m * jl)];
#pragma unroll
    for (int b = C - 1; b >= 0; --b)
#pragma unroll
      for (int m = 0; m < E; ++m)
        if ((m & (1 << b)) == 0) order_pair(v[m], v[m | (1 << b)], up);
#pragma unroll
    for (int m = 0; m < E; ++m) s[key_slot(i0 + m * jl)] = v[m];
  }
  __syncthreads();
}

// Stages k = 2..16 of the network on each group of 16 consecutive keys, in one trip: those
// passes compare keys of the same group only.
__device__ inline void bitonic_first_stages(uint64_t* s, int n) {
  for (int g = threadIdx.x; g < (n >> 4); g += blockDim.x) {
    const int i0 = g << 4;
    uint64_t v[16];
#pragma unroll
    for (int m = 0; m < 16; ++m) v[m] = s[key_slot(i0 + m)];
#pragma unroll
    for (int k = 2; k <= 16; k <<= 1)
#pragma unroll
      for (int j = k >> 1; j > 0; j >>= 1)
#pragma unroll
        for (int m = 0; m < 16; ++m)
          if ((m & j) == 0) order_pair(v[m], v[m | j], ((i0 + m) & k) == 0);
#pragma unroll
    for (int m = 0; m < 16; ++m) s[key_slot(i0 + m)] = v[m];
  }
  __syncthreads();
}

constexpr int kSortPassesPerLoad = 4;  // 16 keys a group

// The group sort (the A/B block sizes where a thread would hold more than 16 keys, or one).
// Ascending bitonic sort of the n keys (n a power of two >= 64, laid out by key_slot). Stages
// 2..16 take one trip; the log2(k) passes of each later stage k run kSortPassesPerLoad at a
// time from registers, so at n = 2048 the keys cross shared memory 18 times instead of 66 (one
// pass per round trip).
__device__ inline void bitonic_sort(uint64_t* s, int n) {
  __syncthreads();  // every key is written
  bitonic_first_stages(s, n);
  for (int k = 32; k <= n; k <<= 1) {
    int passes = __ffs(k) - 1, top = k >> 1;  // strides top, top / 2, ..., 1
    while (passes > 0) {
      const int c = passes < kSortPassesPerLoad ? passes : kSortPassesPerLoad;
      const int jl = top >> (c - 1);
      switch (c) {
        case 1: bitonic_passes<1>(s, n, k, jl); break;
        case 2: bitonic_passes<2>(s, n, k, jl); break;
        case 3: bitonic_passes<3>(s, n, k, jl); break;
        default: bitonic_passes<4>(s, n, k, jl); break;
      }
      passes -= c, top = jl >> 1;
    }
  }
}

// The bitonic network with every thread working on every pass: thread t holds the E keys at
// ranked positions t * E ... t * E + E - 1 in registers. A pass of stride j compares keys of the
// same thread (j < E), of lanes j / E apart in the warp (j < 32 E: one shuffle, no barrier) or,
// for the few strides past a warp (15 of the 66 passes at n = 2048), of another warp through
// shared memory. Measured on an H100 (2026-12-06 s13, sync, in a graph): faster than the group
// sort up to 1024 keys (7.3 vs 8.0 us at 64, 12.3 vs 12.6 at 1024), slower at 2048 (19.0 vs
// 16.2: 32 warps meet at each of the 15 barriers, ncu 14.3 cycles per issued instruction).
template <int E, int J>
__device__ __forceinline__ void pass_in_thread(uint64_t (&v)[E], int base, int k) {
  if constexpr (J < E) {
#pragma unroll
    for (int e = 0; e < E; ++e)
      if ((e & J) == 0) order_pair(v[e], v[e | J], ((base + e) & k) == 0);
  }
}

// Keeps the smaller (keep_small) or larger of v and its partner o (unique keys; padding ties
// are equal values, so either is right).
__device__ __forceinline__ uint64_t keep_of_pair(uint64_t v, uint64_t o, bool keep_small) {
  return (o < v) == keep_small ? o : v;
}

// Ascending sort of the n = blockDim.x * E keys laid out by key_slot; the passes past a warp
// exchange through s in a transposed layout (slot e * T + t: a warp's accesses are consecutive).
template <int E>
__device__ inline void bitonic_sort_registers(uint64_t* s, int n) {
  const int T = blockDim.x, t = threadIdx.x, base = t * E;
  uint64_t v[E];
  __syncthreads();  // every key is written
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] = s[key_slot(base + e)];
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      if (j < E) {
        switch (j) {
          case 1: pass_in_thread<E, 1>(v, base, k); break;
          case 2: pass_in_thread<E, 2>(v, base, k); break;
          case 4: pass_in_thread<E, 4>(v, base, k); break;
          default: pass_in_thread<E, 8>(v, base, k); break;
        }
        continue;
      }
      // j >= E: the partner of base + e is (base ^ j) + e, in thread t ^ (j / E); the bits j
      // and k of a position are those of base
      const bool keep_small = ((base & j) == 0) == ((base & k) == 0);
      const int partner = t ^ (j / E);
      if (j < 32 * E) {
#pragma unroll
        for (int e = 0; e < E; ++e)
          v[e] = keep_of_pair(v[e], __shfl_xor_sync(0xffffffffu, v[e], j / E), keep_small);
      } else {
        __syncthreads();  // the previous exchange's reads are done
#pragma unroll
        for (int e = 0; e < E; ++e) s[e * T + t] = v[e];
        __syncthreads();
#pragma unroll
        for (int e = 0; e < E; ++e) v[e] = keep_of_pair(v[e], s[e * T + partner], keep_small);
      }
    }
  }
  __syncthreads();  // the last exchange's reads are done
#pragma unroll
  for (int e = 0; e < E; ++e) s[key_slot(base + e)] = v[e];
  __syncthreads();
}

// The sort for this launch: in registers where each thread holds 2-16 keys unless group_sort
// (the launcher's choice for large key counts, or DSPARK_SCHEDULE_SORT=group), else the group
// sort (DSPARK_SCHEDULE_THREADS block sizes with more keys a thread).
__device__ inline void sort_keys(uint64_t* s, int n, bool group_sort) {
  switch (group_sort ? 0 : n / int(blockDim.x)) {
    case 2: bitonic_sort_registers<2>(s, n); break;
    case 4: bitonic_sort_registers<4>(s, n); break;
    case 8: bitonic_sort_registers<8>(s, n); break;
    case 16: bitonic_sort_registers<16>(s, n); break;
    default: bitonic_sort(s, n); break;
  }
}

// Grid (1), block min(1024, n_pad / 2) threads (sorting modes) or min(1024, R rounded up to
// a warp) (threshold, fixed); dynamic shared memory schedule_slots(n_pad) keys + R * gamma
// floats (sorting modes). Shapes as in ScheduleParams.
__global__ void __launch_bounds__(kScheduleMaxThreads)
    schedule_kernel(ScheduleParams p, int n_pad, bool group_sort) {
  extern __shared__ uint64_t keys[];
  __shared__ uint64_t last_key;
  const int tid = threadIdx.x, T = blockDim.x;
  const bool sorts = schedule_mode_sorts(p.mode);
  // The sorting modes read each request's confidences three times (checks, keys, lengths),
  // one thread per request walking its row: from global memory that is gamma dependent loads
  // per walk. One coalesced copy into shared memory (after the keys) pays the latency once.
  ScheduleParams q = p;
  if (sorts) {
    float* conf = reinterpret_cast<float*>(keys + schedule_slots(n_pad));
    for (int64_t i = tid; i < p.R * p.gamma; i += T) conf[i] = p.confidences[i];
    q.confidences = conf;
    __syncthreads();
  }
  int32_t bad = 0;
  int64_t count = 0;  // this thread's candidates
  for (int64_t r = tid; r < p.R; r += T) {
    const int32_t st = schedule_request_status(q, r);
    bad |= st;
    if (!sorts) {
      p.out[r] = st == 0 ? unranked_length(p, r) : 0;
    } else if (st == 0) {
      const int64_t first = r * p.gamma;
      count +=
          request_keys_to(q, r, [&](int64_t j, uint64_t key) { keys[key_slot(first + j)] = key; });
    } else {
      for (int64_t j = 0; j < p.gamma; ++j) keys[key_slot(r * p.gamma + j)] = kNoCandidate;
    }
  }
  if (sorts)
    for (int64_t i = p.R * p.gamma + tid; i < n_pad; i += T) keys[key_slot(i)] = kNoCandidate;
  int bad_sps = 0;
  if (p.sps != nullptr)
    for (int64_t b = tid; b < p.Bmax; b += T) bad_sps |= !sps_entry_valid(p.sps[b]);
  // one barrier per bit, in a fixed order (each __syncthreads_or is a block-wide barrier)
  int32_t status = __syncthreads_or(bad & kBadConfidence) ? kBadConfidence : 0;
  if (__syncthreads_or(bad & kBadDraftLength)) status |= kBadDraftLength;
  if (__syncthreads_or(bad_sps)) status |= kBadSps;
  if (tid == 0) *p.status = status;
  if (!sorts) return;

  const int64_t M = block_reduce(count, SumOp{}, int64_t(0));  // ranked candidates
  sort_keys(keys, n_pad, group_sort);
  int64_t n_star;  // admitted candidates: the first n_star ranked ones
  if (p.mode == kScheduleAsync) {
    const int64_t K = *p.budget;
    n_star = K < 0 ? 0 : K > M ? M : K;
  } else {
    // This thread's ranked positions [lo, hi): the scan runs in thread order.
    const int64_t per = n_pad / T, lo = tid * per, hi = lo + per < M ? lo + per : M;
    int64_t sum = 0;
    for (int64_t i = lo; i < hi; ++i) sum += key_survival(keys[key_slot(i)]);
    int64_t tau = p.R * kScheduleOne + block_exclusive_scan_i64(sum);  // tau before lo
    const bool sps_ok = (status & kBadSps) == 0;
    if (p.mode == kScheduleSync) {
      int64_t first = M;  // the first position whose admission does not improve Theta
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t q = key_survival(keys[key_slot(i)]);
        tau += q;
        if (sync_stops(p, i + 1, tau, q)) {
          first = i;
          break;
        }
      }
      n_star = sps_ok ? block_reduce(first, MinOp{}, M) : 0;
    } else {  // kScheduleBudget: the first n maximising Theta_n over n = 0..M
      double best = tid == 0 ? budget_theta(p, 0, tau) : -1.0;
      int64_t best_n = 0;
      for (int64_t i = lo; i < hi; ++i) {
        tau += key_survival(keys[key_slot(i)]);
        const double theta = budget_theta(p, i + 1, tau);
        if (theta > best) best = theta, best_n = i + 1;
      }
      const double top = block_reduce(best, MaxOp{}, -1.0);
      const int64_t n = block_reduce(best == top ? best_n : M, MinOp{}, M);
      if (tid == 0) *p.out = sps_ok && top >= 0.0 ? n : 0;
      return;
    }
  }
  if (tid == 0) last_key = n_star >= 1 ? keys[key_slot(n_star - 1)] : kNoCandidate;
  __syncthreads();
  const uint64_t last = last_key;
  for (int64_t r = tid; r < p.R; r += T)
    p.out[r] = n_star >= 1 && schedule_request_status(q, r) == 0 ? admitted_length(q, r, last) : 0;
}

// The sorting modes' padded key count: a power of two >= max(64, R * gamma).
inline int schedule_pad(int64_t candidates) {
  int n = 64;
  while (n < candidates) n <<= 1;
  return n;
}

// Host checks: R * gamma <= kScheduleMaxCandidates, sps given for sync / budget, budget for
// async; threads_override 0 or a power of two in [32, 1024] (sorting modes); sort: which
// bitonic sort (A/B; kAuto by key count). Launched for R = 0 too (the status word and the
// budget are still written).
inline cudaError_t launch_schedule(const ScheduleParams& p, cudaStream_t stream,
                                   int threads_override = 0,
                                   ScheduleSort sort = ScheduleSort::kAuto) {
  int n_pad = 0, threads;
  if (schedule_mode_sorts(p.mode)) {
    n_pad = schedule_pad(p.R * p.gamma);
    // n_pad / 2 threads (two keys each in the register sort). s11 (H100) measured one thread
    // per 16 keys slower (R = 64: 19.2 vs 14.5 us); s12 measured n_pad / 2 with the group
    // sort: R = 256 sync 16.9 us a call in a graph, ncu: the sort on 4 warps was most of it.
    threads = n_pad / 2 < kScheduleMaxThreads ? n_pad / 2 : kScheduleMaxThreads;
    // A/B measurements: any power of two in [32, 1024] (capped at n_pad) gives the same bits
    if (threads_override > 0) threads = threads_override < n_pad ? threads_override : n_pad;
  } else {
    const int64_t warps = (p.R + 31) / 32;
    threads = warps < 1 ? 32 : warps > kScheduleMaxThreads / 32 ? kScheduleMaxThreads : warps * 32;
  }
  // the keys, then the confidences (sorting modes): at most 136 + 64 KiB
  const size_t smem =
      n_pad > 0 ? schedule_slots(n_pad) * sizeof(uint64_t) + size_t(p.R * p.gamma) * sizeof(float)
                : 0;
  if (smem > 48 * 1024) {  // opt in to the large-memory configuration once per device and size
    static size_t done[64] = {};
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if (dev < 0 || dev >= 64 || done[dev] < smem) {
      err = cudaFuncSetAttribute(schedule_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 int(smem));
      if (err != cudaSuccess) return err;
      if (dev >= 0 && dev < 64) done[dev] = smem;
    }
  }
  const bool group_sort = sort == ScheduleSort::kGroup ||
                          (sort == ScheduleSort::kAuto && n_pad > kScheduleRegisterSortMaxKeys);
  schedule_kernel<<<1, unsigned(threads), smem, stream>>>(p, n_pad, group_sort);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dspark
