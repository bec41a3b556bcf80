// dspark/verify_walk.cuh: the per-request part of CUDA verify, shared by the staged kernels
// (verify.cuh: WalkKernel) and the fused kernel (verify_fused.cuh: the block that finishes a
// request). Once every row of a request has its RowInfo:
//   open_request  all threads: -1 outputs, then the request's data checks (offsets, sampling
//                 parameters, parents, tokens, uniforms); an invalid request is closed here
//   walk_tree     all threads gather each node's accept facts, thread 0 walks the tree
//                 (recursive rejection sampling in index order) and records the job of the
//                 final draw: its row, the rejected siblings there, the sampling coin
// Sample launches the same code with root-only requests (p.offsets == nullptr: request r is row
// r, no drafts, uniforms [R] holding the sampling coins).
#pragma once
#include "dspark/block_reduce.cuh"
#include "dspark/row_stats.cuh"  // VerifyParams, VerifyWorkspace
#include "dspark/verify_rules.h"

namespace dspark {
namespace cuda {

// Request r owns flat rows [o, o + n).
template <typename S, typename Q>
__device__ __forceinline__ void request_rows(const VerifyParams<S, Q>& p, int64_t r, int64_t& o,
                                             int64_t& n) {
  if (p.offsets == nullptr) {  // sample: one root row per request
    o = r;
    n = 1;
  } else {
    o = p.offsets[r];
    n = p.offsets[r + 1] - o;
  }
}

template <typename S, typename Q>
__device__ __forceinline__ double draft_prob(const VerifyParams<S, Q>& p, int64_t row, int64_t v) {
  if (p.q == nullptr) return 1.0;
  const double x = static_cast<double>(p.q[row * p.V + v]);
  if (const int32_t bad = draft_prob_status(x)) atomicOr(p.status, bad);
  return x;
}

template <typename S, typename Q>
__device__ __forceinline__ double coin(const VerifyParams<S, Q>& p, int64_t r, int64_t o,
                                       int64_t node, uint64_t purpose) {
  if (p.offsets == nullptr)  // sample: only the root's sampling coin is ever drawn (uniforms [R])
    return p.uniforms ? p.uniforms[r]
                      : node_coin(nullptr, p.seeds, p.positions, r, 0, 0, kSampleCoin);
  return node_coin(p.uniforms, p.seeds, p.positions, r, o, node, purpose);
}

// Residual mass of token v at request r's final row: e(v), then each rejected sibling in order.
// rej_node / rej_z are read through L2: the fused kernel's residual blocks read what another
// block wrote during the same launch.
template <typename S, typename Q>
__device__ double residual_at(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t r,
                              int64_t o, const RowInfo& info, const S* w, int32_t nrej, int64_t v) {
  double e = row_e(info, v, to_f(w[v]));
  for (int32_t i = 0; i < nrej; ++i) {
    const int64_t j = o + __ldcg(ws.rej_node + r * p.W + i);
    e = residual_step(e, p.q == nullptr, v, p.tokens[j], draft_prob(p, j, v),
                      __ldcg(ws.rej_z + r * p.W + i));
  }
  return e;
}

// One warp (all 32 lanes, no block barrier): -1 outputs, then the data checks of request r; its
// status bits, in every lane. The fused kernel runs it in a statistics block, early, while that
// block's logits are in flight; the staged path through open_request.
template <typename S, typename Q>
__device__ __forceinline__ int32_t check_request_warp(const VerifyParams<S, Q>& p, int64_t r,
                                                      int64_t o, int64_t n) {
  const int lane = threadIdx.x & 31;
  for (int64_t k = lane; k < p.W; k += 32) {
    p.out_tokens[r * p.W + k] = -1;
    if (p.out_nodes) p.out_nodes[r * p.W + k] = -1;
  }
  const int32_t offsets_bad = offsets_status(r, p.R, o, o + n, p.N, p.W);
  int32_t mine = 0;
  if (lane == 0)
    mine =
        offsets_bad | param_status(p.temperature[r], p.top_k[r], p.top_p[r], p.seeds || p.uniforms);
  if (offsets_bad == 0) {
    if (p.offsets == nullptr) {
      if (lane == 0 && p.uniforms) mine |= uniform_status(p.uniforms[r]);
    } else {
      for (int64_t j = lane; j < n; j += 32) {
        const int64_t i = o + j;
        mine |= node_status(j, p.parents[i], p.tokens[i], p.V);
        for (int c = 0; p.uniforms && c < 2; ++c) mine |= uniform_status(p.uniforms[i * 2 + c]);
      }
    }
  }
  return static_cast<int32_t>(__reduce_or_sync(0xffffffffu, static_cast<uint32_t>(mine)));
}

// One thread: request r failed its checks (their bits raised elsewhere): final row -1, count 0.
template <typename S, typename Q>
__device__ __forceinline__ void close_request(const VerifyParams<S, Q>& p,
                                              const VerifyWorkspace& ws, int64_t r) {
  ws.final_row[r] = -1;
  if (p.out_count) p.out_count[r] = 0;
}

// All threads of the block: check_request_warp in warp 0; returns the status bits. An invalid
// request is closed here (close_request).
template <typename S, typename Q>
__device__ int32_t open_request(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t r,
                                int64_t o, int64_t n) {
  __shared__ int32_t s_bad;
  __syncthreads();  // s_bad may still be read by an earlier caller's threads
  if (threadIdx.x < 32) {
    const int32_t bad = check_request_warp(p, r, o, n);
    if (threadIdx.x == 0) s_bad = bad;
  }
  __syncthreads();
  const int32_t bad = s_bad;
  if (bad && threadIdx.x == 0) {
    atomicOr(p.status, bad);
    close_request(p, ws, r);
  }
  return bad;
}

// All threads of the block, after open_request passed and every row of the request has its
// RowInfo in ws.info. First every thread gathers, in parallel, the facts each node's accept test
// needs (parent, token, e(token) under the parent's row, q(token), accept coin), into shared
// memory (or the workspace for requests wider than kWalkSmem); then thread 0 walks the tree,
// which is a short sequential loop. The block works together only to re-total a full-q residual
// when another sibling is still to be tried. Ends with ws.final_row / n_rej / accepted / job_u of
// request r written by thread 0 (not yet visible to other threads: sync before reading).
constexpr int kWalkSmem = 256;

// Whether walk_tree hands request r (n nodes) to walk_onehot: one-hot drafts (no q), at most
// kWalkSmem nodes.
template <typename S, typename Q>
__device__ __forceinline__ bool walks_onehot(const VerifyParams<S, Q>& p, int64_t n) {
  return p.q == nullptr && n <= kWalkSmem;
}

// Each node's row total and argmax, in shared memory for walk_onehot (nodes < kWalkSmem):
// written by finalize_request_rows in the same block, so the walk does not read them back
// through L2.
struct WalkRowFacts {
  double* total;
  int32_t* argmax;
};
__device__ __forceinline__ WalkRowFacts walk_row_facts() {
  __shared__ double total[kWalkSmem];
  __shared__ int32_t argmax[kWalkSmem];
  return {total, argmax};
}

// All threads: RowInfo of request r's n rows (finalize_row, one warp a row), the walk's row facts
// (walk_row_facts) too, then a barrier.
template <typename S, typename Q>
__device__ void finalize_request_rows(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws,
                                      int64_t r, int64_t o, int64_t n, int64_t chunk) {
  const WalkRowFacts facts = walk_row_facts();
  for (int64_t j = threadIdx.x / 32; j < n; j += blockDim.x / 32) {
    const RowInfo info = finalize_row(p, ws, o + j, static_cast<int32_t>(r), chunk);
    if ((threadIdx.x & 31) == 0 && j < kWalkSmem) {
      facts.total[j] = info.total;
      facts.argmax[j] = static_cast<int32_t>(info.argmax);
    }
  }
  __syncthreads();
}

// walk_onehot's rejected tokens, in rejection order, left in shared memory for the fused
// kernel's draw (verify_draw.cuh: draw_at_row), which would otherwise re-read each one through
// the workspace (two dependent global reads).
__device__ __forceinline__ int32_t* onehot_rejected_tokens() {
  __shared__ int32_t tokens[kWalkSmem];
  return tokens;
}

// walk_tree where walks_onehot holds, in walk_tree's arithmetic and order: accept child j with
// token x iff u_j * 1 * Z < r(x), r(x) = e_j unless x is a sibling rejected before (then 0), and
// after a rejection Z -= r(x); Z restarts at the row total of each accepted node. Row totals and
// argmaxes are in shared memory already (finalize_request_rows, called before: a precondition);
// every other fact the test reads (parents, tokens, e(token) under the parent's row, accept
// coins) and each node's sampling coin is gathered there in parallel first; then thread 0 walks
// with no barrier per node (walk_tree pays three to four a node, each behind a global read). It
// writes what walk_tree writes. A greedy request's last token is its final row's argmax (p is
// one-hot there): thread 0 writes it and the count too and returns true (the fused kernel is then
// done with the request; the staged path's DrawKernel writes the same values again).
template <typename S, typename Q>
__device__ bool walk_onehot(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t r,
                            int64_t o, int64_t n) {
  __shared__ int32_t sm_parent[kWalkSmem], sm_token[kWalkSmem];
  int32_t* sm_rejected = onehot_rejected_tokens();
  const WalkRowFacts facts = walk_row_facts();  // finalize_request_rows wrote them
  const double* sm_total = facts.total;
  const int32_t* sm_argmax = facts.argmax;
  __shared__ double sm_e[kWalkSmem], sm_u[kWalkSmem], sm_coin[kWalkSmem];
  // Greedy rows are one-hot at their argmax: e(x) = [x == argmax of the parent's row], Z = 1 and
  // any coin u < 1 decides alike, so a greedy gather reads neither logits nor coins (two
  // dependent global reads and two counter-based draws a node) and thread 0 reads e from the
  // argmaxes.
  const bool greedy = is_greedy(p.temperature[r]);
  __syncthreads();  // the shared arrays may still be read by an earlier caller's threads
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t parent = p.parents[o + j], x = p.tokens[o + j];
    sm_parent[j] = static_cast<int32_t>(parent);
    sm_token[j] = static_cast<int32_t>(x);
    if (greedy) {
      sm_coin[j] = 0.0;
      continue;
    }
    sm_coin[j] = coin(p, r, o, j, kSampleCoin);
    if (j == 0) continue;
    const int64_t prow = o + parent;
    sm_e[j] = row_e(ws.info[prow], x, to_f(p.logits[prow * p.V + x]));
    sm_u[j] = coin(p, r, o, j, kAcceptCoin);
  }
  __syncthreads();
  if (threadIdx.x != 0) return greedy;
  int32_t cur = 0, accepted = 0, nrej = 0;
  double z = sm_total[0];
  if (p.out_nodes) p.out_nodes[r * p.W] = o;
  for (int32_t j = 1; j < n; ++j) {
    if (sm_parent[j] != cur) continue;  // not a child of the current node
    const int32_t x = sm_token[j];
    double rx = greedy ? (x == sm_argmax[cur] ? 1.0 : 0.0) : sm_e[j];  // row_e's greedy case
    for (int32_t i = 0; i < nrej; ++i) rx = residual_step(rx, true, x, sm_rejected[i], 1.0, 0.0);
    if (accepts(greedy ? 0.0 : sm_u[j], 1.0, z, rx)) {
      p.out_tokens[r * p.W + accepted] = x;
      ++accepted;
      if (p.out_nodes) p.out_nodes[r * p.W + accepted] = o + j;
      cur = j;
      nrej = 0;
      z = sm_total[j];
    } else {
      ws.rej_node[r * p.W + nrej] = j;
      ws.rej_z[r * p.W + nrej] = z;
      sm_rejected[nrej] = x;
      ++nrej;
      z = onehot_rejected_total(z, rx);
    }
  }
  ws.final_row[r] = o + cur;
  ws.n_rej[r] = nrej;
  ws.accepted[r] = accepted;
  ws.job_u[r] = sm_coin[cur];
  if (greedy) {
    p.out_tokens[r * p.W + accepted] = sm_argmax[cur];
    if (p.out_count) p.out_count[r] = accepted;
  }
  return greedy;
}

template <typename S, typename Q>
__device__ void walk_tree(const VerifyParams<S, Q>& p, const VerifyWorkspace& ws, int64_t r,
                          int64_t o, int64_t n) {
  if (walks_onehot(p, n)) {
    walk_onehot(p, ws, r, o, n);
    return;
  }
  __shared__ int32_t sm_parent[kWalkSmem], sm_token[kWalkSmem];
  __shared__ double sm_e[kWalkSmem], sm_q[kWalkSmem], sm_u[kWalkSmem];
  const bool in_smem = n <= kWalkSmem;
  int32_t* par = in_smem ? sm_parent : ws.f_parent + o;
  int32_t* tok = in_smem ? sm_token : ws.f_token + o;
  double* fe = in_smem ? sm_e : ws.f_e + o;
  double* fq = in_smem ? sm_q : ws.f_q + o;
  double* fu = in_smem ? sm_u : ws.f_u + o;
  __syncthreads();  // the shared arrays may still be read by an earlier caller's threads
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t parent = p.parents[o + j], x = p.tokens[o + j];
    par[j] = static_cast<int32_t>(parent);
    tok[j] = static_cast<int32_t>(x);
    if (j == 0) continue;
    const int64_t prow = o + parent;
    fe[j] = row_e(ws.info[prow], x, to_f(p.logits[prow * p.V + x]));
    fq[j] = draft_prob(p, o + j, x);
    fu[j] = coin(p, r, o, j, kAcceptCoin);
  }
  enum { kAccept, kReject, kNeedSum, kFinal };
  __shared__ int32_t s_cur, s_accepted, s_next, s_nrej, s_action;
  __shared__ double s_z;
  if (threadIdx.x == 0) {
    s_cur = 0;
    s_accepted = 0;
    if (p.out_nodes) p.out_nodes[r * p.W] = o;
  }
  __syncthreads();
  while (true) {
    const int64_t row = o + s_cur;
    const RowInfo info = ws.info[row];
    const S* w = p.logits + row * p.V;
    if (threadIdx.x == 0) {
      s_z = info.total;
      s_nrej = 0;
      s_next = s_cur + 1;
    }
    __syncthreads();
    while (true) {
      if (threadIdx.x == 0) {
        const int32_t cur = s_cur;
        int32_t j = s_next;
        while (j < n && par[j] != cur) ++j;
        if (j >= n) {
          s_action = kFinal;
        } else {
          const int32_t x = tok[j];
          // rx: the residual at x after the siblings rejected so far.
          double rx = fe[j];
          if (s_nrej > 0 && p.q == nullptr) {  // one-hot: cheap, from the facts in shared memory
            for (int32_t i = 0; i < s_nrej; ++i)
              rx = residual_step(rx, true, x, tok[ws.rej_node[r * p.W + i]], 1.0, 0.0);
          } else if (s_nrej > 0) {
            rx = residual_at(p, ws, r, o, info, w, s_nrej, x);
          }
          if (accepts(fu[j], fq[j], s_z, rx)) {
            s_action = kAccept;
          } else {
            ws.rej_node[r * p.W + s_nrej] = j;
            ws.rej_z[r * p.W + s_nrej] = s_z;
            ++s_nrej;
            if (p.q == nullptr) {
              s_z = onehot_rejected_total(s_z, rx);
              s_action = kReject;
            } else {  // re-total the residual only if another sibling will be tested
              int32_t k = j + 1;
              while (k < n && par[k] != cur) ++k;
              s_action = k < n ? kNeedSum : kFinal;
            }
          }
          s_next = j;
        }
      }
      __syncthreads();
      const int32_t action = s_action;
      if (action == kNeedSum) {
        double part = 0.0;
        for (int64_t v = threadIdx.x; v < p.V; v += blockDim.x)
          part += residual_at(p, ws, r, o, info, w, s_nrej, v);
        part = block_reduce(part, SumOp(), 0.0);
        if (threadIdx.x == 0) s_z = part;
      }
      if (action == kReject || action == kNeedSum) {
        if (threadIdx.x == 0) ++s_next;
        __syncthreads();
        continue;
      }
      break;
    }
    if (s_action == kFinal) break;
    __syncthreads();
    if (threadIdx.x == 0) {
      const int32_t j = s_next;
      p.out_tokens[r * p.W + s_accepted] = tok[j];
      ++s_accepted;
      if (p.out_nodes) p.out_nodes[r * p.W + s_accepted] = o + j;
      s_cur = j;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    ws.final_row[r] = o + s_cur;
    ws.n_rej[r] = s_nrej;
    ws.accepted[r] = s_accepted;
    ws.job_u[r] = coin(p, r, o, s_cur, kSampleCoin);
  }
}

}  // namespace cuda
}  // namespace dspark
