// bench/probe_attention.cu: where one decode_attention call's time goes, phase by phase.
// Builds the product's kernels (include/dspark/attention_kernel.cuh, attention_launch.cuh) with
// their phase marks turned on: thread 0 of block (0, 0, 0) of each kernel records clock64() and
// %globaltimer at every mark. Prints the mean time between marks over the repetitions (L2 hot, or
// cold: a 256 MB write between calls), and the wall time per call from CUDA events (a graph of 100
// calls).
//
//   nvcc -std=c++20 -arch=sm_90 -O3 --fmad=false --expt-relaxed-constexpr -I include \
//     bench/probe_attention.cu -o /tmp/probe_attention
//   /tmp/probe_attention [--H 32 --Hkv 8 --D 128 --S 1024 --pos 112 --rows 1 --reps 50]
//
// A measuring tool only (the marks compile to nothing in the product build).
#include <cuda_bf16.h>

#include <cmath>
#include <cstring>

#include "probe_common.cuh"

__device__ long long g_marks[2][16];        // [clock64, globaltimer][mark]
__device__ long long g_merge_marks[2][16];  // (marks 0-3)

// Thread 0 of block (0, 0, 0) stamps mark i.
__device__ __forceinline__ void stamp(long long (*marks)[16], int i) {
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) stamp_mark(marks, i);
}
#define DSPARK_ATTN_MARK(i) ::stamp(::g_marks, i)
#define DSPARK_ATTN_MERGE_MARK(i) ::stamp(::g_merge_marks, i)

#include "dspark/attention_launch.cuh"

using bf16 = __nv_bfloat16;

static const char* kPhase[12] = {"entry -> tree setup",
                                 "tree setup",
                                 "new K/V rows: load, norm, rope, write",
                                 "(end of new rows) -> q loaded",
                                 "q norm + rope",
                                 "scores (thread 0's K row)",
                                 "row max (1st barrier)",
                                 "exp + sums (2nd barrier)",
                                 "weighted V (thread 0's slots)",
                                 "warp sums (barrier)",
                                 "output / partials written"};

