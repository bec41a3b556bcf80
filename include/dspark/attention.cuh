// dspark/attention.cuh: attention of a block of T new tokens per request — decode (T = 1), a
// causal chain or a token tree (verify) — with the tokens' QK-norm, rotary embedding and
// KV-cache write folded in.
//
//   qkv [B, T, (H + 2 Hkv) D]: the tokens' q | k | v projections (fused_linear's output)
//   k_cache, v_cache [L, B, Hkv, S, D]: layer `layer` is read and written
//   start [B] i64: cache slot of row 0; parents [B, T] i64 local ids (-1: a root) or null (chain)
//   inv_freq [D/2] f32 (rotary), q_norm / k_norm [D] or null (Qwen3's per-head RMSNorm)
//   Row j sits in slot start + j at position P_j = start + depth(j):
//   -> cache[layer, b, :, start + j] = (rope(k_norm(k_j)), v_j);  out [B, T, H D] = softmax(q K^T
//      * scale) V over row j's *virtual slots* v = lo_j .. P_j (lo_j = max(0, P_j - window + 1),
//      window 0: 0): v < start is cache slot v, v = start + d the block slot of j's ancestor at
//      depth d (j itself at d = depth(j)). For a chain the identity.
//
// Virtual slots make a row's arithmetic that of a decode of the same token at position P_j once
// the accepted path is compacted (runner.decode == the verify row, bit for bit, docs/DESIGN.md
// property 6): chunks of kAttnChunk virtual slots, every chunk summed in a fixed order, chunks
// merged in a fixed order in which chunks a row cannot see contribute exact identities (max
// -inf, sum 0, output 0). The result depends on the slots <= P_j only: not on S, T, the number
// of chunks or the other rows.
//
// Roundings follow the unfused modules (dspark/reference.py: decode_attention): normed and
// rotated q/k, and cos/sin, are rounded to T as stored tensors would be; scores, softmax and the
// weighted sum of V are fp32; the output is rounded once.
//
// Kernel 1, grid (Hkv, B, chunks * row groups): a block owns one KV head (its G = H / Hkv query
// heads), one chunk of kAttnChunk virtual slots and a group of rows; thread t scores virtual slot
// chunk + t for every (row, head) of a tile of <= MAXQ query vectors (one K row per thread,
// 16-byte loads, read once for the tile), the block takes chunk softmax statistics, and half-warps
// sum the V rows for up to kAttnMaxPassQ query vectors at once (a V row read once for the rows of
// a pass; each query's sum still runs over its own visible slots in slot order). The block's new
// K/V rows are recomputed (norm + rotary) in every block that needs them and written to the cache
// by the (chunk 0, row group 0) block; no block reads a block slot from the cache, so there is no
// race. Kernel 2, grid (H, T, B), merges the chunks. The grid is static (chunks past a row's
// position exit at once): CUDA graphs capture it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dspark/block_reduce.cuh"
#include "dspark/common.h"
#include "dspark/linear.cuh"  // Vec
#include "dspark/numeric.h"   // to_f / from_f / round_t
#include "dspark/pdl.cuh"

