// dspark/linear_kernel.cuh: the fused skinny linear kernel (decode and verify forwards) and its
// launcher. The math, roundings and the one summation order: dspark/linear.cuh.
//
// Grid (x only): (row block (kLinearRows = 128 output rows, a 16-row strip per warp), group of
// kLinearCols = 64 tokens, k slice), slice fastest: the `slices` blocks of a (row block, token
// group) form one cluster, and the token groups of a row block are launched side by side, so
// beyond 64 tokens the second group's weight reads mostly hit L2.
// A block:
//   1. issues the first two batches of weight loads of its strip (before the programmatic wait:
//      weights do not depend on earlier kernels, dspark/pdl.cuh);
//   2. RMSNorm: the slice sums of squares of its tokens, exchanged in the cluster (or, with
//      at most two tokens, every slice's sum computed locally: same arithmetic, no cluster
//      barrier on the decode path);
//   3. walks its k slice in chunks (linear_stage: one chunk for a decode's slice): stages
//      xhat (T) for all tokens in shared memory, then each warp multiplies its weight slabs
//      (software pipeline: the next batch is in flight while one is multiplied) with every
//      8-token column tile;
//   4. stores its slice sums straight into the shared memory of the block that finishes those
//      rows (block `rank` finishes rows [rank, rank + 1) * 128 / slices of the row block, through
//      distributed shared memory); after one cluster barrier each block adds the slice sums of
//      its rows in slice order, then bias, rounding, residual. (Pushing rather than pulling:
//      one barrier and no remote round trip at the kernel's tail.)
// Each weight byte is read once per 64 tokens; the staged activations (64 B per token and 32 k)
// are read from L2 once per block, so their traffic is tokens / 128 of the weight traffic.
#pragma once
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dspark/linear.cuh"
#include "dspark/pdl.cuh"