int main(int argc, char** argv) {
  int64_t H = 32, Hkv = 8, D = 128, S = 1024, pos = 112, rows = 1;
  int reps = 50, compact = 1, prefetch = 1;
  parse_args(argc, argv, [&](const char* k, double v) {
    if (!std::strcmp(k, "--H")) H = int64_t(v);
    else if (!std::strcmp(k, "--Hkv")) Hkv = int64_t(v);
    else if (!std::strcmp(k, "--D")) D = int64_t(v);
    else if (!std::strcmp(k, "--S")) S = int64_t(v);
    else if (!std::strcmp(k, "--pos")) pos = int64_t(v);
    else if (!std::strcmp(k, "--rows")) rows = int64_t(v);
    else if (!std::strcmp(k, "--reps")) reps = int(v);
    else if (!std::strcmp(k, "--compact")) compact = int(v);
    else if (!std::strcmp(k, "--prefetch")) prefetch = int(v);
    else return false;
    return true;
  });
  const auto [sms, clock_khz] = device_facts();
  const int64_t Wq = (H + 2 * Hkv) * D, cache = Hkv * S * D;
  const int splits = dspark::cuda::attn_splits(S);
  const int64_t parts = splits > 1 ? rows * H * splits : 0;
  std::vector<bf16> h_qkv(rows * Wq), h_cache(cache), h_norm(D);
  Lcg rnd;
  for (auto& x : h_qkv) x = __float2bfloat16(rnd());
  for (auto& x : h_cache) x = __float2bfloat16(rnd());
  for (auto& x : h_norm) x = __float2bfloat16(1.0f + 0.1f * rnd());
  std::vector<float> h_freq(D / 2);
  for (int64_t i = 0; i < D / 2; ++i) h_freq[i] = std::pow(1e6f, -2.0f * float(i) / float(D));
  const std::vector<int64_t> h_start{pos};
  bf16 *qkv = upload(h_qkv), *kc = upload(h_cache), *vc = upload(h_cache), *qn = upload(h_norm),
       *kn = upload(h_norm), *out = device_array<bf16>(rows * H * D);
  float *freq = upload(h_freq), *part_o = device_array<float>(parts * D + 1),
        *part_ml = device_array<float>(parts * 2 + 1);
  int64_t* start = upload(h_start);
  int32_t* status = device_array<int32_t>(1);
  const L2Flush flush;

  const dspark::cuda::AttnParams<bf16> p{
      .qkv = qkv,
      .k_cache = kc,
      .v_cache = vc,
      .start = start,
      .parents = nullptr,
      .inv_freq = freq,
      .q_norm = qn,
      .k_norm = kn,
      .out = out,
      .part_o = part_o,
      .part_ml = part_ml,
      .status = status,
      .B = 1,
      .rows = rows,
      .H = H,
      .Hkv = Hkv,
      .S = S,
      .D = D,
      .layer = 0,
      .window = 0,
      .eps = 1e-6f,
      .scale = 1.0f / std::sqrt(float(D)),
      .splits = splits,
      .rows_per_block = dspark::cuda::attn_rows_per_block(rows, H / Hkv, splits, Hkv * splits, sms),
      .sms = sms,
      .heads_per_block = 0,
      .prefetch = prefetch,
      .merge_pdl = 1,
      .compact = compact,
      .pass_q = 0};
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  std::printf(
      "probe_attention: %d SMs, %.0f MHz; H %ld Hkv %ld D %ld S %ld pos %ld rows %ld, "
      "splits %d, compact %d, prefetch %d\n",
      sms, clock_khz / 1e3, long(H), long(Hkv), long(D), long(S), long(pos), long(rows), splits,
      compact, prefetch);

  for (int cold = 0; cold < 2; ++cold) {
    double sum[16] = {}, sum_ns[16] = {}, msum[4] = {}, msum_ns[4] = {}, cross = 0.0;
    int seen[16] = {}, mseen[4] = {}, n_cross = 0;
    for (int r = 0; r < reps + 3; ++r) {
      long long zero[2][16] = {}, mzero[2][16] = {};
      CK(cudaMemcpyToSymbol(g_marks, zero, sizeof(zero)));
      CK(cudaMemcpyToSymbol(g_merge_marks, mzero, sizeof(mzero)));
      if (cold) flush(stream, r);
      CK(dspark::cuda::launch_decode_attention(p, stream));
      CK(cudaStreamSynchronize(stream));
      long long m[2][16], mm[2][16];
      CK(cudaMemcpyFromSymbol(m, g_marks, sizeof(m)));
      CK(cudaMemcpyFromSymbol(mm, g_merge_marks, sizeof(mm)));
      if (r < 3) continue;  // warm-up
      int prev = 0;
      for (int i = 1; i < 12; ++i) {
        if (!m[0][i]) continue;
        sum[i] += double(m[0][i] - m[0][prev]);
        sum_ns[i] += double(m[1][i] - m[1][prev]);
        ++seen[i];
        prev = i;
      }
      for (int i = 1; i < 4; ++i)
        if (mm[0][i] && mm[0][i - 1]) {
          msum[i] += double(mm[0][i] - mm[0][i - 1]);
          msum_ns[i] += double(mm[1][i] - mm[1][i - 1]);
          ++mseen[i];
        }
      if (mm[1][3] && m[1][0]) {
        cross += double(mm[1][3] - m[1][0]);
        ++n_cross;
      }
    }
    std::printf("\n%s L2, mean of %d calls (block 0 of kernel 1, then of the merge):\n",
                cold ? "cold" : "hot", reps);
    std::printf("  %-42s %9s %9s\n", "phase (ends at mark)", "cycles", "ns");
    for (int i = 1; i < 12; ++i)
      if (seen[i])
        std::printf("  %2d %-39s %9.0f %9.0f\n", i, kPhase[i - 1], sum[i] / seen[i],
                    sum_ns[i] / seen[i]);
    const char* mph[4] = {"", "merge: entry -> pdl_wait done", "merge: weights + total",
                          "merge: weighted sum + output"};
    for (int i = 1; i < 4; ++i)
      if (mseen[i])
        std::printf("  m%d %-39s %9.0f %9.0f\n", i, mph[i], msum[i] / mseen[i],
                    msum_ns[i] / mseen[i]);
    if (n_cross)
      std::printf("  kernel 1 entry -> merge end (globaltimer): %.0f ns\n", cross / n_cross);
  }

  print_wall(stream, flush,
             [&](cudaStream_t s) { CK(dspark::cuda::launch_decode_attention(p, s)); });
  int32_t st = 0;
  CK(cudaMemcpy(&st, status, 4, cudaMemcpyDeviceToHost));
  std::printf("status word %d\n", st);
  return 0;
}
