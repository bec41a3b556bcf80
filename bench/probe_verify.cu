// bench/probe_verify.cu: where one fused verify call's time goes, phase by phase.
// Builds the product's kernel (include/dspark/verify_fused.cuh) with its phase marks turned on
// for request 0: the first block's entry and the last statistics block's end (globaltimer, over
// request 0's blocks), then the finishing block's steps (thread 0: clock64 and globaltimer), and
// the last block of the whole grid. Prints the mean time between marks (L2 hot, or cold: a 256 MB
// write between calls) and the wall time per call in a CUDA graph (counter zeroing included).
//
//   nvcc -std=c++20 -arch=sm_90 -O3 --fmad=false --expt-relaxed-constexpr -I include \
//     bench/probe_verify.cu -o /tmp/probe_verify
//   /tmp/probe_verify [--R 1 --gamma 7 --V 151936 --temp 0 --scale 1 --q 0 --accept 1 --reps 50]
//
// --accept 1: every draft token is its parent row's argmax (the whole chain is walked); --q 1:
// fp32 draft probabilities (the sampled path's full-q residual); --scale: logits ~ scale * U.
// A measuring tool only (the marks compile to nothing in the product build).
#include <cuda_bf16.h>

#include <cmath>
#include <cstring>

#include "probe_common.cuh"

__device__ long long g_marks[2][16];  // [clock64, globaltimer][mark]: finisher of request 0
__device__ unsigned long long g_first_ns, g_stats_end_ns, g_grid_end_ns, g_resid_start_ns;

// Marks 0 / 1: request 0's first block entry / last statistics block end; 2-6: request 0's
// finishing block; 8: its first residual block past the hand-off; 9-10: its last residual
// block (the draw); 7: the last block of the grid to end.
__device__ __forceinline__ void verify_mark(int i, int64_t r) {
  if (threadIdx.x != 0) return;
  const unsigned long long ns = static_cast<unsigned long long>(global_ns());
  if (i == 7) atomicMax(&g_grid_end_ns, ns);
  else if (r != 0) return;
  else if (i == 0) atomicMin(&g_first_ns, ns);
  else if (i == 1) atomicMax(&g_stats_end_ns, ns);
  else if (i == 8) atomicMin(&g_resid_start_ns, ns);
  else stamp_mark(g_marks, i);
}
#define DSPARK_VERIFY_MARK(i, r) ::verify_mark(i, r)

#include "dspark/verify_fused.cuh"

using bf16 = __nv_bfloat16;
namespace dc = dspark::cuda;

static const char* kPhase[11] = {"request 0's first block starts",
                                 "-> its last statistics block ends",
                                 "-> its finisher passes arrive_last",
                                 "open_request (checks, -1 outputs)",
                                 "finalize rows (+ barrier)",
                                 "walk (+ barrier)",
                                 "last token written (finisher)",
                                 "-> last block of the grid ends",
                                 "-> first residual block past hand-off",
                                 "-> last residual block arrives",
                                 "residual draw, token written"};
// Marks in the order they are reached (7, the grid's end, last).
static const int kOrder[10] = {1, 2, 3, 4, 5, 6, 8, 9, 10, 7};