namespace dspark {
namespace cuda {

// Split cluster barrier (every thread of every block arrives once per phase, then waits).
// Pre-Hopper builds run one slice per row block (a cluster of one): a block barrier.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().barrier_arrive();
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().barrier_wait();
#else
  __syncthreads();
#endif
}

// `p` (a shared-memory address of this block) in block `rank` of the cluster.
template <typename F>
__device__ __forceinline__ F* cluster_peer(F* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

// Shared memory (floats, then bytes): RMS slice statistics [slices][64] and 1 / rms [64], the
// slice sums received for this block's rows [slices][128 / slices][8 NT + 4] (written by the
// cluster's blocks: not aliased with anything), then `tokens` (<= 8 NT) staged token rows of
// `stride` bytes (linear_stage).
template <int NT>
constexpr size_t linear_smem_bytes(int tokens, int stride) {
  return sizeof(float) *
             (size_t(kLinearMaxSlices + 1) * kLinearCols + size_t(kLinearRows) * (8 * NT + 4)) +
         size_t(tokens) * size_t(stride);
}

// NT: 8-token column tiles per block (8 NT >= the tokens of a y group); U: slabs per weight
// batch (two batches in flight per warp: the pipeline's current and next); VEC: 16-byte loads
// of W and x (else element loads: the same values, so the same bits).
template <typename T, int NT, int U, bool VEC>
__global__ void __launch_bounds__(kLinearThreads, VEC && sizeof(T) == 2 && NT <= 2 ? 3 : 2)
    fused_linear_kernel(LinearParams<T> p, LinearSplit split, LinearStage stage) {
  constexpr bool wvec = VEC, xvec = VEC;
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int E = 16 / int(sizeof(T));  // elements per 16 bytes
  const int KC = stage.k;                 // k per staged chunk (a multiple of 2 slabs)
  const int kStride = stage.stride;
  constexpr int kPt = 8 * NT + 4;                        // slice-sum row stride (floats)
  float* ss = reinterpret_cast<float*>(smem);            // [slices][64] RMS slice statistics
  float* inv_rms = ss + kLinearMaxSlices * kLinearCols;  // [64]
  float* recv = inv_rms + kLinearCols;                   // [slices][128 / slices][kPt] slice sums
  unsigned char* act =
      reinterpret_cast<unsigned char*>(recv + kLinearRows * kPt);  // [tokens][kStride]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int P = split.slices, rank = int(blockIdx.x % unsigned(P));
  const int64_t groups = (p.M + kLinearCols - 1) / kLinearCols, rest = blockIdx.x / unsigned(P);
  const int64_t rb = rest / groups, m0 = rest % groups * kLinearCols;
  const int mcols = int(p.M - m0 < kLinearCols ? p.M - m0 : kLinearCols);  // <= 8 NT (launcher)
  const int64_t k_lo = int64_t(rank) * split.slice_k;
  const int64_t k_hi = k_lo + split.slice_k < p.K ? k_lo + split.slice_k : p.K;
  const int nslab = k_hi > k_lo ? int((k_hi - k_lo + kLinearSlab - 1) / kLinearSlab) : 0;

  // This lane's weight rows (16-bit: g and g + 8 of the strip; fp32: lane % 16).
  const int64_t n0 = rb * kLinearRows + warp * 16;
  const T* rows[2];
  int64_t ends[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t n = n0 + (sizeof(T) == 4 ? (lane & 15) : (lane >> 2) + 8 * i);
    rows[i] = p.weight + (n < p.N ? n : 0) * p.K;
    ends[i] = n < p.N ? k_hi : 0;
  }
  pdl_trigger();
  cluster_arrive();  // (phase 1: every block has started before any remote shared-memory access)
  WeightBatch<T, U> cur, nxt;
  cur.load(rows, ends, k_lo, 0, nslab, wvec, lane);
  nxt.load(rows, ends, k_lo, U, nslab, wvec, lane);
  if (p.prologue == kRmsNorm)  // the norm weight of the slice into L1 (constant data)
    for (int64_t k = k_lo + int64_t(threadIdx.x) * E; k < k_hi; k += int64_t(kLinearThreads) * E)
      asm volatile("prefetch.global.L1 [%0];" ::"l"(p.norm_weight + k));
  pdl_wait();  // x / residual come from earlier kernels (dspark/pdl.cuh)

  bool started = false;  // phase 1 waited for
  if (p.prologue == kRmsNorm) {
    if (P == 1 || mcols <= 2) {  // all slices here (decode): pairs (token, slice) over the warps
      for (int pr = warp; pr < mcols * P; pr += kLinearWarps) {
        const int64_t lo = int64_t(pr % P) * split.slice_k;
        const int64_t hi = lo + split.slice_k < p.K ? lo + split.slice_k : p.K;
        const float s = slice_sumsq(p.x + (m0 + pr / P) * p.K, lo, hi, xvec, lane);
        if (lane == 0) ss[pr] = s;
      }
      __syncthreads();
      if (int(threadIdx.x) < mcols) {
        float s = ss[threadIdx.x * P];
        for (int q = 1; q < P; ++q) s += ss[threadIdx.x * P + q];
        inv_rms[threadIdx.x] = rsqrtf(s / float(p.K) + p.eps);
      }
    } else {  // this slice here, pushed to every block of the cluster; the others from them
      cluster_wait();
      started = true;
      for (int m = warp; m < mcols; m += kLinearWarps) {
        const float s = slice_sumsq(p.x + (m0 + m) * p.K, k_lo, k_hi, xvec, lane);
        if (lane < P) cluster_peer(ss, lane)[rank * kLinearCols + m] = s;
      }
      cluster_arrive();
      cluster_wait();
      if (int(threadIdx.x) < mcols) {
        float s = ss[threadIdx.x];
        for (int q = 1; q < P; ++q) s += ss[q * kLinearCols + threadIdx.x];
        inv_rms[threadIdx.x] = rsqrtf(s / float(p.K) + p.eps);
      }
    }
  }  // the chunk loop's first barrier publishes inv_rms

  float acc16[sizeof(T) == 4 ? 1 : NT][4];   // C fragments (16-bit T)
  float acc32[sizeof(T) == 4 ? 8 * NT : 1];  // FMA chains (fp32)
#pragma unroll
  for (int j = 0; j < (sizeof(T) == 4 ? 1 : NT); ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc16[j][i] = 0.0f;
#pragma unroll
  for (int m = 0; m < (sizeof(T) == 4 ? 8 * NT : 1); ++m) acc32[m] = 0.0f;

  int slab0 = 0;  // slice-relative index of the chunk's first slab
  for (int64_t c0 = k_lo; c0 < k_hi; c0 += KC, slab0 += KC / kLinearSlab) {
    const int64_t c1 = c0 + KC < k_hi ? c0 + KC : k_hi;
    const int cs = int((c1 - c0 + kLinearSlab - 1) / kLinearSlab);
    const int vecs = cs * (kLinearSlab / E);  // 16-byte groups read by the chunk's slabs
    __syncthreads();                          // the previous chunk's readers are done
#pragma unroll 2
    for (int i = threadIdx.x; i < mcols * vecs; i += kLinearThreads) {
      const int m = i / vecs, v = i % vecs;
      const int64_t k = c0 + int64_t(v) * E;
      const float inv = p.prologue == kRmsNorm ? inv_rms[m] : 1.0f;
      *reinterpret_cast<uint4*>(act + m * kStride + v * 16) = xhat16(p, m0 + m, k, c1, inv, xvec);
    }
    __syncthreads();
    for (int s = 0; s < cs; s += U) {
      if constexpr (sizeof(T) == 4) fma_batch<NT, U>(acc32, cur, act, kStride, s, cs, mcols, lane);
      else mma_batch<T, NT, U>(acc16, cur, act, kStride, s, cs, mcols, lane);
      cur = nxt;
      nxt.load(rows, ends, k_lo, slab0 + s + 2 * U, nslab, wvec, lane);
    }
  }

  // Slice sums into the block that finishes each row (row r: block r / mine, its slot `rank`).
  const int mine = kLinearRows / P;
  if (!started) cluster_wait();
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int m = 0; m < 8 * NT; ++m) {
      if (m >= mcols) break;
      acc32[m] += __shfl_xor_sync(0xffffffffu, acc32[m], 16);  // the two halves of each slab
      const int r = warp * 16 + (lane & 15);
      if (lane < 16) cluster_peer(recv, r / mine)[(rank * mine + r % mine) * kPt + m] = acc32[m];
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of the strip
      const int r = warp * 16 + g + 8 * h;
      float* dst = cluster_peer(recv, r / mine) + (rank * mine + r % mine) * kPt + 2 * t;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (j * 8 >= mcols) break;
        dst[j * 8] = acc16[j][2 * h];
        dst[j * 8 + 1] = acc16[j][2 * h + 1];
      }
    }
  }
  cluster_arrive();
  cluster_wait();

