// dspark/attention_kernel.cuh: kernel 1 of dspark::decode_attention (scores, softmax and weighted
// V of a chunk; the merge and the launcher: dspark/attention_launch.cuh)
// (shapes, virtual slots and the fixed summation order: dspark/attention.cuh).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dspark/attention.cuh"
#include "dspark/sync.cuh"  // prefetch_l2

// Phase marks for bench/probe_attention.cu (a timestamp per phase of one block); empty in the
// product build, so no instruction changes.
#ifndef DSPARK_ATTN_MARK
#define DSPARK_ATTN_MARK(i)
#endif

namespace dspark {
namespace cuda {

// VEC: elements per K/V load; MAXQ: query vectors (row x head) per scoring tile, >= G and a
// compile-time bound so the per-thread scores stay in registers; KV: VEC-wide loads per lane of
// a V row (D <= 16 VEC KV), which sets the query vectors of a weighted-V pass (attn_pass_q).
template <typename T, int VEC, int MAXQ, int KV>
// At most 168 registers where a tile has <= 8 query vectors (3 blocks an SM): the one-query
// instance's batched V loads otherwise raise the whole kernel to 235 and a 32768-slot decode,
// whose many blocks need the occupancy, took 257 instead of 210 µs (H100 probe, 2026-12-07).
__global__ void __launch_bounds__(kAttnThreads, MAXQ <= 8 ? 3 : 1)
    decode_attention_kernel(AttnParams<T> p) {
  extern __shared__ __align__(16) float sm[];
  // 32-bit indices inside the block (rows, heads and dims are small: no 64-bit divisions in the
  // loops); 64-bit only for offsets into the cache and the outputs.
  const int NR = int(p.rows), G = int(p.H / p.Hkv), D = int(p.D);
  const int64_t Wq = (p.H + 2 * p.Hkv) * p.D;  // qkv row width
  float* newk = sm;                            // [NR][D] the block's rows: normed, rotated k
  float* newv = newk + NR * D;                 // [NR][D] and v
  float* qs = newv + NR * D;                   // [MAXQ][D] the tile's query vectors
  float* scores = qs + MAXQ * D;               // [MAXQ][chunk] exp(score - chunk max)
  float* warp_o = scores + MAXQ * kAttnChunk;  // [warps][kAttnMaxPassQ][D]
  float* wmax = warp_o + kAttnWarps * kAttnMaxPassQ * D;        // [warps][MAXQ]
  float* wsum = wmax + kAttnWarps * MAXQ;                       // [warps][MAXQ]
  float* fin = wsum + kAttnWarps * MAXQ;                        // [MAXQ][2]: chunk max, chunk sum
  float* qnorm_w = fin + 2 * MAXQ;                              // [D] q norm weights (fp32)
  float* knorm_w = qnorm_w + D;                                 // [D] k norm weights
  float* freq = knorm_w + D;                                    // [D / 2] rotary frequencies
  int* depth = reinterpret_cast<int*>(freq + D / 2);            // [NR]
  int* par = depth + NR;                                        // [NR]
  signed char* anc = reinterpret_cast<signed char*>(par + NR);  // [NR][NR]: ancestor at depth
  const int64_t kvh = blockIdx.x, b = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  DSPARK_ATTN_MARK(0);
  pdl_trigger();
  pdl_wait();  // every input but the norm weights comes from earlier kernels (dspark/pdl.cuh)
  // One block writes the status word (no memset kernel): the grid's last, which in a decode
  // over a short cache scores an empty chunk and leaves at once (the word's loads and barriers
  // were on the critical path in block 0).
  if (blockIdx.x == gridDim.x - 1 && blockIdx.y == gridDim.y - 1 && blockIdx.z == gridDim.z - 1) {
    int bad_pos = 0, bad_par = 0;
    for (int64_t i = threadIdx.x; i < p.B; i += blockDim.x)
      bad_pos |= p.start[i] < 0 || p.start[i] + NR > p.S;
    for (int64_t i = threadIdx.x; p.parents && i < p.B * NR; i += blockDim.x)
      bad_par |= p.parents[i] < -1 || p.parents[i] >= i % NR;
    bad_pos = __syncthreads_or(bad_pos);
    bad_par = __syncthreads_or(bad_par);
    if (threadIdx.x == 0) *p.status = (bad_pos ? kBadPosition : 0) | (bad_par ? kBadParent : 0);
  }
  const int64_t st = p.start[b];
  const bool valid = st >= 0 && st + NR <= p.S;
  // This block's (chunk, row group, head group): among the request's active chunks when the split
  // is chosen per request (attention.cuh: attn_active_chunks, attn_heads_per_block), else among
  // all of them. Block-uniform. The block's query vectors: rows j0 .. j1 - 1 x its HB query heads
  // h0 .. h0 + HB - 1 (vector qi of a tile: row t0 + qi / HB, head h0 + qi % HB).
  int chunks = p.splits, rpb = p.rows_per_block;
  if (p.sms > 0 && valid) {
    chunks = attn_active_chunks(st, NR, p.splits);
    rpb = attn_rows_per_block(NR, G, chunks, p.Hkv * p.B * chunks, p.sms);
  }
  const int groups = (NR + rpb - 1) / rpb;
  const int HB = p.heads_per_block > 0 ? p.heads_per_block
                 : p.sms > 0 ? attn_heads_per_block(G, p.Hkv * p.B * chunks * groups, p.sms)
                             : G;
  if (int64_t(blockIdx.z) >= int64_t(chunks) * groups * (G / HB)) return;
  const int split = int(blockIdx.z % unsigned(chunks)), rest = int(blockIdx.z / unsigned(chunks));
  const int rg = rest % groups, hg = rest / groups;
  const int64_t h0 = kvh * G + int64_t(hg) * HB;
  const int j0 = rg * rpb, j1 = j0 + rpb < NR ? j0 + rpb : NR;
  const int64_t c0 = int64_t(split) * kAttnChunk;

  // The tree: sanitized parents (outside [-1, j): a root), depths, ancestors by depth.
  for (int j = threadIdx.x; j < NR; j += blockDim.x) {
    const int64_t q = p.parents ? p.parents[b * NR + j] : j - 1;
    par[j] = q >= -1 && q < j ? int(q) : -1;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < NR; j += blockDim.x) {
    int d = 0;
    for (int c = par[j]; c >= 0; c = par[c]) ++d;
    depth[j] = d;
    for (int c = j; c >= 0; c = par[c]) anc[j * NR + d--] = static_cast<signed char>(c);
  }
  __syncthreads();
  DSPARK_ATTN_MARK(1);
  auto pos_of = [&](int j) { return st + depth[j]; };
  auto lo_of = [&](int j) {
    const int64_t P = st + depth[j];
    return p.window > 0 && P - p.window + 1 > 0 ? P - p.window + 1 : int64_t(0);
  };
  auto sees = [&](int j) { return valid && lo_of(j) < c0 + kAttnChunk && pos_of(j) >= c0; };

  // Rows that see nothing of this chunk contribute identities to the merge (or, with a single
  // chunk, only an invalid request does: a zero output).
  bool any = false;
  for (int j = j0; j < j1; ++j) {
    if (sees(j)) {
      any = true;
      continue;
    }
    for (int i = threadIdx.x; i < HB * D; i += blockDim.x) {
      const int hi = i / D, d = i - hi * D;
      const int64_t bh = (b * NR + j) * p.H + h0 + hi;
      if (p.splits == 1) {
        p.out[bh * D + d] = from_f<T>(0.0f);
      } else {
        const int64_t row = bh * p.splits + split;
        if (d == 0) {
          p.part_ml[2 * row] = -INFINITY;
          p.part_ml[2 * row + 1] = 0.0f;
        }
        p.part_o[row * D + d] = 0.0f;
      }
    }
  }
  const bool writer = valid && split == 0 && rg == 0 && hg == 0;  // writes the block's K/V
  const bool need_new = writer || (any && c0 + kAttnChunk > st);
  if (!any && !writer) return;

  const T* src = p.qkv + b * NR * Wq;
  const int64_t head_base = ((p.layer * p.B + b) * p.Hkv + kvh) * p.S;  // slot 0 of this head
  // The chunk's committed K and V rows into L2 first (thread t: slot c0 + t): in a decode step
  // the weights streamed since the previous step have evicted them, and the loads below would
  // wait on HBM batch after batch behind the new rows' norm and rotary. A hint: no bit changes.
  if (p.prefetch && any && c0 + int64_t(threadIdx.x) < st) {
    const int64_t at = (head_base + c0 + threadIdx.x) * D;
    const char* kr = reinterpret_cast<const char*>(p.k_cache + at);
    const char* vr = reinterpret_cast<const char*>(p.v_cache + at);
    for (int o = 0; o < D * int(sizeof(T)); o += 128) {
      prefetch_l2(kr + o);
      prefetch_l2(vr + o);
    }
  }
  DSPARK_ATTN_MARK(2);
  // Loaded together before the first barrier: the norm weights and rotary frequencies (read by
  // every norm below), the first tile's query vectors and the block's new K/V rows, so their
  // trips to memory overlap (one after another, they took ~0.6 µs each in the 1-row tile, H100
  // probe 2026-12-07). Same values, so the same bits.
  const int RT = MAXQ / HB;  // rows per tile (MAXQ >= G >= HB)
  auto load_q = [&](int t0, int nq) {
    for (int i = threadIdx.x; i < nq * D; i += blockDim.x) {
      const int qi = i / D, d = i - qi * D, r = qi / HB;
      qs[i] = to_f(src[(t0 + r) * Wq + (h0 + qi - r * HB) * D + d]);
    }
  };
  const int nq0 = any ? ((j0 + RT < j1 ? j0 + RT : j1) - j0) * HB * D : 0;  // its q elements
  const int nnew = need_new ? NR * D : 0;
  const int nall = D > nq0 ? (D > nnew ? D : nnew) : (nq0 > nnew ? nq0 : nnew);
  for (int i = threadIdx.x; i < nall; i += blockDim.x) {  // an iteration's loads, then stores
    float wq = 0.0f, wk = 0.0f, f = 0.0f, qv = 0.0f, kv = 0.0f, vv = 0.0f;
    if (i < D && p.q_norm) wq = to_f(p.q_norm[i]);
    if (i < D && p.k_norm) wk = to_f(p.k_norm[i]);
    if (2 * i < D) f = p.inv_freq[i];
    if (i < nq0) {
      const int qi = i / D, d = i - qi * D, r = qi / HB;
      qv = to_f(src[(j0 + r) * Wq + (h0 + qi - r * HB) * D + d]);
    }
    if (i < nnew) {
      const int a = i / D, d = i - a * D;
      kv = to_f(src[a * Wq + (p.H + kvh) * D + d]);
      vv = to_f(src[a * Wq + (p.H + p.Hkv + kvh) * D + d]);
    }
    if (i < D) qnorm_w[i] = wq, knorm_w[i] = wk;
    if (2 * i < D) freq[i] = f;
    if (i < nq0) qs[i] = qv;
    if (i < nnew) newk[i] = kv, newv[i] = vv;
  }
  if (need_new) {
    __syncthreads();
    norm_rope_heads<T>(
        newk, NR, D, [&](int) { return p.k_norm ? knorm_w : nullptr; },
        [&](int a) { return float(st + depth[a]); }, p.eps, freq);
    if (writer) {
      for (int i = threadIdx.x; i < NR * D; i += blockDim.x) {
        const int a = i / D, d = i - a * D;
        const int64_t at = (head_base + st + a) * D + d;
        p.k_cache[at] = from_f<T>(newk[i]);
        p.v_cache[at] = from_f<T>(newv[i]);
      }
    }
  }
  DSPARK_ATTN_MARK(3);
  if (!any) return;

  constexpr int PQ = attn_pass_q(KV);
  const int half = lane >> 4, hl = lane & 15;
  for (int t0 = j0; t0 < j1; t0 += RT) {
    const int t1 = t0 + RT < j1 ? t0 + RT : j1, nq = (t1 - t0) * HB;
    bool tile_any = false;
    for (int j = t0; j < t1; ++j) tile_any |= sees(j);
    if (!tile_any) continue;
    __syncthreads();               // the previous tile's readers of qs / scores / fin are done
    if (t0 != j0) load_q(t0, nq);  // (the first tile's: loaded above)
    __syncthreads();
    DSPARK_ATTN_MARK(4);
    norm_rope_heads<T>(
        qs, nq, D, [&](int) { return p.q_norm ? qnorm_w : nullptr; },
        [&](int qi) { return float(pos_of(t0 + qi / HB)); }, p.eps, freq);
    DSPARK_ATTN_MARK(5);

    // The tile's scores, softmax and weighted V for TQ query vectors (>= nq), TPQ a pass. A
    // tile of one query vector (decode: one row, one query head a block) runs the TQ = 1
    // instance: the same operations in the same order for that query (so the same bits),
    // unrolled for one query instead of MAXQ, so fewer instructions to fetch and issue (the
    // decode block: one warp a scheduler, a third of its stall waiting for instruction fetch;
    // H100 ncu, 2026-12-07). p.compact = 0: the MAXQ instance for every tile (A/B runs).
    auto attend = [&]<int TQ, int TPQ, int VB>() {
      // Scores: thread t <-> virtual slot c0 + t; every score is an FMA chain over d in order.
      const int64_t v = c0 + threadIdx.x;
      float sc[TQ];
#pragma unroll
      for (int q = 0; q < TQ; ++q) sc[q] = 0.0f;
      if (v < st) {  // a committed slot: one K row from the cache for the whole tile
        bool need = false;
        for (int j = t0; j < t1; ++j) need |= v >= lo_of(j);
        if (need) {
          const T* krow = p.k_cache + (head_base + v) * D;
#pragma unroll 4
          for (int d0 = 0; d0 < D; d0 += VEC) {
            Vec<T, VEC> kv;
            kv.load(krow + d0);
#pragma unroll
            for (int q = 0; q < TQ; ++q)
              if (q < nq)
#pragma unroll
                for (int e = 0; e < VEC; ++e) sc[q] = __fmaf_rn(qs[q * D + d0 + e], kv[e], sc[q]);
          }
        }
      } else {  // a block slot: the ancestor at depth v - st of each row
        const int64_t dep = v - st;
#pragma unroll
        for (int q = 0; q < TQ; ++q) {
          if (q >= nq) break;
          const int j = t0 + q / HB;
          if (dep > depth[j] || v < lo_of(j)) continue;
          const float* kr = newk + anc[j * NR + dep] * D;
          const float* qq = qs + q * D;
          float s = 0.0f;
          for (int d = 0; d < D; ++d) s = __fmaf_rn(qq[d], kr[d], s);
          sc[q] = s;
        }
      }
      DSPARK_ATTN_MARK(6);
      bool vis[TQ];
#pragma unroll
      for (int q = 0; q < TQ; ++q) {
        const int j = t0 + (q < nq ? q : 0) / HB;
        vis[q] = q < nq && v >= lo_of(j) && v <= pos_of(j);
        sc[q] = vis[q] ? sc[q] * p.scale : -INFINITY;
        float m = sc[q];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) wmax[warp * TQ + q] = m;
      }
      __syncthreads();
      DSPARK_ATTN_MARK(7);
#pragma unroll
      for (int q = 0; q < TQ; ++q) {
        if (q >= nq) break;
        float m = wmax[q];
        for (int w = 1; w < kAttnWarps; ++w) m = fmaxf(m, wmax[w * TQ + q]);
        const float e = vis[q] ? expf(sc[q] - m) : 0.0f;
        scores[q * kAttnChunk + threadIdx.x] = e;
        float l = e;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
        if (lane == 0) wsum[warp * TQ + q] = l;
        if (threadIdx.x == 0) fin[2 * q] = m;
      }
      __syncthreads();
      DSPARK_ATTN_MARK(8);
      if (int(threadIdx.x) < nq) {
        float l = 0.0f;
        for (int w = 0; w < kAttnWarps; ++w) l += wsum[w * TQ + threadIdx.x];
        fin[2 * threadIdx.x + 1] = l;
      }

      // Weighted V, TPQ query vectors (row x head, tile order) a pass: half h of warp w takes
      // virtual slots c0 + 2w + h, then every 2 * warps, its 16 lanes reading the V row in
      // VEC-wide loads (lane l: elements VEC * (l + 16 i)) once for the pass; query i adds the
      // slots its row sees (offsets lo_i <= jj - c0 < end_i), in that order; the halves are added,
      // then the warps in order. (A query's sum is the same whichever queries share its pass.)
      const int pq = p.pass_q > 0 && p.pass_q < TPQ ? p.pass_q : TPQ;
      for (int q0 = 0; q0 < nq; q0 += pq) {
        const int nqp = nq - q0 < pq ? nq - q0 : pq;
        int lo_i[TPQ], end_i[TPQ], pass_end = 0;
#pragma unroll
        for (int i = 0; i < TPQ; ++i) {
          const int j = t0 + (q0 + (i < nqp ? i : 0)) / HB;
          const int64_t lo = lo_of(j), first = c0 > lo ? c0 : lo;
          const int64_t end = c0 + kAttnChunk < pos_of(j) + 1 ? c0 + kAttnChunk : pos_of(j) + 1;
          const bool seen = i < nqp && sees(j);
          lo_i[i] = seen ? int(first - c0) : kAttnChunk;
          end_i[i] = seen ? int(end - c0) : 0;
          pass_end = end_i[i] > pass_end ? end_i[i] : pass_end;
        }
        if (pass_end == 0) continue;  // no row of the pass sees this chunk (uniform in the block)
        float acc[TPQ][KV][VEC];
#pragma unroll
        for (int i = 0; i < TPQ; ++i)
#pragma unroll
          for (int k = 0; k < KV; ++k)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[i][k][e] = 0.0f;
        // The half-warp's slots jr = 2 w + h + 2 * warps * u in batches of VB, each batch's V
        // rows loaded before any is used (one trip to L2 a batch: one slot a trip took 4.3 µs
        // of the 1-row tile's 12, H100 probe 2026-12-07); added in jr order as before.
        constexpr int kStride = 2 * kAttnWarps;
        for (int jb = 2 * warp + half; jb < pass_end; jb += VB * kStride) {
          Vec<T, VEC> vb[VB][KV];
#pragma unroll
          for (int u = 0; u < VB; ++u) {
            const int jr = jb + u * kStride;
            if (jr < pass_end && c0 + jr < st) {
              const T* vrow = p.v_cache + (head_base + c0 + jr) * D;
#pragma unroll
              for (int k = 0; k < KV; ++k)
                if (VEC * (hl + 16 * k) < D) vb[u][k].load(vrow + VEC * (hl + 16 * k));
            }
          }
#pragma unroll
          for (int u = 0; u < VB; ++u) {
            const int jr = jb + u * kStride;
            if (jr >= pass_end) break;
            const int64_t jj = c0 + jr;
            if (jj < st) {  // a committed slot: one V row for every query of the pass
              float vx[KV][VEC];
#pragma unroll
              for (int k = 0; k < KV; ++k) {
                const int d0 = VEC * (hl + 16 * k);
#pragma unroll
                for (int e = 0; e < VEC; ++e) vx[k][e] = d0 < D ? vb[u][k][e] : 0.0f;
              }
#pragma unroll
              for (int i = 0; i < TPQ; ++i) {
                if (jr < lo_i[i] || jr >= end_i[i]) continue;
                const float w = scores[(q0 + i) * kAttnChunk + jr];
#pragma unroll
                for (int k = 0; k < KV; ++k)
#pragma unroll
                  for (int e = 0; e < VEC; ++e) acc[i][k][e] = __fmaf_rn(w, vx[k][e], acc[i][k][e]);
              }
            } else {  // a block slot: the V row of each query's ancestor at depth jj - st
#pragma unroll
              for (int i = 0; i < TPQ; ++i) {
                if (jr < lo_i[i] || jr >= end_i[i]) continue;
                const int j = t0 + (q0 + i) / HB;
                const float* vnew = newv + anc[j * NR + (jj - st)] * D;
                const float w = scores[(q0 + i) * kAttnChunk + jr];
#pragma unroll
                for (int k = 0; k < KV; ++k) {
                  const int d0 = VEC * (hl + 16 * k);
#pragma unroll
                  for (int e = 0; e < VEC; ++e)
                    acc[i][k][e] = __fmaf_rn(w, d0 < D ? vnew[d0 + e] : 0.0f, acc[i][k][e]);
                }
              }
            }
          }
        }
        DSPARK_ATTN_MARK(9);
#pragma unroll
        for (int i = 0; i < TPQ; ++i)
#pragma unroll
          for (int k = 0; k < KV; ++k)
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float other = __shfl_xor_sync(0xffffffffu, acc[i][k][e], 16);
              const int d = VEC * (hl + 16 * k) + e;
              if (half == 0 && i < nqp && d < D)
                warp_o[(warp * kAttnMaxPassQ + i) * D + d] = acc[i][k][e] + other;
            }
        __syncthreads();
        DSPARK_ATTN_MARK(10);
        for (int x = threadIdx.x; x < nqp * D; x += blockDim.x) {
          const int i = x / D, d = x - i * D, q = q0 + i, j = t0 + q / HB;
          if (!sees(j)) continue;  // (its identities are written above)
          const int64_t bh = (b * NR + j) * p.H + h0 + (q - (j - t0) * HB);
          float o = 0.0f;
          for (int w = 0; w < kAttnWarps; ++w) o += warp_o[(w * kAttnMaxPassQ + i) * D + d];
          if (p.splits == 1) {
            p.out[bh * D + d] = from_f<T>(o / fin[2 * q + 1]);
          } else {
            const int64_t row = bh * p.splits + split;
            p.part_o[row * D + d] = o;
            if (d == 0) {
              p.part_ml[2 * row] = fin[2 * q];
              p.part_ml[2 * row + 1] = fin[2 * q + 1];
            }
          }
        }
        __syncthreads();  // warp_o is reused by the next pass
        DSPARK_ATTN_MARK(11);
      }
    };
    // VB: V rows a half-warp lane has in flight at once. The one-query instance keeps 8 (H100
    // probe, 2026-12-07, against 1, with the loads above staged together: the 1-row 8B call
    // 16.2 -> 14.4 µs, the demo target's 14.3 -> 12.0, 8 rows 22.7 -> 22.0); 16 V rows, or 8-16
    // K loads a batch, need more registers than 3 blocks an SM allow and were no faster.
    if (p.compact && nq == 1) attend.template operator()<1, 1, (KV >= 8 ? 1 : 8 / KV)>();
    else attend.template operator()<MAXQ, PQ, 1>();
  }
}

}  // namespace cuda
}  // namespace dspark
