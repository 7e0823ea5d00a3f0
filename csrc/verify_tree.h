// Token-tree verification of speculative decoding on CPU buffers.
//
// The contract and the oracle are verify_tree_ref in draftwise/kernels/tree.py. All buffers are
// contiguous, all sizes and offsets 64-bit.
#pragma once

#include <cstdint>

#include "verify_chain.h"

namespace draftwise {

struct TreeArgs {
  // Inputs. Node 0 of each row is the root; every parent comes before its children.
  const int64_t* tree_tokens_ptr = nullptr;  // [B, T], ids outside [0, V) pad
  const int64_t* parents_ptr = nullptr;      // [B, T], -1 for the root
  const void* draft_probs_ptr = nullptr;     // [B, T, V] or nullptr (one-hot drafts)
  DType draft_probs_dtype = DType::kFloat32;
  const void* target_logits_ptr = nullptr;  // [B, T, V]
  DType target_logits_dtype = DType::kFloat32;
  const float* temperature_ptr = nullptr;  // [B], 0 = greedy
  const int64_t* top_k_ptr = nullptr;      // [B], 0 or >= V = off
  const float* top_p_ptr = nullptr;        // [B], 1 = off
  const int64_t* seeds_ptr = nullptr;      // [B], Philox keys
  // Sizes and options.
  int64_t batch = 0;
  int64_t num_nodes = 0;  // T
  int64_t vocab = 0;      // V
  int num_threads = 0;    // <= 0: the OpenMP default
  // Outputs, written in full.
  int64_t* path_ptr = nullptr;           // [B, T]: 0, the accepted nodes, then -1
  int64_t* output_tokens_ptr = nullptr;  // [B, T]: the accepted tokens, the emitted one, then -1
  int64_t* num_accepted_ptr = nullptr;   // [B]
  int64_t* max_depth_ptr = nullptr;      // [B]: depth of the row's deepest valid node
};

// Runs tree verification; throws std::invalid_argument on a negative size, a missing buffer, an
// unsupported dtype, parents out of topological order, or an out-of-range per-row value
// (temperature < 0 or NaN, top_k < 0, top_p outside (0, 1]).
void verify_tree(const TreeArgs& args);

}  // namespace draftwise
