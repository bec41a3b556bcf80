// dspark/attention_kernel.cuh: the two kernels of dspark::decode_attention and their launcher
// (shapes, virtual slots and the fixed summation order: dspark/attention.cuh).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dspark/attention.cuh"
#include "dspark/sync.cuh"  // prefetch_l2

namespace dspark {
namespace cuda {

// VEC: elements per K/V load; MAXQ: query vectors (row x head) per scoring tile, >= G and a
// compile-time bound so the per-thread scores stay in registers; KV: VEC-wide loads per lane of
// a V row (D <= 16 VEC KV), which sets the query vectors of a weighted-V pass (attn_pass_q).
template <typename T, int VEC, int MAXQ, int KV>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_kernel(AttnParams<T> p) {
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
  int* depth = reinterpret_cast<int*>(fin + 2 * MAXQ);          // [NR]
  int* par = depth + NR;                                        // [NR]
  signed char* anc = reinterpret_cast<signed char*>(par + NR);  // [NR][NR]: ancestor at depth
  const int64_t kvh = blockIdx.x, b = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  pdl_trigger();
  pdl_wait();  // every input but the norm weights comes from earlier kernels (dspark/pdl.cuh)
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {  // one block writes the status
    int bad_pos = 0, bad_par = 0;                               // word (no memset kernel)
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
  if (need_new) {
    for (int i = threadIdx.x; i < NR * D; i += blockDim.x) {
      const int a = i / D, d = i - a * D;
      newk[i] = to_f(src[a * Wq + (p.H + kvh) * D + d]);
      newv[i] = to_f(src[a * Wq + (p.H + p.Hkv + kvh) * D + d]);
    }
    __syncthreads();
    norm_rope_heads<T>(
        newk, NR, D, [&](int) { return p.k_norm; }, [&](int a) { return float(st + depth[a]); },
        p.eps, p.inv_freq);
    if (writer) {
      for (int i = threadIdx.x; i < NR * D; i += blockDim.x) {
        const int a = i / D, d = i - a * D;
        const int64_t at = (head_base + st + a) * D + d;
        p.k_cache[at] = from_f<T>(newk[i]);
        p.v_cache[at] = from_f<T>(newv[i]);
      }
    }
  }
  if (!any) return;

  constexpr int PQ = attn_pass_q(KV);
  const int RT = MAXQ / HB;  // rows per tile (MAXQ >= G >= HB)
  const int half = lane >> 4, hl = lane & 15;
  for (int t0 = j0; t0 < j1; t0 += RT) {
    const int t1 = t0 + RT < j1 ? t0 + RT : j1, nq = (t1 - t0) * HB;
    bool tile_any = false;
    for (int j = t0; j < t1; ++j) tile_any |= sees(j);
    if (!tile_any) continue;
    __syncthreads();  // the previous tile's readers of qs / scores / fin are done
    for (int i = threadIdx.x; i < nq * D; i += blockDim.x) {
      const int qi = i / D, d = i - qi * D, r = qi / HB;
      qs[i] = to_f(src[(t0 + r) * Wq + (h0 + qi - r * HB) * D + d]);
    }
    __syncthreads();
    norm_rope_heads<T>(
        qs, nq, D, [&](int) { return p.q_norm; },
        [&](int qi) { return float(pos_of(t0 + qi / HB)); }, p.eps, p.inv_freq);

    // The tile's scores, softmax and weighted V for TQ query vectors (>= nq), TPQ a pass. A
    // tile of one query vector (decode: one row, one query head a block) runs the TQ = 1
    // instance: the same operations in the same order for that query (so the same bits),
    // unrolled for one query instead of MAXQ, so fewer instructions to fetch and issue (the
    // decode block: one warp a scheduler, a third of its stall waiting for instruction fetch;
    // H100 ncu, 2026-12-07). p.compact = 0: the MAXQ instance for every tile (A/B runs).
    auto attend = [&]<int TQ, int TPQ>() {
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
#pragma unroll 4
        for (int jr = 2 * warp + half; jr < pass_end; jr += 2 * kAttnWarps) {
          const int64_t jj = c0 + jr;
          if (jj < st) {  // a committed slot: one V row for every query of the pass
            const T* vrow = p.v_cache + (head_base + jj) * D;
            float vx[KV][VEC];
#pragma unroll
            for (int k = 0; k < KV; ++k) {
              const int d0 = VEC * (hl + 16 * k);
              if (d0 >= D) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) vx[k][e] = 0.0f;
              } else {
                Vec<T, VEC> vv;
                vv.load(vrow + d0);
#pragma unroll
                for (int e = 0; e < VEC; ++e) vx[k][e] = vv[e];
              }
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
      }
    };
    if (p.compact && nq == 1) attend.template operator()<1, 1>();
    else attend.template operator()<MAXQ, PQ>();
  }
}

// grid (H, T, B), dynamic smem `splits` floats: out[b, j, h] = sum_s w_s o_s / sum_s w_s l_s with
// w_s = e^(m_s - M). Chunk weights are computed once into shared memory; warp w then sums the
// chunks s = w, w + warps, ... for every d (independent loads in flight), and warps are added.
// Chunks a row cannot see have w_s = 0 and are skipped: the result does not depend on S.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) decode_attention_merge_kernel(AttnParams<T> p) {
  extern __shared__ __align__(16) float weight[];  // [splits]
  __shared__ float warp_out[kAttnWarps][kAttnMaxHeadDim];
  const int64_t h = blockIdx.x, j = blockIdx.y, b = blockIdx.z;
  const int64_t bh = (b * p.rows + j) * p.H + h, base = bh * p.splits;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  pdl_trigger();
  pdl_wait();
  // Chunks past the request's active ones hold identities (or, with a per-request split, were
  // never written): skipping them leaves every sum below bit for bit the same.
  const int64_t st = p.start[b];
  const int splits =
      st >= 0 && st + p.rows <= p.S ? attn_active_chunks(st, p.rows, p.splits) : p.splits;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) mx = fmaxf(mx, p.part_ml[2 * (base + s)]);
  mx = block_reduce(mx, MaxOp{}, -INFINITY);
  float total = 0.0f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float m = p.part_ml[2 * (base + s)];
    const float w = m == -INFINITY ? 0.0f : expf(m - mx);
    weight[s] = w;
    total = __fmaf_rn(w, p.part_ml[2 * (base + s) + 1], total);
  }
  total = block_reduce(total, SumOp{}, 0.0f);  // (its barriers also publish `weight`)
  constexpr int kPerLane = kAttnMaxHeadDim / 32;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
#pragma unroll 4
  for (int s = warp; s < splits; s += kAttnWarps) {
    const float w = weight[s];
    if (w == 0.0f) continue;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < p.D) acc[i] = __fmaf_rn(w, p.part_o[(base + s) * p.D + d], acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) warp_out[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kAttnWarps; ++w) o += warp_out[w][d];
    p.out[bh * p.D + d] = from_f<T>(total > 0.0f ? o / total : 0.0f);
  }
}

