// Fused chain verification of speculative decoding on CPU buffers.
//
// The contract is draftwise/kernels/spec.py; the oracle is chain_reference in
// draftwise/kernels/reference.py. All buffers are contiguous, all sizes and offsets 64-bit.
#pragma once

#include <cfloat>
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
};

// Runs chain verification; throws std::invalid_argument on an unsupported dtype, a negative size,
// a missing required buffer, an unknown lenience or an out-of-range per-row value (temperature
// < 0 or NaN, top_k < 0, top_p outside (0, 1]). Draft ids outside [0, V) end the row's drafts.
void verify_chain(const ChainArgs& args);

// Philox4x32-10 uniforms u = ((x >> 9) + 0.5) * 2**-23 of word 0 for the counters
// (c0_start + i, c1, c2, 0), i < n, keyed by seed. The kernel draws its noise through this.
void philox_uniforms(uint64_t seed, uint32_t c0_start, uint32_t c1, uint32_t c2, int64_t n,
                     float* out_ptr);

// ---------------------------------------------------------------------------------------------
// Building blocks shared with the tree kernel (verify_tree.cpp), so that both compute the target's
// law, the draft probabilities and the race noise the same way. Float buffers are read through
// their dtype code; none of these allocate more than O(V) scratch.

// One row's sampling parameters: temperature 0 is greedy; top_k in (0, V) and top_p < 1 filter.
struct TargetParams {
  float temperature = 1.0f;
  int64_t top_k = 0;
  float top_p = 1.0f;
};

// The target's law at one position, over the sanitised logits l:
// p(v) = [l_v >= threshold] exp((l_v - max) / T) / z. Greedy rows get max and argmax only.
struct TargetLaw {
  bool greedy = false;
  double temperature = 1.0;  // T (1 for greedy rows)
  float inv_t = 1.0f;
  float max = 0.0f;
  float threshold = -FLT_MAX;  // keep v iff l_v >= threshold (-FLT_MAX: no filter)
  double z = 1.0;              // the kept weight
  int64_t argmax = 0;          // the first index of the max
};

// The law of one row of logits [V], exactly as the chain kernel computes it at a position.
TargetLaw target_law(const void* logits, DType dtype, int64_t vocab, const TargetParams& params);

// p(x) in double (the acceptance test's precision).
double target_prob(const void* logits, DType dtype, int64_t x, const TargetLaw& law);

// p(v) for every v as float32 (the race's precision), into out [V].
void target_probs(const void* logits, DType dtype, int64_t vocab, const TargetLaw& law, float* out);

// Draft probabilities as the kernels read them: NaN and negative values are 0.
double draft_prob(const void* probs, DType dtype, int64_t x);
void draft_probs_row(const void* probs, DType dtype, int64_t vocab, float* out);

// The race's Exp(1) variates E_v = -log(1 - t_v), t_v the race draw of counter (v, c1, race),
// for v < n.
void philox_race_exponentials(uint64_t seed, uint32_t c1, int64_t n, float* out);

// Per-row sampling values of a batch: temperature >= 0, top_k >= 0, top_p in (0, 1]; throws
// std::invalid_argument with spec.py's message for the first that is not.
void check_sampling_rows(const float* temperature, const int64_t* top_k, const float* top_p, int64_t batch);

}  // namespace draftwise