  // Epilogue of rows [rank, rank + 1) * mine: slice sums in slice order, bias, round, residual.
  for (int i = threadIdx.x; i < mine * mcols; i += kLinearThreads) {
    const int lr = i % mine, m = i / mine;
    const int64_t n = rb * kLinearRows + rank * mine + lr;
    if (n >= p.N) continue;
    float y = recv[lr * kPt + m];
    for (int q = 1; q < P; ++q) y += recv[(q * mine + lr) * kPt + m];
    if (p.bias) y += to_f(p.bias[n]);
    y = round_t<T>(y);
    if (p.residual) y = to_f(p.residual[(m0 + m) * p.N + n]) + y;
    p.out[(m0 + m) * p.N + n] = from_f<T>(y);
  }
}

// The kernel's code as loaded for the current device: the architecture it was compiled for
// (cudaFuncAttributes::ptxVersion, e.g. 80 or 90) and the one it runs as (binaryVersion). All
// kernels of a build share the architectures, so one instance answers for all.
inline cudaError_t linear_kernel_arch(int* ptx, int* binary) {
  cudaFuncAttributes a{};
  const cudaError_t err = cudaFuncGetAttributes(&a, fused_linear_kernel<float, 1, 2, false>);
  if (err != cudaSuccess) return err;
  *ptx = a.ptxVersion;
  *binary = a.binaryVersion;
  return cudaSuccess;
}

