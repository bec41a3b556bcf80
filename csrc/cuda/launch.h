// csrc/cuda/launch.h: the torch-free boundary between the CUDA entry points (csrc/cuda/*_cuda.cpp:
// tensors) and the kernel instantiations (csrc/cuda/*_kernels.cu: nvcc), one section per op.
// Keeping torch headers out of .cu files keeps nvcc fast.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dspark/numeric.h"  // ElementType

namespace dspark {

enum class DraftType : int { kNone, kFloat32, kFloat64 };

// Which CUDA implementation serves dspark::verify / dspark::sample (an internal switch, for A/B
// runs: dspark._C.set_verify_impl, or DSPARK_VERIFY_IMPL=fused|staged in the environment; the
// fused kernel is the default since its tests passed on a GPU, bench/RESULTS.md).
//   kFused   one kernel (include/dspark/verify_fused.cuh); sample passes root-only requests
//   kStaged  the five-kernel pipeline it replaces (include/dspark/verify.cuh)
enum class VerifyImpl : int { kFused = 0, kStaged = 1 };

struct VerifyArgs {
  const void* logits;  // [N, V]
  ElementType logits_type;
  const void* draft_probs;  // [N, V] or nullptr
  DraftType draft_type;
  int64_t N, V, R, W;
  const int64_t *offsets, *tokens, *parents;  // fused sample: all nullptr (root-only requests)
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const int64_t *seeds, *positions;
  const double* uniforms;                       // [N, 2] (fused sample: [R]) or nullptr
  int64_t *out_tokens, *out_count, *out_nodes;  // count/nodes may be nullptr (sample)
  double* probs;                                // [R, V] or nullptr
  int32_t* status;  // staged: [1]; fused: [verify_control_words(impl, R)], status word first
  void* workspace;  // [verify_workspace_bytes(...)]
  VerifyImpl impl;
};

// kFused when its grid fits (R requests of at most W rows), else kStaged.
VerifyImpl verify_impl_for(VerifyImpl wanted, int64_t R, int64_t W, int64_t V, bool has_q);
size_t verify_workspace_bytes(VerifyImpl impl, int64_t N, int64_t R, int64_t W, int64_t V);
int64_t verify_control_words(VerifyImpl impl, int64_t R);  // int32 words cleared per launch
cudaError_t launch_verify(const VerifyArgs& args, cudaStream_t stream);

// dspark::fused_linear (include/dspark/linear.cuh); every tensor has element type `dtype`.
struct LinearArgs {
  ElementType dtype;
  const void *x, *weight, *bias, *residual, *norm_weight;  // bias/residual/norm_weight may be null
  void* out;
  int64_t M, N, K;
  float eps;
  int prologue;      // 0 plain, 1 RMSNorm, 2 SiLU gate
  int stage_budget;  // staged-activation bytes per block; 0: the default, < 0: the pre-s14 rule
};
cudaError_t launch_linear(const LinearArgs& args, cudaStream_t stream);
// The fused linear kernel as loaded for the current device: the architecture it was compiled for
// (PTX) and the one it runs as (binary); 80 and 90 for a compute_80 build JIT-compiled on Hopper.
cudaError_t linear_kernel_arch(int* ptx, int* binary);

// dspark::decode_attention (include/dspark/attention.cuh); qkv/caches/norms/out of type `dtype`.
struct AttentionArgs {
  ElementType dtype;
  const void* qkv;  // [B, T, (H + 2 Hkv) D]
  void *k_cache, *v_cache;
  const int64_t* start;    // [B] slot (and position) of row 0
  const int64_t* parents;  // [B, T] or null (chain)
  const float* inv_freq;
  const void *q_norm, *k_norm;  // may be null
  void* out;
  float *part_o, *part_ml;  // chunk partials (splits > 1)
  int32_t* status;
  int64_t B, T, H, Hkv, S, D, layer, window;
  float eps, scale;
  int splits, rows_per_block;
  int sms;     // > 0: rows per block chosen per request by its active chunks (0: rows_per_block)
  int pass_q;  // query vectors per weighted-V pass (0: the kernel's most; A/B runs)
  int heads_per_block;  // query heads per block, a divisor of H / Hkv (0: the kernel's rule)
  int prefetch;         // 1: kernel 1 sends its chunk's K/V rows to L2 first
  int merge_pdl;        // 1: the merge kernel launches programmatically where usable
  int compact;          // 1: one-query tiles run kernel 1's one-query instance (same bits)
};
int attention_splits(int64_t S);  // chunks of the cache's slots (one block each per KV head)
// The current device's multiprocessor count, looked up once per device (132 if unknown).
int device_sms();

// rows of one block (Hkv * B * splits blocks per group of rows, `sms` multiprocessors)
int attention_rows_per_block(int64_t T, int64_t G, int splits, int64_t blocks_per_group, int sms);
// blocks in grid z of the attention kernel (dspark/attention.cuh: attn_grid_z)
int64_t attention_grid_z(int64_t T, int64_t G, int splits, int64_t heads_x_batch, int sms, int rows,
                         int heads);
cudaError_t launch_attention(const AttentionArgs& args, cudaStream_t stream);

}  // namespace dspark
