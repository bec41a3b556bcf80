// csrc/cuda/attention_kernels.cu: instantiates the header-only decode attention per dtype.
#include "cuda/dispatch.cuh"
#include "cuda/launch.h"
#include "dspark/attention_launch.cuh"

namespace dspark {

int attention_splits(int64_t S) { return cuda::attn_splits(S); }
int attention_rows_per_block(int64_t T, int64_t G, int splits, int64_t blocks_per_group, int sms) {
  return cuda::attn_rows_per_block(T, G, splits, blocks_per_group, sms);
}
int64_t attention_grid_z(int64_t T, int64_t G, int splits, int64_t heads_x_batch, int sms, int rows,
                         int heads) {
  return cuda::attn_grid_z(T, G, splits, heads_x_batch, sms, rows, heads);
}

namespace {
template <typename T>
cudaError_t run(const AttentionArgs& a, cudaStream_t stream) {
  cuda::AttnParams<T> p{};
  p.qkv = static_cast<const T*>(a.qkv);
  p.k_cache = static_cast<T*>(a.k_cache);
  p.v_cache = static_cast<T*>(a.v_cache);
  p.start = a.start;
  p.parents = a.parents;
  p.inv_freq = a.inv_freq;
  p.q_norm = static_cast<const T*>(a.q_norm);
  p.k_norm = static_cast<const T*>(a.k_norm);
  p.out = static_cast<T*>(a.out);
  p.part_o = a.part_o;
  p.part_ml = a.part_ml;
  p.status = a.status;
  p.B = a.B;
  p.rows = a.T;
  p.H = a.H;
  p.Hkv = a.Hkv;
  p.S = a.S;
  p.D = a.D;
  p.layer = a.layer;
  p.window = a.window;
  p.eps = a.eps;
  p.scale = a.scale;
  p.splits = a.splits;
  p.rows_per_block = a.rows_per_block;
  p.sms = a.sms;
  p.pass_q = a.pass_q;
  p.heads_per_block = a.heads_per_block;
  p.prefetch = a.prefetch;
  p.merge_pdl = a.merge_pdl;
  p.compact = a.compact;
  return cuda::launch_decode_attention(p, stream);
}
}  // namespace

cudaError_t launch_attention(const AttentionArgs& a, cudaStream_t stream) {
  return with_element_type(a.dtype, [&](auto t) { return run<decltype(t)>(a, stream); });
}

}  // namespace dspark