namespace dspark {
namespace cuda {

constexpr int kAttnThreads = 128;
constexpr int kAttnChunk = kAttnThreads;  // virtual slots per block: one per thread when scoring
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kAttnMaxHeadDim = 256;
constexpr int kAttnMaxGroup = 16;  // query heads per KV head
constexpr int kAttnMaxRows = 64;   // rows (tokens) per request and call
constexpr int kAttnMaxQ = 32;      // query vectors (row x head) per scoring tile

template <typename T>
struct AttnParams {
  const T* qkv;
  T* k_cache;
  T* v_cache;
  const int64_t* start;    // [B]
  const int64_t* parents;  // [B, T] or nullptr (chain)
  const float* inv_freq;
  const T* q_norm;  // [D] or nullptr
  const T* k_norm;  // [D] or nullptr
  T* out;           // [B, T, H * D]
  float* part_o;    // [B, T, H, splits, D] (splits > 1)
  float* part_ml;   // [B, T, H, splits, 2]: chunk max and sum of exp (splits > 1)
  int32_t* status;
  int64_t B, rows, H, Hkv, S, D, layer, window;  // rows: T, the tokens per request
  float eps, scale;
  int splits;           // chunks of the cache: attn_splits(S)
  int rows_per_block;   // rows of a block (sms > 0: the most any request uses; attn_grid_z)
  int sms;              // > 0: rows and query heads per block chosen per request (active chunks)
  int heads_per_block;  // > 0: query heads of its KV head a block takes (a divisor of G), for
                        // every request; 0: attn_heads_per_block's choice (sms > 0), else G
  int prefetch;         // 1: a block sends its chunk's committed K/V rows to L2 first
  int merge_pdl;        // 1: the merge kernel launches programmatically (sm_90 code only)
  int compact;          // 1: a tile of one query vector runs kernel 1's one-query instance
  int pass_q;           // query vectors per weighted-V pass, at most the kernel's (0: its own)
};

inline int attn_splits(int64_t S) { return int((S + kAttnChunk - 1) / kAttnChunk); }

// Rows per block. A block scores one chunk of kAttnChunk slots for its rows: more rows per block
// read each K/V row once for more rows; fewer rows spread the work over more SMs and shorten each
// block's serial per-row passes (weighted V, outputs), which dominate short caches. Long caches
// (>= 16 chunks) whose grid fills two waves with every row in one block keep all rows (K/V read
// once). Otherwise start at a tile of about 8 query vectors (8 / G rows) and halve while the grid
// (`blocks_per_group` = Hkv * B * splits blocks per group of rows) is under one wave of `sms`.
// Measured on an H100 (bench/bench_attention.py --rows-per-block, bench/RESULTS.md, ninth
// session): this picks the fastest split at all six measured shapes, e.g. the benchmark pair's
// 8-row verify at batch 1, 50.3 -> 24.7 µs a layer, and the 8B layer's at 4096 slots, 187.6 ->
// 146.9 µs. Only the work split changes, not any row's arithmetic.
DSPARK_HD int attn_rows_per_block(int64_t T, int64_t G, int splits, int64_t blocks_per_group = 0,
                                  int sms = 0) {
  if (T <= 1) return int(T);
  if (splits >= 16 && blocks_per_group >= 2 * int64_t(sms)) return int(T);
  int64_t r = 8 / G > 1 ? 8 / G : 1;
  r = r < T ? r : T;
  while (r > 1 && blocks_per_group * ((T + r - 1) / r) < int64_t(sms)) r = (r + 1) / 2;
  return int(r);
}

// The work split by a request's *active* chunks (sms > 0; 2026-12-07, s16): a block of T rows at
// cache slots start .. start + T - 1 sees chunks 0 .. active - 1 only, so the grid's blocks go
// to those: the kernel picks each request's rows per block with attn_rows_per_block over its
// active chunks (Hkv * B * active blocks per group of rows) and maps grid z to (chunk, row
// group) among them. Why: the host rule counts every chunk of the cache, but at a short context
// most exit at once (the 8B verify block at slot 112 of 1024: 1 of 8 chunks), and the few that
// work each carry 2 rows serially (measured on an H100, 8 rows: 58.7 µs a layer with 2 rows a
// block, 44.1 with 1; at slot 900, where 8 chunks work, 2 rows win: 50.7 vs 61.3).
DSPARK_HD int attn_active_chunks(int64_t start, int64_t T, int splits) {
  const int64_t a = (start + T - 1) / kAttnChunk + 1;
  return int(a < splits ? a : splits);
}

// Query heads per block (2026-12-07, s18): a block takes h of its KV head's G query heads. While
// the blocks of whole heads (`blocks`: Hkv * B * active chunks * row groups) are under one wave
// of `sms`, h halves (an odd h > 1 goes to 1). Why: a decode at batch 1 over a short cache has
// one block per KV head (8 at Qwen3-8B's shape), each a single latency chain (ncu, s16: one warp
// a scheduler, an instruction issued every 10 cycles, 44.6 µs), and its scoring, softmax and
// weighted-V work grow with its query vectors; the split blocks read the same K/V rows (L2 after
// the first). A query's arithmetic does not depend on which queries share its block.
DSPARK_HD int attn_heads_per_block(int64_t G, int64_t blocks, int sms) {
  int64_t h = G;
  while (h > 1 && blocks * (G / h) < int64_t(sms)) h = h % 2 == 0 ? h / 2 : 1;
  return int(h);
}

// Grid z of kernel 1: fixed rows per block (sms == 0): splits * ceil(T / rows) * G / heads; per
// request (sms > 0): the most (active chunks x row groups x head groups) any start can ask for
// (`heads` > 0: that many query heads a block, else attn_heads_per_block's). Once a >= 16 and the
// grid has two waves the rules give r = T and whole heads, so z(a) = a <= splits <= z(splits):
// the loop stops.
inline int64_t attn_grid_z(int64_t T, int64_t G, int splits, int64_t heads_x_batch, int sms,
                           int rows, int heads = 0) {
  auto head_groups = [&](int64_t blocks) {
    return G / (heads > 0 ? heads : sms > 0 ? attn_heads_per_block(G, blocks, sms) : G);
  };
  const int64_t groups = (T + rows - 1) / rows;
  int64_t z = int64_t(splits) * groups * head_groups(heads_x_batch * splits * groups);
  for (int a = 1; sms > 0 && a <= splits && (a < 16 || heads_x_batch * a < 2 * int64_t(sms)); ++a) {
    const int64_t r = attn_rows_per_block(T, G, a, heads_x_batch * a, sms);
    const int64_t ga = (T + r - 1) / r, za = a * ga * head_groups(heads_x_batch * a * ga);
    z = za > z ? za : z;
  }
  return z;
}

// Query vectors per weighted-V pass: KV = VEC-wide loads per lane of a V row (16 lanes a row),
// so a pass keeps attn_pass_q(KV) * KV * VEC fp32 sums per lane (64 for 16-bit heads <= 128).
constexpr int kAttnMaxPassQ = 8;
constexpr int attn_pass_q(int kv) { return kv == 1 ? kAttnMaxPassQ : 4; }

// Shared memory of kernel 1: floats newk, newv [T][D], q [maxq][D], scores [maxq][chunk],
// per-warp outputs [warps][kAttnMaxPassQ][D], statistics [maxq][2 warps + 2], the q and k norm
// weights [D] each and the rotary frequencies [D / 2]; then ints depth, parent [T] and the
// ancestor table [T][T] (bytes).
inline size_t attn_smem_bytes(int64_t T, int64_t D, int maxq) {
  const size_t floats = size_t(T) * 2 * D + size_t(maxq) * D + size_t(maxq) * kAttnChunk +
                        size_t(kAttnWarps) * kAttnMaxPassQ * D +
                        size_t(maxq) * (2 * kAttnWarps + 2) + 2 * size_t(D) + size_t(D) / 2;
  return floats * sizeof(float) + 2 * sizeof(int) * size_t(T) + size_t(T) * T;
}

// Heads [0, nheads) of `heads` ([nheads][D] fp32 values of T, shared memory) in place: per-head
// RMSNorm with weight_of(hd) (null = none), then rotary at position pos_of(hd). One warp per
// head for the norm; the rotation takes the pair (d, d + D/2) per thread, in place. Bits depend
// on the head's values, weight and position only.
template <typename T, typename W, typename Pos>
__device__ void norm_rope_heads(float* heads, int nheads, int D, W weight_of, Pos pos_of, float eps,
                                const float* inv_freq) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int hd = warp; hd < nheads; hd += kAttnWarps) {
    const float* w = weight_of(hd);  // fp32 copies of the weights (shared memory)
    if (!w) continue;
    float* x = heads + hd * D;
    float ss = 0.0f;
    for (int d = lane; d < D; d += 32) ss = __fmaf_rn(x[d], x[d], ss);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float inv = rsqrtf(ss / float(D) + eps);
    for (int d = lane; d < D; d += 32) x[d] = round_t<T>(to_f(w[d]) * round_t<T>(x[d] * inv));
  }
  __syncthreads();
  const int half = D / 2;
  for (int i = threadIdx.x; i < nheads * half; i += blockDim.x) {
    const int hd = i / half, d = i - hd * half;
    float* x = heads + hd * D;
    const float f = pos_of(hd) * inv_freq[d];
    const float c = round_t<T>(cosf(f)), s = round_t<T>(sinf(f));
    const float x1 = x[d], x2 = x[d + half];
    x[d] = round_t<T>(round_t<T>(x1 * c) + round_t<T>(-x2 * s));
    x[d + half] = round_t<T>(round_t<T>(x2 * c) + round_t<T>(x1 * s));
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace dspark
