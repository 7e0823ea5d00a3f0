// Fused chain verification of speculative decoding on CPU buffers.
//
// The contract is draftwise/kernels/spec.py; the oracle is chain_reference in
// draftwise/kernels/reference.py. All buffers are contiguous, all sizes and offsets 64-bit.
#pragma once

#include <cstdint>

namespace draftwise {

// Element type of a float buffer, as the Python side codes it.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

enum class Lenience : int { kNone = 0, kLinear = 1, kSquare = 2, kPower = 3 };

struct ChainArgs {
  // Inputs.
  const int64_t* draft_tokens_ptr = nullptr;  // [B, K]
  const void* draft_probs_ptr = nullptr;      // [B, K, V] or nullptr (one-hot drafts)
  DType draft_probs_dtype = DType::kFloat32;
  const void* target_logits_ptr = nullptr;  // [B, K+1, V]
  DType target_logits_dtype = DType::kFloat32;
  const float* temperature_ptr = nullptr;  // [B], 0 = greedy
  const int64_t* top_k_ptr = nullptr;      // [B], 0 or >= V = off
  const float* top_p_ptr = nullptr;        // [B], 1 = off
  // Noise: either seeds (Philox) or injected uniforms.
  const int64_t* seeds_ptr = nullptr;       // [B] or nullptr
  const void* accept_uniforms_ptr = nullptr;  // [B, K], float32 or float64
  DType accept_uniforms_dtype = DType::kFloat64;
  const void* race_uniforms_ptr = nullptr;  // [B, K+1, V], float32 or float64
  DType race_uniforms_dtype = DType::kFloat64;
  // Sizes and options.
  int64_t batch = 0;
  int64_t num_draft = 0;  // K
  int64_t vocab = 0;      // V
  Lenience lenience_kind = Lenience::kNone;
  double lenience_epsilon = 1.0;
  int num_threads = 0;  // <= 0: the OpenMP default
  // Outputs.
  int64_t* output_tokens_ptr = nullptr;  // [B, K+1]
  int64_t* num_accepted_ptr = nullptr;   // [B]
  float* accept_probs_ptr = nullptr;     // [B, K] or nullptr
};

// Runs chain verification; throws std::invalid_argument on an unsupported dtype, a negative size,
// a missing required buffer, an unknown lenience or an out-of-range per-row value (temperature
// < 0 or NaN, top_k < 0, top_p outside (0, 1]). Draft ids outside [0, V) end the row's drafts.
void verify_chain(const ChainArgs& args);

// Philox4x32-10 uniforms u = ((x >> 9) + 0.5) * 2**-23 of word 0 for the counters
// (c0_start + i, c1, c2, 0), i < n, keyed by seed. The kernel draws its noise through this.
void philox_uniforms(uint64_t seed, uint32_t c0_start, uint32_t c1, uint32_t c2, int64_t n,
                     float* out_ptr);

}  // namespace draftwise
