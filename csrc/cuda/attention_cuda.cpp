// csrc/cuda/attention_cuda.cpp: CUDA entry point of dspark::decode_attention.
// Positions (each request's first slot) and parents are checked on the device (status word,
// read back outside CUDA-graph capture when sync checks are on, like verify/sample); a request
// whose block does not fit the cache writes nothing and gets a zero output; a parent outside [-1,
// row) counts as -1 (a root).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>
#include <utility>

#include "checks.h"
#include "cuda/launch.h"
#include "cuda/launch_status.h"
#include "cuda/tensor_args.h"

namespace dspark {
namespace {

// An A/B switch (read per call): environment variable `name` as an integer >= 1, at most 64
// (the most rows a decode_attention call and query vectors a pass can use); 0 when unset or
// empty.
int ab_switch(const char* name) {
  const char* env = std::getenv(name);
  if (!env || !*env) return 0;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  DSPARK_CHECK_VALUE(*end == '\0' && v >= 1, name, " must be an integer >= 1, got '", env, "'");
  return int(v < 64 ? v : 64);
}

// Rows per block of kernel 1: attention_rows_per_block's choice for this GPU over the whole
// cache, which the kernel refines per request by its active chunks (sms > 0), or
// DSPARK_ATTN_ROWS_PER_BLOCK (at most T; sms = 0: every request, every chunk) for A/B
// measurements (bench/bench_attention.py --rows-per-block). The outputs are the same bits for
// any value. Returns (rows, sms).
std::pair<int, int> rows_per_block(const AttnDims& d, int splits) {
  if (const int r = ab_switch("DSPARK_ATTN_ROWS_PER_BLOCK")) return {int(r < d.T ? r : d.T), 0};
  const int sms = device_sms();
  return {attention_rows_per_block(d.T, d.H / d.Hkv, splits, d.Hkv * d.B * splits, sms), sms};
}

at::Tensor decode_attention_cuda(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                                 int64_t layer, const at::Tensor& positions,
                                 const at::Tensor& inv_freq,
                                 const std::optional<at::Tensor>& q_norm_weight,
                                 const std::optional<at::Tensor>& k_norm_weight, double eps,
                                 int64_t num_heads, int64_t window,
                                 const std::optional<at::Tensor>& parents) {
  const auto d =
      check_decode_attention_args(qkv, k_cache, v_cache, layer, positions, inv_freq, q_norm_weight,
                                  k_norm_weight, eps, num_heads, window, parents);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor out = d.three_d ? at::empty({d.B, d.T, d.H * d.D}, qkv.options())
                             : at::empty({d.B, d.H * d.D}, qkv.options());
  if (d.B == 0) return out;
  const int splits = attention_splits(d.S);
  const auto [rows, sms] = rows_per_block(d, splits);
  // DSPARK_ATTN_PASS_Q caps the kernel's query vectors per weighted-V pass (8 for 16-bit heads
  // <= 128, else 4; 4 = one row of Qwen3's 4 query heads, the kernel before 2026-12-06 s15)
  const int cap = ab_switch("DSPARK_ATTN_PASS_Q");
  // DSPARK_ATTN_HEADS_PER_BLOCK fixes the query heads a block takes (a divisor of H / Hkv; H / Hkv:
  // whole KV heads, the kernel before 2026-12-07 s18) for A/B runs; unset: the kernel's rule
  const int heads = ab_switch("DSPARK_ATTN_HEADS_PER_BLOCK");
  DSPARK_CHECK_VALUE(heads == 0 || (d.H / d.Hkv) % heads == 0,
                     "DSPARK_ATTN_HEADS_PER_BLOCK must divide the query heads per KV head (",
                     d.H / d.Hkv, "), got ", heads);
  DSPARK_CHECK_VALUE(
      attention_grid_z(d.T, d.H / d.Hkv, splits, d.Hkv * d.B, sms, rows, heads) <= 65535,
      "a cache of ", d.S, " slots with ", d.T,
      " rows per request exceeds the CUDA grid (65535 blocks in z)");
  const auto f32 = qkv.options().dtype(at::kFloat);
  const int64_t parts = splits > 1 ? d.B * d.T * d.H * splits : 0;
  at::Tensor part_o = at::empty({parts * d.D}, f32);
  at::Tensor part_ml = at::empty({parts * 2}, f32);
  at::Tensor status = at::empty({1}, qkv.options().dtype(at::kInt));  // written by the kernel
  AttentionArgs a{};
  a.dtype = element_type(qkv);
  a.qkv = qkv.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.start = positions.data_ptr<int64_t>();
  a.parents = ptr_or_null<int64_t>(parents);
  a.inv_freq = inv_freq.data_ptr<float>();
  a.q_norm = ptr_or_null(q_norm_weight);
  a.k_norm = ptr_or_null(k_norm_weight);
  a.out = out.data_ptr();
  a.part_o = part_o.data_ptr<float>();
  a.part_ml = part_ml.data_ptr<float>();
  a.status = status.data_ptr<int32_t>();
  a.B = d.B;
  a.T = d.T;
  a.H = d.H;
  a.Hkv = d.Hkv;
  a.S = d.S;
  a.D = d.D;
  a.layer = layer;
  a.window = window;
  a.eps = static_cast<float>(eps);
  a.scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  a.splits = splits;
  a.rows_per_block = rows;
  a.sms = sms;
  a.pass_q = cap;
  a.heads_per_block = heads;
  // DSPARK_ATTN_NO_PREFETCH=1: no L2 prefetch of the chunk's K/V rows (A/B runs)
  a.prefetch = ab_switch("DSPARK_ATTN_NO_PREFETCH") ? 0 : 1;
  // DSPARK_ATTN_NO_MERGE_PDL=1: the merge kernel in plain stream order (A/B runs)
  a.merge_pdl = ab_switch("DSPARK_ATTN_NO_MERGE_PDL") ? 0 : 1;
  // DSPARK_ATTN_NO_COMPACT=1: one-query tiles run the general instance too (A/B runs)
  a.compact = ab_switch("DSPARK_ATTN_NO_COMPACT") ? 0 : 1;
  check_launch(launch_attention(a, c10::cuda::getCurrentCUDAStream()), status, "decode_attention",
               [](int32_t s) { raise_on_status(s, "decode_attention"); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace dspark