// Opts `kernel` in to `smem` bytes of dynamic shared memory when over the default 48 KB (once
// per device and size: function attributes are per device).
template <typename K>
cudaError_t attn_smem_opt_in(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  static size_t done[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < 64 && done[dev] >= smem) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err == cudaSuccess && dev >= 0 && dev < 64) done[dev] = smem;
  return err;
}

// KV: VEC-wide loads per lane of a V row, 1 where one load covers the head (16-bit heads <= 128:
// twice the query vectors of a weighted-V pass), else enough for kAttnMaxHeadDim.
template <typename T, int VEC, int MAXQ, int KV>
cudaError_t launch_attention_kernel(const AttnParams<T>& p, cudaStream_t stream) {
  auto kernel = decode_attention_kernel<T, VEC, MAXQ, KV>;
  const size_t smem = attn_smem_bytes(p.rows, p.D, MAXQ);
  cudaError_t err = attn_smem_opt_in(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t z = attn_grid_z(p.rows, p.H / p.Hkv, p.splits, p.Hkv * p.B, p.sms, p.rows_per_block,
                                p.heads_per_block);
  // Both kernels launch in plain stream order, not programmatically: measured on the H200
  // (Qwen3-8B shapes, batch-1 graph-replayed decode; bench/RESULTS.md, fourth session) a
  // programmatic launch behind the qkv projection made the step 0.24 ms slower. The kernels keep
  // pdl_trigger(), so the o projection still launches early and prefetches its weights.
  return launch_ex(false, kernel, dim3(unsigned(p.Hkv), unsigned(p.B), unsigned(z)),
                   dim3(kAttnThreads), smem, stream, p);
}

template <typename T, int MAXQ>
cudaError_t launch_attention_maxq(const AttnParams<T>& p, bool vec, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kFull = (kAttnMaxHeadDim + 16 * kVec - 1) / (16 * kVec);
  if (!vec) return launch_attention_kernel<T, 1, MAXQ, kAttnMaxHeadDim / 16>(p, stream);
  return p.D <= 16 * kVec ? launch_attention_kernel<T, kVec, MAXQ, 1>(p, stream)
                          : launch_attention_kernel<T, kVec, MAXQ, kFull>(p, stream);
}

// Shapes as in AttnParams; host checks: D even, D <= 256, H % Hkv == 0, G <= 16, 1 <= T <= 64,
// splits == attn_splits(S), 1 <= rows_per_block <= T (attn_rows_per_block over all splits; sms
// > 0: chosen again per request in the kernel), part_* sized for splits > 1, attn_grid_z <= 65535.
template <typename T>
cudaError_t launch_decode_attention(const AttnParams<T>& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  auto al = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool vec = p.D % kVec == 0 && al(p.k_cache) && al(p.v_cache);
  const int64_t G = p.H / p.Hkv, rows = p.rows_per_block < p.rows ? p.rows_per_block : p.rows;
  const int64_t want = rows * G < kAttnMaxQ ? rows * G : kAttnMaxQ;  // >= G (G <= 16)
  cudaError_t err = want <= 4    ? launch_attention_maxq<T, 4>(p, vec, stream)
                    : want <= 8  ? launch_attention_maxq<T, 8>(p, vec, stream)
                    : want <= 16 ? launch_attention_maxq<T, 16>(p, vec, stream)
                                 : launch_attention_maxq<T, kAttnMaxQ>(p, vec, stream);
  if (err != cudaSuccess || p.splits == 1) return err;
  auto merge = decode_attention_merge_kernel<T>;
  const size_t merge_smem = sizeof(float) * size_t(p.splits);
  err = attn_smem_opt_in(merge, merge_smem);  // caches beyond 1.5 M slots
  if (err != cudaSuccess) return err;
  // The merge launches programmatically (p.merge_pdl, where sm_90 code runs): its blocks start
  // while kernel 1 runs and wait for it in pdl_wait(), and their pdl_trigger() lets the next
  // kernel (the o projection) launch then too and prefetch its weights during the attention.
  bool pdl = false;
  if (p.merge_pdl && (err = sm90_paths(merge, &pdl)) != cudaSuccess) return err;
  return launch_ex(pdl, merge, dim3(unsigned(p.H), unsigned(p.rows), unsigned(p.B)),
                   dim3(kAttnThreads), merge_smem, stream, p);
}

}  // namespace cuda
}  // namespace dspark
