// dspark/common.h: macros and constants shared by CPU and CUDA code. No torch headers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DSPARK_HD __host__ __device__ __forceinline__
#else
#define DSPARK_HD inline
#endif

namespace dspark {

// A request whose temperature is below this samples greedily (one-hot at the argmax), as in
// DeepSpec's evaluator. Keeps 1/T finite and the fixed-point probabilities well defined.
constexpr float kGreedyTemperature = 1e-5f;
// CUDA splits vocabulary rows into chunks of this many entries (one warp, 16 per lane) for
// partial sums; warp reductions need no block-wide synchronisation. The CPU does not chunk:
// chunking changes only the order of float64 additions.
constexpr int kChunk = 512;
// Largest vocabulary: top-p masses are 44-bit fixed point, summed exactly in int64.
constexpr int64_t kMaxVocab = (int64_t(1) << 19) - 1;

// Bits of the status word kernels raise on bad data (CUDA cannot throw; the host reads it).
enum StatusBit : int32_t {
  kBadLogits = 1 << 0,       // NaN or +inf logit, or logit/temperature overflows float32
  kEmptyRow = 1 << 1,        // a row with no finite logit (every entry -inf)
  kBadToken = 1 << 2,        // draft token outside [0, V)
  kBadParent = 1 << 3,       // parents[root] != -1, or a parent not in [0, node)
  kBadOffsets = 1 << 4,      // offsets not starting at 0, not strictly increasing, or too wide
  kBadTemperature = 1 << 5,  // temperature < 0, inf or NaN
  kBadTopK = 1 << 6,         // top_k < 0
  kBadTopP = 1 << 7,         // top_p outside (0, 1]
  kBadDraftProbs = 1 << 8,   // a draft probability that is negative, NaN or inf
  kBadUniform = 1 << 9,      // caller-supplied uniform outside [0, 1)
  kBadPosition = 1 << 10,    // decode_attention: a position outside the cache's slots [0, S)
  kNoRandomness = 1 << 11,   // a sampled request (T >= kGreedyTemperature) but no seeds/uniforms
};

DSPARK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dspark
