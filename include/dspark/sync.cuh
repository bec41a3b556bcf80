// dspark/sync.cuh: how blocks of one grid hand results to each other (the fused verify kernel,
// include/dspark/verify_fused.cuh), in the PTX memory model's terms:
//   publish, then count: the block's barrier orders every thread's earlier writes before thread
//     0's release fence (fence.acq_rel.gpu, cumulative over what the barrier made it observe) and
//     its arrival at a counter; the block that completes the count is the last, takes an acquire
//     fence, and after its barrier every thread may read what the counted blocks wrote (fence-fence
//     synchronisation; a fence.sc.gpu, __threadfence, is stronger than this pattern needs);
//   flags: the same fence, then st.release.gpu; the reader's ld.acquire.gpu, then its barrier.
// A reader of data another block wrote during the same launch loads it with ld.global.cg (L2):
// cheap insurance against an L1 line fetched earlier for a neighbouring request's entries.
// Counters and flags start at zero: the launcher clears them with the status word before every
// launch (zero_words below: one small kernel node in a CUDA graph).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dspark/pdl.cuh"

namespace dspark {
namespace cuda {

// n int32 words [n] <- 0. (A template: a kernel defined in a header that several translation
// units include must be one.)
template <typename Word>
__global__ void ZeroWordsKernel(Word* words, int64_t n) {
  pdl_trigger();  // a programmatic successor (the fused verify) may start loading its inputs
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    words[i] = 0;
}

// What cudaMemsetAsync(words, 0, n * 4) does, as a kernel: measured on an H100 (bench_round
// --kernels, 2026-12-07), a memset node of a CUDA graph delayed the kernel after it by 2-7 µs,
// where a kernel node is followed within about 1 µs.
inline cudaError_t zero_words(int32_t* words, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + 255) / 256 < 1024 ? (n + 255) / 256 : 1024;
  ZeroWordsKernel<int32_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(words, n);
  return cudaGetLastError();
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Release / acquire fence at GPU scope (lighter than __threadfence's fence.sc.gpu).
__device__ __forceinline__ void fence_acq_rel_gpu() {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
}

__device__ __forceinline__ void store_release(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Counts this block's arrival at `counter` after every thread's earlier global writes; true (in
// every thread) for the block whose arrival is the `expected`-th. Call from all threads.
__device__ __forceinline__ bool arrive_last(uint32_t* counter, uint32_t expected) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_acq_rel_gpu();
    const bool last = atomicAdd(counter, 1u) == expected - 1;
    if (last) fence_acq_rel_gpu();  // order the reads below after every counted block's writes
    s_last = last;
  }
  __syncthreads();
  return s_last != 0;
}

// All threads: publish this block's global writes, then set *flag = value.
__device__ __forceinline__ void publish(uint32_t* flag, uint32_t value) {
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_acq_rel_gpu();
    store_release(flag, value);
  }
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Thread 0 waits until *flag != 0 and returns it (to thread 0 only; broadcast it yourself).
// Only called where the flag's writer is already running (see verify_fused.cuh: tickets).
__device__ __forceinline__ uint32_t wait_nonzero(const uint32_t* flag) {
  uint32_t v;
  while ((v = load_acquire(flag)) == 0) __nanosleep(256);
  return v;
}

// Plain-old-data copy through L2 (ld.global.cg), for structs written by another block.
template <typename T>
__device__ __forceinline__ T load_cg(const T* p) {
  static_assert(sizeof(T) % 8 == 0 && alignof(T) >= 8, "load_cg moves 8-byte words");
  unsigned long long words[sizeof(T) / 8];
  const unsigned long long* src = reinterpret_cast<const unsigned long long*>(p);
#pragma unroll
  for (int i = 0; i < int(sizeof(T) / 8); ++i) words[i] = __ldcg(src + i);
  T out;
  __builtin_memcpy(&out, words, sizeof(T));
  return out;
}

}  // namespace cuda
}  // namespace dspark
