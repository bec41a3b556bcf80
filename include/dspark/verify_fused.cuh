// dspark/verify_fused.cuh: CUDA verify/sample in one kernel (plus a kernel zeroing its counters,
// and the probabilities kernel when sample is asked for them). Every block is one of:
//   statistics block k of request r (plan.B per request): warp chunks of the request's rows
//     (lane_chunk.cuh: greedy max/argmax, or base + sum of e), partials to the workspace; a
//     top-k/top-p row goes whole to one block (row_stats.cuh: filtered_row); block 0's first
//     warp also checks the request (early_checks). The block that completes request r's count
//     finishes it: read the checks' verdict, finalize its rows, walk its tree
//     (verify_walk.cuh), then draw the last token itself (greedy rows: the argmax; otherwise one
//     chunk re-read, plus one per rejected one-hot draft) or, when a draft with a full
//     distribution q was rejected there, hand the draw to the request's residual blocks;
//   residual block k of request r (plan.X per request, only with draft_probs): waits for the
//     hand-off, sums the residual max(e - q Z, 0) over its slice of the final row; the block that
//     completes the count draws (verify_draw.cuh).
// Deadlock freedom: with residual blocks, a block learns its role from a ticket (an atomic
// counter at its start, so tickets follow actual start order) and every statistics ticket of
// request r precedes its residual tickets. A waiting residual block therefore only waits on
// blocks that already started and never wait themselves. Tickets interleave requests with a lag
// of plan.D: request r's residual slices run while request r + D's statistics stream, mostly
// after r's walk, while r's final row may still be in L2.
// Launch: launch_verify_fused at the bottom (geometry and shapes there); programmatic where sm_90
// code runs, so the blocks load logits while the counters are still being cleared.
#pragma once
#include <algorithm>
#include <type_traits>

#include "dspark/lane_chunk.cuh"
#include "dspark/sync.cuh"
#include "dspark/verify.cuh"  // verify_workspace_layout
#include "dspark/verify_draw.cuh"
#include "dspark/verify_walk.cuh"

// Phase marks for bench/probe_verify.cu (mark i reached by a block of request r); nothing in the
// product build.
#ifndef DSPARK_VERIFY_MARK
#define DSPARK_VERIFY_MARK(i, r)
#endif