int main(int argc, char** argv) {
  int64_t R = 1, gamma = 7, V = 151936;
  float temp = 0.0f, scale = 1.0f;
  int use_q = 0, accept = 1, reps = 50;
  parse_args(argc, argv, [&](const char* k, double v) {
    if (!std::strcmp(k, "--R")) R = int64_t(v);
    else if (!std::strcmp(k, "--gamma")) gamma = int64_t(v);
    else if (!std::strcmp(k, "--V")) V = int64_t(v);
    else if (!std::strcmp(k, "--temp")) temp = float(v);
    else if (!std::strcmp(k, "--scale")) scale = float(v);
    else if (!std::strcmp(k, "--q")) use_q = int(v);
    else if (!std::strcmp(k, "--accept")) accept = int(v);
    else if (!std::strcmp(k, "--reps")) reps = int(v);
    else return false;
    return true;
  });
  const auto [sms, clock_khz] = device_facts();
  const int64_t W = gamma + 1, N = R * W;
  // Logits [N, V]; chains: node j's parent is j - 1, its token the argmax of the parent's row
  // (--accept 1) or a fixed non-argmax token.
  Lcg rnd;
  std::vector<bf16> h_logits(N * V);
  std::vector<int64_t> argmax(N, 0);
  for (int64_t row = 0; row < N; ++row) {
    float best = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      const bf16 x = __float2bfloat16(scale * rnd());
      h_logits[row * V + v] = x;
      if (__bfloat162float(x) > best) best = __bfloat162float(x), argmax[row] = v;
    }
  }
  std::vector<int64_t> offsets(R + 1), tokens(N), parents(N), top_k(R, 0), seeds(R), positions(R);
  std::vector<float> temperature(R, temp), top_p(R, 1.0f);
  for (int64_t r = 0; r <= R; ++r) offsets[r] = r * W;
  for (int64_t r = 0; r < R; ++r) {
    seeds[r] = 1000 + r;
    positions[r] = 77;
    for (int64_t j = 0; j < W; ++j) {
      const int64_t i = r * W + j;
      parents[i] = j - 1;
      tokens[i] = j == 0 ? 0 : (accept ? argmax[i - 1] : (argmax[i - 1] + 1) % V);
    }
  }
  std::vector<float> h_q;
  if (use_q) {  // q: a normalized random distribution per row (ignores the draft token)
    h_q.resize(N * V);
    for (int64_t row = 0; row < N; ++row) {
      double s = 0.0;
      for (int64_t v = 0; v < V; ++v) s += (h_q[row * V + v] = rnd() + 0.5f);
      for (int64_t v = 0; v < V; ++v) h_q[row * V + v] = float(h_q[row * V + v] / s);
    }
  }
  dc::VerifyParams<bf16, float> p{};
  p.logits = upload(h_logits);
  p.q = use_q ? upload(h_q) : nullptr;
  p.N = N, p.V = V, p.R = R, p.W = W;
  p.offsets = upload(offsets), p.tokens = upload(tokens), p.parents = upload(parents);
  p.temperature = upload(temperature), p.top_k = upload(top_k), p.top_p = upload(top_p);
  p.seeds = upload(seeds), p.positions = upload(positions);
  p.out_tokens = device_array<int64_t>(R * W), p.out_count = device_array<int64_t>(R);
  p.out_nodes = nullptr, p.uniforms = nullptr, p.probs = nullptr;
  const size_t ws_bytes = dc::verify_workspace_layout(N, R, W, V, nullptr, dc::kWarpChunk).bytes;
  void* workspace = device_array<char>(ws_bytes);
  int32_t* control = device_array<int32_t>(dc::fused_control_words(R));
  const dc::FusedPlan pl = dc::fused_plan(V, R, W, use_q, sms);
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  auto call = [&](cudaStream_t s) {
    CK(dc::launch_verify_fused(p, workspace, control, sms, 0, s));
  };
  std::printf(
      "probe_verify: %d SMs, %.0f MHz; R %ld gamma %ld V %ld temp %g scale %g q %d accept %d; "
      "plan S %ld B %ld X %ld D %ld, grid %ld\n",
      sms, clock_khz / 1e3, long(R), long(gamma), long(V), temp, scale, use_q, accept, long(pl.S),
      long(pl.B), long(pl.X), long(pl.D), long(dc::fused_grid(pl, R)));

  const L2Flush flush;
  for (int cold = 0; cold < 2; ++cold) {
    double sum_ns[11] = {}, sum_cyc[11] = {};
    int seen[11] = {};
    for (int rep = 0; rep < reps + 3; ++rep) {
      const long long zero[2][16] = {};
      const unsigned long long big = ~0ull, none = 0;
      CK(cudaMemcpyToSymbol(g_marks, zero, sizeof(zero)));
      CK(cudaMemcpyToSymbol(g_first_ns, &big, 8));
      CK(cudaMemcpyToSymbol(g_resid_start_ns, &big, 8));
      CK(cudaMemcpyToSymbol(g_stats_end_ns, &none, 8));
      CK(cudaMemcpyToSymbol(g_grid_end_ns, &none, 8));
      if (cold) flush(stream, rep);
      call(stream);
      CK(cudaStreamSynchronize(stream));
      long long m[2][16];
      unsigned long long first, stats_end, grid_end, resid_start;
      CK(cudaMemcpyFromSymbol(m, g_marks, sizeof(m)));
      CK(cudaMemcpyFromSymbol(&first, g_first_ns, 8));
      CK(cudaMemcpyFromSymbol(&stats_end, g_stats_end_ns, 8));
      CK(cudaMemcpyFromSymbol(&grid_end, g_grid_end_ns, 8));
      CK(cudaMemcpyFromSymbol(&resid_start, g_resid_start_ns, 8));
      if (rep < 3) continue;  // warm-up
      // ns since request 0's first block started, at each mark reached (-1: not reached)
      long long at[11];
      for (int i = 0; i < 11; ++i) at[i] = m[1][i] ? m[1][i] - (long long)first : -1;
      at[0] = 0;
      at[1] = (long long)(stats_end - first);
      at[7] = (long long)(grid_end - first);
      at[8] = resid_start == ~0ull ? -1 : (long long)(resid_start - first);
      int prev = 0;
      for (int i : kOrder) {
        if (at[i] < 0) continue;
        sum_ns[i] += double(at[i] - at[prev]);
        if (i >= 3 && i <= 6 && prev >= 2 && prev <= 6) sum_cyc[i] += double(m[0][i] - m[0][prev]);
        ++seen[i];
        if (i != 7) prev = i;
      }
    }
    std::printf(
        "\n%s L2, mean of %d calls (ns from the previous mark; cycles within the finisher):\n",
        cold ? "cold" : "hot", reps);
    for (int i : kOrder)
      if (seen[i])
        std::printf("  %2d %-42s %8.0f ns %8.0f cyc  (%d calls)\n", i, kPhase[i],
                    sum_ns[i] / seen[i], sum_cyc[i] / seen[i], seen[i]);
  }
  print_wall(stream, flush, call);
  std::vector<int64_t> out(R * W), count(R);
  CK(cudaMemcpy(out.data(), p.out_tokens, out.size() * 8, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(count.data(), p.out_count, count.size() * 8, cudaMemcpyDeviceToHost));
  int32_t st = 0;
  CK(cudaMemcpy(&st, control, 4, cudaMemcpyDeviceToHost));
  std::printf("request 0: accepted %ld, tokens", long(count[0]));
  for (int64_t k = 0; k <= count[0] && k < W; ++k) std::printf(" %ld", long(out[k]));
  std::printf("; status word %d\n", st);
  return 0;
}
