// dspark/markov_draft.h: the arithmetic of dspark::markov_draft (DSpark's sequential draft
// stage), written once for the CPU kernel (csrc/cpu/markov_draft_cpu.cpp) and the CUDA kernels
// (include/dspark/markov_draft.cuh); dspark/reference.py (markov_draft) spells out the same rules.
// No torch, no CUDA headers.
//
// For k = 1..G and request r, with e = W1[x_{k-1}] (x_0 the anchor):
//   bias(v)  = round_W( sum_j e[j] * W2[j, v] )   fp32, j = 0..rank-1 in order, one MAC each
//   z_k(v)   = fp32(U[r, k, v]) + bias(v)         one fp32 addition
//   x_k      = dspark::sample of the row z_k (same arithmetic, same keyed coin: seed, position
//              positions[r] + k - 1, node 0, sampling coin)
//   conf_k   = round_W( w . [h_k ; e] + b )       32 lane partials, then a fixed tree (below)
// round_W rounds through the weights' dtype: what nn.Linear stores in the Python loop it replaces.
// One MAC is acc + a * w rounded once (16-bit weights: the product is exact in fp32, so this is
// an FMA) or, for fp32 weights, the product rounded then the sum rounded (no FMA contraction, like
// every other kernel here). Every backend follows that order, so the logits are bit-identical
// on CPU and CUDA and tokens differ only where sample's float64 sums could (~1e-15).
#pragma once
#include <cstdint>

#include "dspark/common.h"
#include "dspark/numeric.h"
#include "dspark/prob.h"

namespace dspark {

// The largest rank the kernels take (the CUDA logits kernel stages W1 rows in shared memory).
constexpr int64_t kMarkovMaxRank = 8192;

// acc + a * w rounded to fp32 once (16-bit W, exact product) or mul then add (fp32 W).
// On the host the 16-bit case is computed in double: a * w is exact there and the one rounding
// of the double sum to float equals the FMA's rounding (the sum is exact in double unless one
// term is below 2^-29 of the other, and then it cannot reach a float rounding midpoint).
template <typename W>
DSPARK_HD float markov_mac(float acc, float a, float w) {
  if constexpr (sizeof(W) == 2) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, w, acc);
#else
    return static_cast<float>(static_cast<double>(a) * static_cast<double>(w) +
                              static_cast<double>(acc));
#endif
  } else {
    return add_rn(acc, mul_rn(a, w));
  }
}

// The confidence dot product over n entries (x = [h_k ; e], w = the head's weight) is summed in
// kConfLanes partials, entry i into partial i % kConfLanes in increasing i, then combined by the
// tree a warp's shuffle-down reduction computes: partial[l] += partial[l + s] for s = 16 .. 1.
constexpr int kConfLanes = 32;
DSPARK_HD float conf_tree(float* partial) {
  for (int s = kConfLanes / 2; s > 0; s >>= 1)
    for (int l = 0; l < s; ++l) partial[l] = add_rn(partial[l], partial[l + s]);
  return partial[0];
}

// The previous token of step k (0-based) of a request: the anchor, then its own drafts.
DSPARK_HD int64_t markov_prev(const int64_t* anchors, const int64_t* tokens, int64_t G, int64_t r,
                              int64_t k) {
  return k == 0 ? anchors[r] : tokens[r * G + k - 1];
}

// Arguments of one markov_draft call (CUDA: csrc/cuda/markov_draft_cuda.cpp fills it). Shapes:
// R requests, G = gamma draft steps, V vocabulary, rank r, hidden size d. Row-major, contiguous.
struct MarkovArgs {
  const void* base_logits;           // [R, G, V] U, logits_type
  const void* w1;                    // [V, rank] weight_type
  const void* w2;                    // [rank, V] weight_type
  const void* hidden;                // [R, G, d] weight_type, or nullptr (no confidence head)
  const void* conf_weight;           // [d + rank] weight_type, or nullptr
  const void* conf_bias;             // [1] weight_type, or nullptr
  const int64_t* anchors;            // [R] x_0
  const float* temperature;          // [R]
  const int64_t* top_k;              // [R]
  const float* top_p;                // [R]
  const int64_t *seeds, *positions;  // [R]: step k draws with (seed, positions[r] + k)
  int64_t* tokens;                   // [R, G] out: x_1..x_G (-1 where invalid)
  float* conf_logits;                // [R, G] out, or nullptr
  double* probs;    // [R, G, V] out: the distribution each x_k was drawn from, or null
  int32_t* status;  // [1] StatusBit flags
  void* workspace;  // markov_workspace_bytes(R, G, V)
  int64_t R, G, V, rank, d;
  int pdl;  // 1: programmatic dependent launch where the device and code allow it, 0: off
  ElementType logits_type, weight_type;
};

}  // namespace dspark