namespace dspark {
namespace cuda {

// Counters cleared before every launch, in one int32 buffer after the status word:
// [status, ticket, stats_done[R], job_state[R], resid_done[R], verdict[R]].
struct FusedControl {
  uint32_t* ticket;
  uint32_t* stats_done;  // statistics blocks of request r done
  uint32_t* job_state;   // 0 while request r is open, then kJobDone or kJobResidual
  uint32_t* resid_done;  // residual blocks of request r done
  int32_t* verdict;      // request r's check bits (check_request_warp), written by its block 0
};
enum : uint32_t { kJobDone = 1, kJobResidual = 2 };
inline int64_t fused_control_words(int64_t R) { return 2 + 4 * R; }

struct FusedPlan {
  int64_t S;  // slices per row: kBlockWarps warp chunks each
  int64_t B;  // statistics blocks per request (each loops over slices of the request's rows)
  int64_t X;  // residual blocks per request (one slice of the final row each); 0 without q
  int64_t D;  // lag, in requests, of a request's residual tickets behind its statistics ones
};

// Ticket t -> (request, block within its role); true for a residual block. Rounds g = 0.. R+D-1
// hold request g's B statistics tickets (g < R) then request g-D's X residual tickets (g >= D).
__device__ __forceinline__ bool decode_ticket(int64_t t, const FusedPlan& pl, int64_t R, int64_t& r,
                                              int64_t& k) {
  const int64_t D = pl.D, B = pl.B, X = pl.X;
  if (t < D * B) {
    r = t / B;
    k = t % B;
    return false;
  }
  t -= D * B;
  if (t < (R - D) * (B + X)) {
    const int64_t g = D + t / (B + X), w = t % (B + X);
    r = w < B ? g : g - D;
    k = w < B ? w : w - B;
    return w >= B;
  }
  t -= (R - D) * (B + X);
  r = R - D + t / X;
  k = t % X;
  return true;
}

// The block that completed request r's statistics count: all threads.
template <typename S, typename Q>
__device__ __noinline__ void finish_request(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws,
                                            const FusedControl& ctl, int64_t r) {
  DSPARK_VERIFY_MARK(2, r);
  int64_t o, n;
  request_rows(p, r, o, n);
  // Checked by statistics block 0 before it arrived (check_request_warp: -1 outputs, bits raised)
  const int32_t bad = __ldcg(ctl.verdict + r);
  if (bad) {
    if (threadIdx.x == 0) close_request(p, ws, r);
    publish(ctl.job_state + r, kJobDone);
    return;
  }
  DSPARK_VERIFY_MARK(3, r);
  if (p.q != nullptr)  // the walk reads q(x) of every node: fetch while the rows are finalized
    for (int64_t j = 1 + threadIdx.x; j < n; j += blockDim.x)
      prefetch_l2(p.q + (o + j) * p.V + p.tokens[o + j]);
  finalize_request_rows(p, ws, r, o, n, kWarpChunk);
  DSPARK_VERIFY_MARK(4, r);
  if (p.offsets != nullptr && walks_onehot(p, n)) {
    if (walk_onehot(p, ws, r, o, n)) {  // greedy: the last token written; no residual block waits
      DSPARK_VERIFY_MARK(6, r);
      return;
    }
  } else if (p.offsets != nullptr) {
    walk_tree(p, ws, r, o, n);
  } else if (threadIdx.x == 0) {  // sample: nothing to walk, the root's row is drawn from
    ws.final_row[r] = r;
    ws.n_rej[r] = 0;
    ws.accepted[r] = 0;
    ws.job_u[r] = coin(p, r, o, 0, kSampleCoin);
  }
  __syncthreads();
  DSPARK_VERIFY_MARK(5, r);
  const int64_t row = ws.final_row[r];
  const int32_t nrej = ws.n_rej[r], acc = ws.accepted[r];
  if (p.q != nullptr && nrej > 0) {  // residual over a full q row: the residual blocks' job
    publish(ctl.job_state + r, kJobResidual);
    return;
  }
  const RowInfo info = ws.info[row];
  // Greedy rows draw their argmax whatever was rejected (a one-hot draft is rejected only when
  // it is not the argmax); sampled rows draw from the chunk sums.
  const int32_t* rejected =
      p.offsets != nullptr && walks_onehot(p, n) ? onehot_rejected_tokens() : nullptr;
  const int64_t token =
      info.greedy ? info.argmax : draw_at_row(p, ws, r, o, row, info, nrej, ws.job_u[r], rejected);
  if (threadIdx.x == 0) {
    p.out_tokens[r * p.W + acc] = token;
    if (p.out_count) p.out_count[r] = acc;
  }
  DSPARK_VERIFY_MARK(6, r);
  publish(ctl.job_state + r, kJobDone);
}

// Residual mass of warp chunk c of request r's final row (all lanes get it). One rejected
// sibling at an unfiltered sampled row (the chain case): e from exp_rel relative to the row
// base (exact, or less below 2^-126 of the row's top entry) and max(e - q Z, 0) entry by entry;
// any other case: residual_at, the exact per-entry formula.
template <typename S, typename Q>
__device__ double residual_chunk(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t r,
                                 int64_t o, int64_t row, const RowInfo& info, int32_t nrej,
                                 int64_t c) {
  const S* w = p.logits + row * p.V;
  const int64_t start = c * kWarpChunk;
  double s = 0.0;
  if (nrej == 1 && !info.greedy && info.t_keep == -INFINITY && exp_base_ok(info.nbase)) {
    constexpr int kVec = 16 / sizeof(S);
    LaneChunk<S> lc;
    load_lane_chunk(w, p.V, p.vec_loads, start, lc);
    const int64_t j = o + __ldcg(ws.rej_node + r * p.W);
    const double z = __ldcg(ws.rej_z + r * p.W);
    const int64_t x = p.tokens[j];
    const Q* qrow = p.q + j * p.V;
    const ExpBase eb = exp_base(info.nbase);
    int32_t bad = 0;
#pragma unroll 1
    for (int g = 0; g < kLaneEntries / kVec; ++g) {
      Q qv[kVec];
      load_q_group<S, Q>(qrow, p.V, p.vec_loads, p.q_vec_loads, start, g, qv);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const int e = g * kVec + i;
        const double qd = static_cast<double>(qv[i]);
        bad |= draft_prob_status(qd);
        const double ev = exp_rel(log2_scaled(lc.at(e), info.inv_t), eb);
        s += residual_step(ev, false, chunk_entry<S>(p.vec_loads, start, e), x, qd, z);
      }
    }
    if (bad) atomicOr(p.status, bad);
  } else {
    for (int e = 0; e < kLaneEntries; ++e) {
      const int64_t v = chunk_entry<S>(p.vec_loads, start, e);
      if (v < p.V) s += residual_at(p, ws, r, o, info, w, nrej, v);
    }
  }
  return warp_sum(s);
}

template <typename S, typename Q>
__device__ __noinline__ void residual_block(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws,
                                            const FusedControl& ctl, const FusedPlan& pl, int64_t r,
                                            int64_t k) {
  __shared__ uint32_t s_state;
  if (threadIdx.x == 0) s_state = wait_nonzero(ctl.job_state + r);
  __syncthreads();
  if (s_state != kJobResidual) return;
  DSPARK_VERIFY_MARK(8, r);
  const int64_t o = p.offsets[r], row = __ldcg(ws.final_row + r);
  const int32_t nrej = __ldcg(ws.n_rej + r);
  const RowInfo info = load_cg(ws.info + row);
  const int64_t c = k * kBlockWarps + threadIdx.x / 32;
  if (c < p.C) {
    const double s = residual_chunk(p, ws, r, o, row, info, nrej, c);
    if ((threadIdx.x & 31) == 0) ws.resid_chunk[r * p.C + c] = s;
  }
  if (!arrive_last(ctl.resid_done + r, static_cast<uint32_t>(pl.X))) return;
  DSPARK_VERIFY_MARK(9, r);
  // The last residual block draws: from the residual, or the target row if it vanished.
  double* sums = shared_chunk_sums();
  for (int64_t b = threadIdx.x; b < p.C; b += blockDim.x)
    sums[b] = __ldcg(ws.resid_chunk + r * p.C + b);
  __syncthreads();
  double z = chunk_total(sums, p.C);
  int32_t steps = nrej;
  if (z == 0.0) {
    for (int64_t b = threadIdx.x; b < p.C; b += blockDim.x)
      sums[b] = __ldcg(ws.chunk_sum + row * p.C + b);
    __syncthreads();
    z = info.total;
    steps = 0;
  }
  const S* w = p.logits + row * p.V;
  const int64_t token = block_draw<kWarpChunk>(
      sums, p.C, p.V, __ldcg(ws.job_u + r) * z,
      [&](int64_t v) { return residual_at(p, ws, r, o, info, w, steps, v); });
  if (threadIdx.x == 0) {
    const int32_t acc = __ldcg(ws.accepted + r);
    p.out_tokens[r * p.W + acc] = token;
    if (p.out_count) p.out_count[r] = acc;
  }
  DSPARK_VERIFY_MARK(10, r);
}

// Cold paths stay out of the statistics loop's registers.
template <typename S, typename Q>
__device__ __noinline__ void filtered_row_block(const VerifyParams<S, Q>& p,
                                                const VerifyWorkspace& ws, int64_t row, int32_t r) {
  filtered_row(p, ws, row, r, kWarpChunk);
}

// Warm L2 with the inputs request r's finishing block reads and no statistics block touches
// (node data, coins): its latency is a chain of such reads. Request r's first statistics block
// issues these before its own loads (prefetches hold no registers).
template <typename S, typename Q>
__device__ __forceinline__ void prefetch_request(const VerifyParams<S, Q>& p, int64_t r, int64_t o,
                                                 int64_t n) {
  if (threadIdx.x == 0 && p.seeds) {
    prefetch_l2(p.seeds + r);
    prefetch_l2(p.positions + r);
  }
  if (p.offsets == nullptr) {  // sample
    if (threadIdx.x == 0 && p.uniforms) prefetch_l2(p.uniforms + r);
    return;
  }
  for (int64_t j = threadIdx.x; j < n && j < kBlockThreads; j += blockDim.x) {
    prefetch_l2(p.parents + o + j);
    prefetch_l2(p.tokens + o + j);
    if (p.uniforms) prefetch_l2(p.uniforms + 2 * (o + j));
  }
}

// Warp 0 of request r's statistics block 0: the request's checks (check_request_warp), their
// bits raised and kept in ctl.verdict for the finisher, which then has no check of its own to
// wait for (its latency is a chain of small reads: here it overlaps the block's logits loads).
template <typename S, typename Q>
__device__ __forceinline__ void early_checks(const VerifyParams<S, Q>& p, const FusedControl& ctl,
                                             int64_t r, int64_t o, int64_t n) {
  const int32_t bad = check_request_warp(p, r, o, n);
  if ((threadIdx.x & 31) == 0) {
    ctl.verdict[r] = bad;
    if (bad) atomicOr(p.status, bad);
  }
}

template <typename S, typename Q>
__device__ void stats_block(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws,
                            const FusedControl& ctl, const FusedPlan& pl, int64_t r, int64_t k) {
  // The block's first chunk, where the chain layout puts it (request r's rows from r * W), into
  // L2 while the offsets and parameters are read: its load then waits on L2, not DRAM. A guess
  // (another layout only loses the prefetch); always inside the logits. Measured (probe, H100,
  // s22): L2-cold R 32 / 64 -0.7 to -2.1 µs a call, but R 1 with the logits in L2 +0.4 µs (its
  // statistics blocks end later); branch s22-guess-prefetch keeps it to blocks that loop.
  const int64_t guess = (p.offsets ? r * p.W : r) + k / pl.S;
  const int64_t c0 = (k % pl.S) * kBlockWarps + threadIdx.x / 32;
  if (p.vec_loads && guess < p.N && c0 < p.C)
    prefetch_lane_chunk(p.logits + guess * p.V, p.V, c0 * kWarpChunk);
  int64_t o, n;
  request_rows(p, r, o, n);
  const float temperature = p.temperature[r];
  const int64_t top_k = p.top_k[r];
  const float top_p = p.top_p[r];
  bool check = k == 0 && threadIdx.x < 32;  // warp 0 of block 0 still owes the checks
  // A malformed request is left alone here (no row of it is read); its finisher reports it.
  if (offsets_status(r, p.R, o, o + n, p.N, p.W) == 0 &&
      param_status(temperature, top_k, top_p, p.seeds || p.uniforms) == 0) {
    if (k == 0) prefetch_request(p, r, o, n);
    if (is_filtered(temperature, top_k, top_p)) {  // a block per row, the whole row
      pdl_wait();
      for (int64_t j = k; j < n; j += pl.B)
        filtered_row_block(p, ws, o + j, static_cast<int32_t>(r));
    } else {
      const bool greedy = is_greedy(temperature);
      const float inv_t = inverse_temperature(temperature);
      for (int64_t item = k; item < n * pl.S; item += pl.B) {
        const int64_t next = item + pl.B, cn = (next % pl.S) * kBlockWarps + threadIdx.x / 32;
        if (p.vec_loads && next < n * pl.S && cn < p.C)
          prefetch_lane_chunk(p.logits + (o + next / pl.S) * p.V, p.V, cn * kWarpChunk);
        const int64_t row = o + item / pl.S;
        const int64_t c = (item % pl.S) * kBlockWarps + threadIdx.x / 32;
        if (c >= p.C) continue;  // warp-uniform
        LaneChunk<S> lc;
        load_lane_chunk(p.logits + row * p.V, p.V, p.vec_loads, c * kWarpChunk, lc);
        pdl_wait();   // before any write (returns at once after the first time)
        if (check) {  // while this warp's first logits are in flight
          early_checks(p, ctl, r, o, n);
          check = false;
        }
        int32_t bad = 0;
        const int64_t slot = row * p.C + c;
        if (greedy) {
          float top;
          int32_t idx;
          greedy_chunk(lc, p.vec_loads, c * kWarpChunk, top, idx, bad);
          if ((threadIdx.x & 31) == 0) {
            ws.chunk_wmax[slot] = top;
            ws.chunk_widx[slot] = idx;
          }
        } else {
          float base;
          double sum;
          sampled_chunk(lc, inv_t, base, sum, bad);
          if ((threadIdx.x & 31) == 0) {
            ws.chunk_base[slot] = base;
            ws.chunk_sum[slot] = sum;
          }
        }
        if (bad) atomicOr(p.status, bad);
      }
    }
  }
  pdl_wait();  // warps that wrote nothing yet (no chunk of theirs, malformed or filtered rows)
  if (check) early_checks(p, ctl, r, o, n);  // not done in the loop (malformed, filtered rows)
  DSPARK_VERIFY_MARK(1, r);
  if (arrive_last(ctl.stats_done + r, static_cast<uint32_t>(pl.B))) finish_request(p, ws, ctl, r);
}

// Registers are capped at 64 (4 blocks of 256 threads per SM): the statistics pass is bound by
// bytes in flight, 16 KB of bf16 logits per block. The parameters are __grid_constant__: the cold
// paths (noinline) take them by reference, which would otherwise copy them to local memory in
// every thread of every block.
template <typename S, typename Q>
__global__ void __launch_bounds__(kBlockThreads, 4)
    FusedVerifyKernel(const __grid_constant__ VerifyParams<S, Q> p,
                      const __grid_constant__ VerifyWorkspace ws,
                      const __grid_constant__ FusedControl ctl,
                      const __grid_constant__ FusedPlan pl) {
  int64_t r, k;
  bool residual = false;
  DSPARK_VERIFY_MARK(0, blockIdx.x / pl.B);
  if (pl.X == 0) {  // nobody waits: the block index is the role
    r = blockIdx.x / pl.B;
    k = blockIdx.x % pl.B;
  } else {
    __shared__ uint32_t s_ticket;
    pdl_wait();  // the counters are cleared by the kernel before
    if (threadIdx.x == 0) s_ticket = atomicAdd(ctl.ticket, 1u);
    __syncthreads();
    residual = decode_ticket(s_ticket, pl, p.R, r, k);
  }
  if (residual) residual_block(p, ws, ctl, pl, r, k);
  else stats_block(p, ws, ctl, pl, r, k);
  DSPARK_VERIFY_MARK(7, r);
}

// sample(return_probs=True): p(v) = e(v) / S, grid (R, C), one chunk per block.
template <typename S, typename Q>
__global__ void FusedProbsKernel(VerifyParams<S, Q> p, VerifyWorkspace ws) {
  const int64_t r = blockIdx.x, c = blockIdx.y;
  if (ws.final_row[r] < 0) return;
  const RowInfo info = ws.info[r];
  const S* w = p.logits + r * p.V;
  for (int64_t v = c * kWarpChunk + threadIdx.x; v < min(p.V, (c + 1) * kWarpChunk);
       v += blockDim.x)
    p.probs[r * p.V + v] = row_e(info, v, to_f(w[v])) / info.total;
}

constexpr int64_t kMaxStatsBlocks = 512;  // per request; more rows: blocks loop over slices

// Grid geometry for vocabulary V, R requests of at most W rows; num_sms: the device's SM count;
// lag > 0 overrides the residual tickets' lag (an A/B knob, DSPARK_FUSED_LAG).
inline FusedPlan fused_plan(int64_t V, int64_t R, int64_t W, bool has_q, int num_sms,
                            int64_t lag = 0) {
  FusedPlan pl{};
  pl.S = ceil_div(ceil_div(V, kWarpChunk), kBlockWarps);
  // One slice per block while the grid is a few waves (latency: small batches); beyond about
  // 16 slices per SM, up to 4 per block, so that a block's fixed costs (the offsets read before
  // its loads, the fence and count after) are paid less often (bandwidth: large batches).
  const int64_t per_block = std::clamp<int64_t>(R * W * pl.S / (16 * int64_t(num_sms)), 1, 4);
  pl.B = std::min(ceil_div(W * pl.S, per_block), kMaxStatsBlocks);
  pl.X = has_q ? pl.S : 0;
  // Lag: about two waves of resident blocks (4 per SM) between a request's statistics tickets
  // and its residual ones, so that its walk is usually done when they start (a residual block
  // that starts early holds its slot while it waits). Measured on an H100 (R = 64, gamma = 7):
  // one wave left too many waiting.
  if (pl.X) pl.D = std::min(R, lag > 0 ? lag : ceil_div(8 * int64_t(num_sms), pl.B + pl.X) + 1);
  return pl;
}
inline int64_t fused_grid(const FusedPlan& pl, int64_t R) { return R * (pl.B + pl.X); }

// Shapes: logits [N, V] (rows 16-byte aligned or not), q [N, V] or none, R requests with node
// offsets [R + 1] (sample: offsets, tokens, parents == nullptr and N == R root rows), output
// width W. workspace: verify_workspace_layout(N, R, W, V, nullptr, kWarpChunk).bytes; control:
// int32 [fused_control_words(R)], control[0] the status word. Grid: fused_grid blocks of
// kBlockThreads (cudaErrorInvalidConfiguration past 2^31 - 1: the caller checks first).
template <typename S, typename Q>
cudaError_t launch_verify_fused(VerifyParams<S, Q> p, void* workspace, int32_t* control,
                                int num_sms, int64_t lag, cudaStream_t stream) {
  p.C = ceil_div(p.V, kWarpChunk);
  p.vec_loads = (p.V * sizeof(S)) % 16 == 0 && reinterpret_cast<uintptr_t>(p.logits) % 16 == 0;
  p.q_vec_loads = p.q != nullptr && reinterpret_cast<uintptr_t>(p.q) % 16 == 0;
  p.status = control;
  const VerifyWorkspace ws = verify_workspace_layout(p.N, p.R, p.W, p.V, workspace, kWarpChunk).ws;
  uint32_t* words = reinterpret_cast<uint32_t*>(control);
  const FusedControl ctl{words + 1, words + 2, words + 2 + p.R, words + 2 + 2 * p.R,
                         control + 2 + 3 * p.R};
  const FusedPlan pl = fused_plan(p.V, p.R, p.W, p.q != nullptr, num_sms, lag);
  const int64_t grid = fused_grid(pl, p.R);
  if (grid > INT32_MAX) return cudaErrorInvalidConfiguration;
  cudaError_t err = zero_words(control, fused_control_words(p.R), stream);
  if (err != cudaSuccess) return err;
  // An empty batch (then N == 0) launches nothing: a grid of zero blocks is a launch error.
  if (p.R == 0) return cudaSuccess;
  // Programmatic launch where sm_90 code runs (pdl.cuh): the kernel starts while the counters are
  // cleared and waits for that (pdl_wait) before its first write. Its inputs it may read before:
  // the clearing kernel launches in plain stream order, so every kernel that wrote them has
  // completed before this one can start (the one exception to pdl.cuh's contract).
  bool programmatic = false;
  if ((err = sm90_paths(FusedVerifyKernel<S, Q>, &programmatic)) != cudaSuccess) return err;
  err = launch_ex(programmatic, FusedVerifyKernel<S, Q>, dim3(static_cast<unsigned>(grid)),
                  dim3(kBlockThreads), 0, stream, p, ws, ctl, pl);
  if (err != cudaSuccess) return err;
  if (p.probs) FusedProbsKernel<<<dim3(p.R, p.C), kBlockThreads, 0, stream>>>(p, ws);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dspark
