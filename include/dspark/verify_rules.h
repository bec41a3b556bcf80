// dspark/verify_rules.h: the decisions of verify, written once for both backends: the CPU kernel
// (csrc/cpu/verify_cpu.cpp) and the CUDA kernels (include/dspark/verify.cuh) call these, so a
// rule cannot change on one backend alone. dspark/reference.py keeps its own copy: it is the
// executable spec the two are tested against.
#pragma once
#include <cmath>
#include <cstdint>

#include "dspark/common.h"
#include "dspark/prob.h"

namespace dspark {

// ---- Validation of the packed batch (bits of StatusBit) -----------------------------------

// Request r of R owns flat rows [begin, end) of N; at most W nodes. Holding for every r is the
// same as offsets starting at 0, ending at N, strictly increasing, with gaps of at most W.
DSPARK_HD int32_t offsets_status(int64_t r, int64_t R, int64_t begin, int64_t end, int64_t N,
                                 int64_t W) {
  const int64_t n = end - begin;
  const bool ok = begin >= 0 && n > 0 && end <= N && n <= W && (r != 0 || begin == 0) &&
                  (r != R - 1 || end == N);
  return ok ? 0 : kBadOffsets;
}

// Local node j of a request: the root (j == 0) has parent -1, any other node a parent in [0, j)
// and a token in [0, V) (the root's token is not read).
DSPARK_HD int32_t node_status(int64_t j, int64_t parent, int64_t token, int64_t V) {
  int32_t s = 0;
  if (j == 0 ? parent != -1 : (parent < 0 || parent >= j)) s |= kBadParent;
  if (j > 0 && (token < 0 || token >= V)) s |= kBadToken;
  return s;
}

// A caller-supplied uniform lies in [0, 1) (NaN fails too).
DSPARK_HD int32_t uniform_status(double u) { return u >= 0.0 && u < 1.0 ? 0 : kBadUniform; }

// A draft probability is finite and non-negative (NaN fails too). Checked where it is read.
DSPARK_HD int32_t draft_prob_status(double q) {
  return q >= 0.0 && q < INFINITY ? 0 : kBadDraftProbs;
}

// ---- Randomness -----------------------------------------------------------------------------

// The uniform of local node `node` of request r (rows from o) for `purpose`: caller-supplied
// uniforms [N, 2] (accept coin, sampling coin per flat row), else keyed by (seed, position).
// With neither, only greedy requests run (param_status flags the others), and their decisions
// do not depend on the coin (one-hot p: accept iff the token is the argmax, draw = argmax): 0.
DSPARK_HD double node_coin(const double* uniforms, const int64_t* seeds, const int64_t* positions,
                           int64_t r, int64_t o, int64_t node, uint64_t purpose) {
  if (uniforms) return uniforms[(o + node) * 2 + purpose];
  return seeds ? keyed_uniform(seeds[r], positions[r], node, purpose) : 0.0;
}

// ---- Recursive rejection sampling -----------------------------------------------------------

// A child with token x is accepted iff u * q(x) * Z < r(x): u its accept coin, q(x) its draft
// probability (1 for one-hot drafts), Z the residual total before it and r(x) the residual at x.
// Evaluated left to right in double on both backends, so the product is the same bit for bit.
DSPARK_HD bool accepts(double u, double qx, double z, double rx) { return u * qx * z < rx; }

// Residual after rejected siblings: r <- max(r - q_j(v) * Z_j, 0) for each rejected j in order.
// One-hot drafts (no draft_probs) zero the rejected token instead (same value, since r <= Z).
DSPARK_HD double residual_step(double r, bool onehot, int64_t v, int64_t token, double qv,
                               double z) {
  if (onehot) return v == token ? 0.0 : r;
  const double d = r - qv * z;
  return d > 0.0 ? d : 0.0;
}

// Residual total after rejecting a one-hot sibling whose token held residual mass rx: only that
// token's mass leaves (a full draft distribution instead needs the residual re-totalled).
DSPARK_HD double onehot_rejected_total(double z, double rx) { return z - rx; }

}  // namespace dspark