// Per-device launch facts (function attributes and SM architectures are per device).
struct LinearDevice {
  // 1: the sm_90 paths (K slices as thread-block clusters, programmatic dependent launch;
  // pdl.cuh: sm90_paths); 0: one slice per row block, stream-ordered launches.
  int clusters = -1;
};
inline cudaError_t linear_device(LinearDevice*& out) {
  constexpr int kMaxDevices = 64;
  static LinearDevice devs[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  if (devs[dev].clusters < 0) {
    bool sm90 = false;
    if ((err = sm90_paths(fused_linear_kernel<float, 1, 2, false>, &sm90))) return err;
    devs[dev].clusters = sm90;
  }
  out = &devs[dev];
  return cudaSuccess;
}

template <typename T, int NT, int U, bool VEC>
cudaError_t launch_fused_linear_grid(const LinearParams<T>& p, LinearSplit split, bool clusters,
                                     cudaStream_t stream) {
  auto kernel = fused_linear_kernel<T, NT, U, VEC>;
  const int tokens = int(p.M < 8 * NT ? p.M : 8 * NT);
  const LinearStage stage = linear_stage<NT>(int(sizeof(T)), tokens, split.slice_k, p.stage_budget);
  const size_t smem = linear_smem_bytes<NT>(tokens, stage.stride);
  // the largest stage any call of this instance can ask for: 8 NT tokens x 8 KB / NT (+ pad)
  constexpr size_t kMaxSmem = linear_smem_bytes<NT>(8 * NT, 8192 / NT + 64);
  if constexpr (kMaxSmem > 48 * 1024) {  // opt in to more than the default limit, once per device
    static bool done[64] = {};
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64 && !done[dev]) {
      err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kMaxSmem));
      if (err != cudaSuccess) return err;
      done[dev] = true;
    }
  }
  const int64_t row_blocks = (p.N + kLinearRows - 1) / kLinearRows;
  const int64_t groups = (p.M + kLinearCols - 1) / kLinearCols;
  const dim3 grid(unsigned(row_blocks * groups * split.slices));
  return launch_pdl_cluster(kernel, grid, dim3(kLinearThreads), smem, stream, clusters,
                            clusters ? unsigned(split.slices) : 0u, p, split, stage);
}

template <typename T, int NT, int U>
cudaError_t launch_fused_linear_tile(const LinearParams<T>& p, LinearSplit split, bool clusters,
                                     bool vec, cudaStream_t stream) {
  return vec ? launch_fused_linear_grid<T, NT, U, true>(p, split, clusters, stream)
             : launch_fused_linear_grid<T, NT, U, false>(p, split, clusters, stream);
}

// Shapes as in LinearParams. M, N, K >= 1; ceil(N / 128) * ceil(M / 64) * slices < 2^31 (grid
// x). The column-tile count follows min(M, 64); it changes no token's arithmetic.
template <typename T>
cudaError_t launch_fused_linear(const LinearParams<T>& p, cudaStream_t stream) {
  LinearDevice* dev = nullptr;
  const cudaError_t err = linear_device(dev);
  if (err != cudaSuccess) return err;
  LinearSplit split = linear_split(p.N, p.K);
  if (!dev->clusters) split = {1, (p.K + kLinearSlab - 1) / kLinearSlab * kLinearSlab};
  constexpr int E = 16 / int(sizeof(T));
  auto al = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool v = p.K % E == 0 && al(p.weight) && al(p.x) && (!p.norm_weight || al(p.norm_weight));
  const bool c = dev->clusters;
  const int64_t cols = p.M < kLinearCols ? p.M : kLinearCols;
  // Two batches of U slabs in flight per warp: 16-bit, 4 x 32 B per lane per batch for <= 16
  // tokens (decode, batch-1/2 verify), 2 x 32 B when the accumulators need the registers.
  constexpr bool k32 = sizeof(T) == 4;
  if (cols <= 8) return launch_fused_linear_tile<T, 1, 2>(p, split, c, v, stream);
  if (cols <= 16) return launch_fused_linear_tile<T, 2, k32 ? 1 : 2>(p, split, c, v, stream);
  if (cols <= 32) return launch_fused_linear_tile<T, 4, k32 ? 1 : 2>(p, split, c, v, stream);
  return launch_fused_linear_tile<T, 8, k32 ? 1 : 2>(p, split, c, v, stream);
}

}  // namespace cuda
}  // namespace dspark
