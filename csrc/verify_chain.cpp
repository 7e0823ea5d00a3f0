// Fused chain verification on the CPU (contract: draftwise/kernels/spec.py).
//
// Per (row, position) one pass over the vocabulary gives the sanitised max, the sum of
// exp((l - max) / T) and, for greedy rows, the argmax; positions are visited in order and a row
// stops at its first rejection. At the emitted position j one more pass races over the residual
// max(0, p_j - q_j) and over p_j at once: argmax_v w(v) / E_v with E_v = -log(1 - t_v), so the
// empty-residual fallback costs no extra pass. Bytes: each needed logits row is read once (twice
// at the emitted position), q is read at the emitted position only. The kernel verifies only:
// accept_probs (a statistic) is computed beside it (draftwise/kernels/backend.py).
//
// Work is split into (row, vocabulary chunk) pieces whose partial results are merged in a fixed
// order, so the result does not depend on the number of threads: a large batch gives each thread
// whole rows, a small one runs the positions in lock step with the chunks spread over threads.
// Math is float32 with double accumulation; exp and log are polynomial (Cephes) so that the
// inner loops vectorise. Noise is Philox4x32-10 keyed by the row's seed (or injected uniforms).

#include "verify_chain.h"

#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace draftwise {
namespace {

// The element-wise helpers must inline into the loops for those to vectorise.
#define DW_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 4096;    // vocabulary entries per task (16 KiB of float scratch)
constexpr int kLanes = 8;           // independent accumulators, so that reductions vectorise
constexpr int64_t kSumBlock = 256;  // float partial sums are flushed into double this often
constexpr int64_t kTopPFirst = 1024;  // top-p sorts this many candidates first, then 4x more
constexpr int64_t kMinWorkPerThread = 1 << 16;  // vocabulary entries per position per thread

// ---------------------------------------------------------------------------------------------
// Element types and conversions.

// 16-bit floats as distinct scalar types (scalars, unlike structs, vectorise).
enum class Half : uint16_t {};
enum class BFloat16 : uint16_t {};
struct NoProbs {};  // one-hot drafts: there is no q buffer

DW_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

DW_INLINE uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

DW_INLINE float to_float(float x) { return x; }
DW_INLINE float to_float(double x) { return static_cast<float>(x); }
DW_INLINE float to_float(BFloat16 x) { return from_bits(uint32_t(static_cast<uint16_t>(x)) << 16); }
DW_INLINE float to_float(Half half) {
  const uint32_t x = static_cast<uint16_t>(half);
  const uint32_t shifted = (x & 0x7fffu) << 13;  // exponent and mantissa
  const uint32_t exponent = shifted & 0x0f800000u;
  uint32_t bits = shifted + ((127u - 15u) << 23);
  bits = exponent == 0x0f800000u ? bits + ((128u - 16u) << 23) : bits;  // inf and NaN
  // Zero and subnormals: (1 + m / 2**10) * 2**-14 - 2**-14, exact and free of subnormal math.
  const float normal = from_bits(bits);
  const float small = from_bits(bits + (1u << 23)) - from_bits(113u << 23);
  const float magnitude = exponent == 0 ? small : normal;
  return from_bits(to_bits(magnitude) | ((x & 0x8000u) << 16));
}

DW_INLINE double to_double(double x) { return x; }
template <class T>
DW_INLINE double to_double(T x) {
  return to_float(x);
}

// NaN is the lowest value, everything is clamped to the float32 range.
DW_INLINE float sanitize_logit(float x) {
  x = x > -FLT_MAX ? x : -FLT_MAX;
  return x < FLT_MAX ? x : FLT_MAX;
}

// Draft probabilities: NaN and negative values are 0 (+inf stays).
DW_INLINE float sanitize_prob(float q) { return q > 0.0f ? q : 0.0f; }
DW_INLINE double sanitize_prob(double q) { return q > 0.0 ? q : 0.0; }

// ---------------------------------------------------------------------------------------------
// exp and log, vectorisable (Cephes expf / logf, about 1 ulp).

// exp(x) for x <= 0; 0 below the float32 normal range.
DW_INLINE float exp_nonpositive(float x) {
  const float lowest = -87.33654f;
  float xc = x > lowest ? x : lowest;
  xc = xc < 0.0f ? xc : 0.0f;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const float scale = from_bits(uint32_t(static_cast<int32_t>(n) + 127) << 23);
  const float result = y * scale;
  return x > lowest ? result : 0.0f;
}

// -log(u) for a normal u in (0, 1).
DW_INLINE float neg_log(float u) {
  const uint32_t bits = to_bits(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;       // u = m * 2**e, m in [0.5, 1)
  const float m = from_bits((bits & 0x007fffffu) | 0x3f000000u);
  const bool below = m < 0.707106781186547524f;
  e = below ? e - 1 : e;
  const float twice = m + m;
  const float x = (below ? twice : m) - 1.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  const float fe = static_cast<float>(e);
  y = y + -2.12194440e-4f * fe;
  y = y - 0.5f * z;
  float result = x + y;
  result = result + 0.693359375f * fe;
  return -result;
}

// (l - max) / T as a product; exactly 0 at the max even when 1 / T overflows.
DW_INLINE float scaled(float diff, float inv_t) {
  const float product = diff * inv_t;
  return diff < 0.0f ? product : 0.0f;
}

// Unnormalised target weight exp((l - max) / T) of a sanitised logit, 0 below the filter threshold.
DW_INLINE float weight(float x, float max, float inv_t, float threshold) {
  const float w = exp_nonpositive(scaled(x - max, inv_t));
  return x >= threshold ? w : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Small vectorisable reductions over float scratch.

// Four float lanes (GCC/Clang vector extension; one SSE register on baseline x86-64). The
// reductions keep two of them, i.e. eight partial results, whatever the machine.
typedef float Lanes __attribute__((vector_size(16)));
constexpr int kLaneWidth = 4;
static_assert(2 * kLaneWidth == kLanes, "two Lanes make the eight partial results");

DW_INLINE Lanes load_lanes(const float* v) {
  Lanes x;
  std::memcpy(&x, v, sizeof x);
  return x;
}

inline float max_of(const float* v, int64_t n, float init) {
  Lanes low = {init, init, init, init}, high = low;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Lanes x = load_lanes(v + i), y = load_lanes(v + i + kLaneWidth);
    low = x > low ? x : low;
    high = y > high ? y : high;
  }
  float m = init;
  for (int l = 0; l < kLaneWidth; ++l) {
    m = low[l] > m ? low[l] : m;
    m = high[l] > m ? high[l] : m;
  }
  for (; i < n; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Index of the first entry equal to the maximum (keys are never NaN).
inline int64_t argmax_first(const float* v, int64_t n, float* max_out) {
  const float m = max_of(v, n, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  while (i + 1 < n && v[i] != m) ++i;
  *max_out = m;
  return i;
}

// Sum in eight float lanes, flushed into double every kSumBlock entries.
inline double sum_of(const float* v, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t stop = std::min(n, start + kSumBlock);
    Lanes low = {}, high = {};
    int64_t i = start;
    for (; i + kLanes <= stop; i += kLanes) {
      low += load_lanes(v + i);
      high += load_lanes(v + i + kLaneWidth);
    }
    float tail = 0.0f;
    for (; i < stop; ++i) tail += v[i];
    for (int l = 0; l < kLaneWidth; ++l) total += double(low[l]) + double(high[l]);
    total += tail;
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011), word 0 of each counter.

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kStreamAccept = 0;
constexpr uint32_t kStreamRace = 1;

// Word 0 of Philox4x32-10 at counter (c0, c1, c2, 0) with key (k0, k1).
DW_INLINE uint32_t philox_word0(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2) {
  uint32_t x0 = c0, x1 = c1, x2 = c2, x3 = 0;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const uint64_t product0 = uint64_t(x0) * kPhiloxRoundA;
    const uint64_t product1 = uint64_t(x2) * kPhiloxRoundB;
    x0 = static_cast<uint32_t>(product1 >> 32) ^ x1 ^ k0;
    x2 = static_cast<uint32_t>(product0 >> 32) ^ x3 ^ k1;
    x1 = static_cast<uint32_t>(product1);
    x3 = static_cast<uint32_t>(product0);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return x0;
}

// u = ((x >> 9) + 0.5) * 2**-23: exact in float32, strictly inside (0, 1).
DW_INLINE float uniform_from_word(uint32_t x) {
  return (static_cast<float>(static_cast<int32_t>(x >> 9)) + 0.5f) * 0x1p-23f;
}

// Philox is integer work that wider vectors speed up a lot; the result is the same bits on
// every instruction set, so glibc x86-64 builds carry clones picked at load time.
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__)
#define DW_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DW_VECTOR_CLONES
#endif

// The race draw t = float32(x | 1) * 2**-32, in (0, 1] with full precision near 0.
DW_INLINE float race_draw_from_word(uint32_t x) { return static_cast<float>(x | 1u) * 0x1p-32f; }

// E = -log(1 - t) ~ Exp(1), precise for small t (Kahan's log1p: E = -log(y) * t / (1 - y) with
// y = 1 - t rounded; E = t when y rounds to 1; +inf at t = 1, which then never wins the race).
DW_INLINE float race_exponential(float t) {
  const float y = 1.0f - t;
  const float e = neg_log(y > 0.0f ? y : 0.5f) * t / (1.0f - y);
  return y == 1.0f ? t : (y > 0.0f ? e : std::numeric_limits<float>::infinity());
}

// E_v of the race noise for v in [c0_start, c0_start + n) at `position`.
DW_VECTOR_CLONES void philox_race_noise(uint64_t seed, uint32_t c0_start, uint32_t position,
                                        int64_t n, float* noise) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t x = philox_word0(k0, k1, c0_start + static_cast<uint32_t>(i), position, kStreamRace);
    noise[i] = race_exponential(race_draw_from_word(x));
  }
}

// ---------------------------------------------------------------------------------------------
// Per-row parameters and per-position statistics.

struct RowParams {
  int64_t drafted = 0;  // k_b: drafts before the first id outside [0, V)
  bool greedy = false;
  bool filtered = false;  // a sampled row with top-k or top-p on
  double temperature = 1.0;
  float inv_t = 1.0f;
  int64_t top_k = 0;  // active when in (0, V)
  float top_p = 1.0f;
  uint64_t seed = 0;
};

struct PositionStats {
  float max = 0.0f;
  float threshold = -FLT_MAX;  // keep v iff l_v >= threshold (top-k / top-p)
  double z = 1.0;              // sum of the kept weights
  int64_t argmax = 0;
};

struct RowState {
  bool alive = true;  // every position so far accepted
  bool accepted_now = false;
  int64_t emitted_at = -1;  // j
  PositionStats now, at_emit;
};

struct ChunkStats {
  float max;
  double sum;  // sum of exp((l - max) / T) over the chunk, relative to the chunk's own max
  int64_t argmax;
};

struct RaceStats {
  float key_p, key_residual;
  int64_t arg_p, arg_residual;
  bool any_residual;
};

// ---------------------------------------------------------------------------------------------
// Chunk passes.

template <class T>
ChunkStats chunk_stats(const T* logits, int64_t n, int64_t base, float inv_t, bool greedy,
                       float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = sanitize_logit(to_float(logits[i]));
  const float m = max_of(buf, n, -FLT_MAX);
  if (greedy) {
    int64_t i = 0;
    while (buf[i] != m) ++i;
    return ChunkStats{m, 0.0, base + i};
  }
  for (int64_t i = 0; i < n; ++i) buf[i] = exp_nonpositive(scaled(buf[i] - m, inv_t));
  return ChunkStats{m, sum_of(buf, n), -1};
}

// One pass at the emitted position: race keys of p and of the residual max(0, p - q).
// Q = NoProbs: q is one-hot at `onehot` (or 0 everywhere when onehot < 0).
template <class T, class Q>
RaceStats race_chunk(const T* logits, const Q* probs, int64_t onehot, int64_t n, int64_t base,
                     const PositionStats& s, float inv_t, const float* noise, float* key_p,
                     float* key_residual) {
  const float inv_z = static_cast<float>(1.0 / s.z), max = s.max, threshold = s.threshold;
  int any = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float p = weight(sanitize_logit(to_float(logits[i])), max, inv_t, threshold) * inv_z;
    float q;
    if constexpr (std::is_same_v<Q, NoProbs>) {
      q = base + i == onehot ? 1.0f : 0.0f;
    } else {
      q = sanitize_prob(to_float(probs[i]));
    }
    float residual = p - q;
    residual = residual > 0.0f ? residual : 0.0f;
    any |= static_cast<int>(residual > 0.0f);
    key_p[i] = p / noise[i];
    key_residual[i] = residual / noise[i];
  }
  RaceStats r;
  r.arg_p = base + argmax_first(key_p, n, &r.key_p);
  r.arg_residual = base + argmax_first(key_residual, n, &r.key_residual);
  r.any_residual = any != 0;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Row-level steps.

inline PositionStats merge_chunks(const ChunkStats* chunks, int64_t count, bool greedy,
                                  double temperature) {
  PositionStats s;
  s.max = chunks[0].max;
  s.argmax = chunks[0].argmax;
  for (int64_t c = 1; c < count; ++c) {
    if (chunks[c].max > s.max) {  // strict: the lowest index wins ties
      s.max = chunks[c].max;
      s.argmax = chunks[c].argmax;
    }
  }
  if (!greedy) {
    double z = 0.0;
    for (int64_t c = 0; c < count; ++c) {
      const double diff = double(chunks[c].max) - double(s.max);
      z += chunks[c].sum * (diff < 0.0 ? std::exp(diff / temperature) : 1.0);
    }
    s.z = z;
  }
  return s;
}

// Top-k then top-p on one position: sets s.threshold and s.z (the kept weight).
template <class T>
void filter_position(const T* logits, int64_t vocab, const RowParams& rp, PositionStats& s,
                     std::vector<float>& vals) {
  vals.resize(vocab);
  float* v = vals.data();
  for (int64_t i = 0; i < vocab; ++i) v[i] = sanitize_logit(to_float(logits[i]));
  const float max = s.max;
  const float inv_t = rp.inv_t;
  auto w = [&](float x) { return exp_nonpositive(scaled(x - max, inv_t)); };
  const std::greater<float> descending;

  int64_t count = vocab;  // the candidates (kept by top-k) are v[0, count)
  float threshold = -FLT_MAX;
  if (rp.top_k > 0 && rp.top_k < vocab) {
    std::nth_element(v, v + rp.top_k - 1, v + vocab, descending);
    threshold = v[rp.top_k - 1];  // keep x iff fewer than k logits are strictly larger
    count = rp.top_k;
    for (int64_t i = count; i < vocab; ++i)
      if (v[i] == threshold) std::swap(v[i], v[count++]);
  }
  if (!(rp.top_p < 1.0f)) {
    double z = 0.0;
    for (int64_t i = 0; i < count; ++i) z += w(v[i]);
    s.threshold = threshold;
    s.z = z;
    return;
  }
  double total = 0.0;
  for (int64_t i = 0; i < count; ++i) total += w(v[i]);
  const double limit = double(rp.top_p) * total;

  // v[0, sorted) is sorted descending and no smaller than any of v[sorted, count).
  int64_t sorted = 0;
  auto grow = [&](int64_t want) {
    want = std::min(want, count);
    if (want <= sorted) return;
    if (want < count) std::nth_element(v + sorted, v + want - 1, v + count, descending);
    std::sort(v + sorted, v + want, descending);
    sorted = want;
  };
  grow(kTopPFirst);
  double kept = 0.0;  // weight of the candidates strictly larger than the current group
  int64_t i = 0;
  while (i < count) {
    if (i == sorted) grow(4 * sorted);
    const float group = v[i];
    if (!(kept < limit)) break;  // this group and everything below it are dropped
    threshold = group;
    for (;;) {
      while (i < sorted && v[i] == group) {
        kept += w(group);
        ++i;
      }
      if (i < sorted || sorted == count) break;
      grow(4 * sorted);  // ties may continue past the sorted prefix
    }
  }
  s.threshold = threshold;
  s.z = kept;
}

inline double lenient(double p, Lenience kind, double epsilon) {
  switch (kind) {
    case Lenience::kLinear:
      return p / epsilon;
    case Lenience::kSquare:
      return p / (epsilon * epsilon);
    case Lenience::kPower:
      return std::pow(p, epsilon);
    default:
      return p;
  }
}

// p(x) in double from the position's statistics.
template <class T>
double prob_at(const T* logits, int64_t x, const PositionStats& s, double temperature) {
  const float l = sanitize_logit(to_float(logits[x]));
  if (l < s.threshold) return 0.0;
  const double diff = double(l) - double(s.max);
  return (diff < 0.0 ? std::exp(diff / temperature) : 1.0) / s.z;
}

double accept_uniform(const ChainArgs& a, const RowParams& rp, int64_t b, int64_t position) {
  if (a.seeds_ptr != nullptr) {
    float u;
    philox_uniforms(rp.seed, 0, uint32_t(position), kStreamAccept, 1, &u);
    return u;
  }
  const int64_t at = b * a.num_draft + position;
  if (a.accept_uniforms_dtype == DType::kFloat32)
    return static_cast<const float*>(a.accept_uniforms_ptr)[at];
  return static_cast<const double*>(a.accept_uniforms_ptr)[at];
}

// E_v = -log(1 - t_v) of the race at (b, position) for v in [base, base + n).
void race_noise(const ChainArgs& a, const RowParams& rp, int64_t b, int64_t position,
                int64_t base, int64_t n, float* noise) {
  if (a.seeds_ptr != nullptr) {
    philox_race_noise(rp.seed, uint32_t(base), uint32_t(position), n, noise);
    return;
  }
  const int64_t at = (b * (a.num_draft + 1) + position) * a.vocab + base;
  if (a.race_uniforms_dtype == DType::kFloat32) {
    const float* u = static_cast<const float*>(a.race_uniforms_ptr) + at;
    for (int64_t i = 0; i < n; ++i) noise[i] = static_cast<float>(-std::log1p(-double(u[i])));
  } else {
    const double* u = static_cast<const double*>(a.race_uniforms_ptr) + at;
    for (int64_t i = 0; i < n; ++i) noise[i] = static_cast<float>(-std::log1p(-u[i]));
  }
}

// ---------------------------------------------------------------------------------------------
// The whole batch.
//
// Steps per row: for positions r = 0, 1, ... the statistics of r (chunks, then a merge), the
// acceptance test; the row stops at its first
// rejection or at its bonus position k_b; then the race at the emitted position j. A batch with
// enough rows gives each thread whole rows (no barrier inside the step); a small batch runs the
// positions in lock step over all rows with the vocabulary chunks spread over the threads. Both
// orders compute the same chunks and merge them the same way, so the results are identical.

struct Scratch {
  std::vector<float> buf = std::vector<float>(kChunk), noise = std::vector<float>(kChunk),
                     key_p = std::vector<float>(kChunk),
                     key_residual = std::vector<float>(kChunk), vals;
};

template <class T, class Q>
class Chain {
 public:
  static constexpr bool kHasQ = !std::is_same_v<Q, NoProbs>;

  explicit Chain(const ChainArgs& a)
      : a_(a),
        batch_(a.batch),
        k_(a.num_draft),
        vocab_(a.vocab),
        positions_(a.num_draft + 1),
        chunks_((a.vocab + kChunk - 1) / kChunk),
        logits_(static_cast<const T*>(a.target_logits_ptr)),
        probs_(static_cast<const Q*>(a.draft_probs_ptr)),
        tokens_(a.draft_tokens_ptr),
        params_(a.batch),
        state_(a.batch),
        chunk_out_(a.batch * chunks_),
        race_out_(a.batch * chunks_) {
    for (int64_t b = 0; b < batch_; ++b) {
      RowParams& rp = params_[b];
      while (rp.drafted < k_) {
        const int64_t x = tokens_[b * k_ + rp.drafted];
        if (x < 0 || x >= vocab_) break;
        ++rp.drafted;
      }
      const float t = a.temperature_ptr[b];
      rp.greedy = !(t > 0.0f);
      rp.temperature = rp.greedy ? 1.0 : double(t);
      rp.inv_t = rp.greedy ? 1.0f : 1.0f / t;
      rp.top_k = a.top_k_ptr[b];
      rp.top_p = a.top_p_ptr[b];
      rp.filtered = !rp.greedy && ((rp.top_k > 0 && rp.top_k < vocab_) || rp.top_p < 1.0f);
      rp.seed = a.seeds_ptr != nullptr ? static_cast<uint64_t>(a.seeds_ptr[b]) : 0;
    }
  }

  void run(int threads) {
    // Fewer threads for small problems: a position of a row is a few microseconds of work, and
    // on a busy machine each barrier can cost more than that.
    const int64_t useful = std::max<int64_t>(1, batch_ * vocab_ / kMinWorkPerThread);
    threads = static_cast<int>(std::min<int64_t>(threads, useful));
    if (threads == 1 || batch_ >= 3 * int64_t(threads)) {
#pragma omp parallel num_threads(threads)
      {
        Scratch s;
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < batch_; ++b) whole_row(b, s);
      }
    } else {
      lock_step(threads);
    }
  }

 private:
  int64_t chunk_size(int64_t c) const { return std::min(kChunk, vocab_ - c * kChunk); }
  const T* logits_row(int64_t b, int64_t r) const { return logits_ + (b * positions_ + r) * vocab_; }
  const Q* probs_row(int64_t b, int64_t r) const { return probs_ + (b * k_ + r) * vocab_; }

  // Position r of row b is computed while the row is still going.
  bool needs(int64_t b, int64_t r) const { return r <= params_[b].drafted && state_[b].alive; }

  void stats_chunk(int64_t b, int64_t r, int64_t c, Scratch& s) {
    const int64_t base = c * kChunk;
    chunk_out_[b * chunks_ + c] = chunk_stats(logits_row(b, r) + base, chunk_size(c), base,
                                              params_[b].inv_t, params_[b].greedy, s.buf.data());
  }

  // Merge, filter, and the acceptance test at position r.
  void finish_position(int64_t b, int64_t r, Scratch& s) {
    const RowParams& rp = params_[b];
    RowState& st = state_[b];
    const T* row = logits_row(b, r);
    st.now = merge_chunks(&chunk_out_[b * chunks_], chunks_, rp.greedy, rp.temperature);
    if (rp.filtered) filter_position(row, vocab_, rp, st.now, s.vals);
    st.accepted_now = false;
    if (r >= rp.drafted) return;
    const int64_t x = tokens_[b * k_ + r];
    if (rp.greedy) {
      st.accepted_now = x == st.now.argmax;
      return;
    }
    const double p_x = prob_at(row, x, st.now, rp.temperature);
    double q_x = 1.0;
    if constexpr (kHasQ) q_x = sanitize_prob(to_double(probs_row(b, r)[x]));
    const double u = accept_uniform(a_, rp, b, r);
    st.accepted_now = u * q_x < lenient(p_x, a_.lenience_kind, a_.lenience_epsilon);
  }

  // A row stops at its first rejection or at its bonus position.
  void advance(int64_t b, int64_t r) {
    RowState& st = state_[b];
    if (!st.alive || (r < params_[b].drafted && st.accepted_now)) return;
    st.alive = false;
    st.emitted_at = r;
    st.at_emit = st.now;
  }

  void race_chunk_of(int64_t b, int64_t c, Scratch& s) {
    const RowParams& rp = params_[b];
    const RowState& st = state_[b];
    const int64_t j = st.emitted_at, base = c * kChunk, n = chunk_size(c);
    const T* row = logits_row(b, j) + base;
    race_noise(a_, rp, b, j, base, n, s.noise.data());
    RaceStats& out = race_out_[b * chunks_ + c];
    if constexpr (kHasQ) {
      if (j < rp.drafted) {
        out = race_chunk(row, probs_row(b, j) + base, -1, n, base, st.at_emit, rp.inv_t,
                         s.noise.data(), s.key_p.data(), s.key_residual.data());
        return;
      }
    }
    // One-hot q at a drafted position, or q = 0 at the bonus position.
    const int64_t onehot = j < rp.drafted ? tokens_[b * k_ + j] : -1;
    out = race_chunk(row, static_cast<const NoProbs*>(nullptr), onehot, n, base, st.at_emit,
                     rp.inv_t, s.noise.data(), s.key_p.data(), s.key_residual.data());
  }

  void write_output(int64_t b) {
    const RowState& st = state_[b];
    const int64_t j = st.emitted_at;
    int64_t emitted = st.at_emit.argmax;
    if (!params_[b].greedy) {
      const RaceStats* rs = &race_out_[b * chunks_];
      RaceStats best = rs[0];
      for (int64_t c = 1; c < chunks_; ++c) {  // strict: the lowest index wins ties
        best.any_residual = best.any_residual || rs[c].any_residual;
        if (rs[c].key_p > best.key_p) {
          best.key_p = rs[c].key_p;
          best.arg_p = rs[c].arg_p;
        }
        if (rs[c].key_residual > best.key_residual) {
          best.key_residual = rs[c].key_residual;
          best.arg_residual = rs[c].arg_residual;
        }
      }
      emitted = best.any_residual ? best.arg_residual : best.arg_p;  // empty residual: p
    }
    int64_t* out = a_.output_tokens_ptr + b * positions_;
    for (int64_t i = 0; i < j; ++i) out[i] = tokens_[b * k_ + i];
    out[j] = emitted;
    for (int64_t i = j + 1; i < positions_; ++i) out[i] = -1;
    a_.num_accepted_ptr[b] = j;
  }

  void whole_row(int64_t b, Scratch& s) {
    for (int64_t r = 0; r < positions_ && needs(b, r); ++r) {
      for (int64_t c = 0; c < chunks_; ++c) stats_chunk(b, r, c, s);
      finish_position(b, r, s);
      advance(b, r);
    }
    if (!params_[b].greedy)
      for (int64_t c = 0; c < chunks_; ++c) race_chunk_of(b, c, s);
    write_output(b);
  }

  void lock_step(int threads) {
    std::vector<int64_t> active, sampled;
    bool any_filtered = false;
    for (int64_t b = 0; b < batch_; ++b)
      if (!params_[b].greedy) sampled.push_back(b);
    auto gather = [&](int64_t r) {  // the rows that need position r
      active.clear();
      any_filtered = false;
      for (int64_t b = 0; b < batch_; ++b) {
        if (!needs(b, r)) continue;
        active.push_back(b);
        any_filtered = any_filtered || params_[b].filtered;
      }
    };
    gather(0);
    const int64_t chunks = chunks_;
    // Two barriers per position in the common case (no filter): the chunks,
    // then one thread merges, tests and gathers the rows of the next position.
#pragma omp parallel num_threads(threads)
    {
      Scratch s;
      for (int64_t r = 0; r < positions_ && !active.empty(); ++r) {
        const int64_t n_active = static_cast<int64_t>(active.size());
        const bool parallel_finish = any_filtered;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n_active * chunks; ++task)
          stats_chunk(active[task / chunks], r, task % chunks, s);
        if (parallel_finish) {
#pragma omp for schedule(dynamic, 1)
          for (int64_t i = 0; i < n_active; ++i) finish_position(active[i], r, s);
        }
#pragma omp single
        {
          if (!parallel_finish)
            for (int64_t b : active) finish_position(b, r, s);
          for (int64_t b : active) advance(b, r);
          gather(r + 1);
        }
      }
      const int64_t n_sampled = static_cast<int64_t>(sampled.size());
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < n_sampled * chunks; ++task)
        race_chunk_of(sampled[task / chunks], task % chunks, s);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch_; ++b) write_output(b);
    }
  }

  const ChainArgs& a_;
  const int64_t batch_, k_, vocab_, positions_, chunks_;
  const T* logits_;
  const Q* probs_;
  const int64_t* tokens_;
  std::vector<RowParams> params_;
  std::vector<RowState> state_;
  std::vector<ChunkStats> chunk_out_;
  std::vector<RaceStats> race_out_;
};

template <class T, class Q>
void run(const ChainArgs& a) {
  const int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  Chain<T, Q>(a).run(threads);
}

template <class T>
void run_with_logits(const ChainArgs& a) {
  if (a.draft_probs_ptr == nullptr) return run<T, NoProbs>(a);
  switch (a.draft_probs_dtype) {
    case DType::kFloat32:
      return run<T, float>(a);
    case DType::kFloat64:
      return run<T, double>(a);
    case DType::kFloat16:
      return run<T, Half>(a);
    case DType::kBFloat16:
      return run<T, BFloat16>(a);
  }
  throw std::invalid_argument("draft_probs: unsupported dtype code");
}

// The raw-pointer interface cannot see buffer sizes; it checks what it can: sizes, the buffers
// every call needs, the option codes and the per-row values (the messages of spec.py).
void check_args(const ChainArgs& a) {
  if (a.batch < 0 || a.num_draft < 0 || a.vocab < 1)
    throw std::invalid_argument("sizes: expected batch >= 0, num_draft >= 0 and vocab >= 1");
  if (a.target_logits_ptr == nullptr || a.temperature_ptr == nullptr || a.top_k_ptr == nullptr ||
      a.top_p_ptr == nullptr || a.output_tokens_ptr == nullptr || a.num_accepted_ptr == nullptr ||
      (a.num_draft > 0 && a.draft_tokens_ptr == nullptr))
    throw std::invalid_argument("buffers: a required buffer address is 0");
  const int kind = static_cast<int>(a.lenience_kind);
  if (kind < 0 || kind > static_cast<int>(Lenience::kPower))
    throw std::invalid_argument("lenience_kind: expected 0 (none), 1 (linear), 2 (square) or 3 (power)");
  if (!(a.lenience_epsilon > 0.0 && a.lenience_epsilon <= 1.0))
    throw std::invalid_argument("lenience_epsilon: expected a float in (0, 1]");
  check_sampling_rows(a.temperature_ptr, a.top_k_ptr, a.top_p_ptr, a.batch);
}

}  // namespace

void check_sampling_rows(const float* temperature, const int64_t* top_k, const float* top_p, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    if (!(temperature[b] >= 0.0f))
      throw std::invalid_argument(
          "temperature: expected values >= 0 (0 means greedy), got a negative or NaN value");
    if (top_k[b] < 0)
      throw std::invalid_argument(
          "top_k: expected values >= 0 (0 or None switches it off), got a negative value");
    if (!(top_p[b] > 0.0f && top_p[b] <= 1.0f))
      throw std::invalid_argument(
          "top_p: expected values in (0, 1] (1 or None switches it off), got a value outside");
  }
}

void philox_uniforms(uint64_t seed, uint32_t c0_start, uint32_t c1, uint32_t c2, int64_t n,
                     float* out_ptr) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t i = 0; i < n; ++i)
    out_ptr[i] = uniform_from_word(philox_word0(k0, k1, c0_start + static_cast<uint32_t>(i), c1, c2));
}

void verify_chain(const ChainArgs& a) {
  if (a.batch == 0) return;
  check_args(a);
  if (a.seeds_ptr == nullptr) {
    const bool ok = [](DType d) { return d == DType::kFloat32 || d == DType::kFloat64; }(
                        a.accept_uniforms_dtype) &&
                    (a.race_uniforms_dtype == DType::kFloat32 ||
                     a.race_uniforms_dtype == DType::kFloat64);
    if (!ok || a.race_uniforms_ptr == nullptr || (a.num_draft > 0 && a.accept_uniforms_ptr == nullptr))
      throw std::invalid_argument("uniforms: expected float32 or float64 buffers, or seeds");
  }
  switch (a.target_logits_dtype) {
    case DType::kFloat32:
      return run_with_logits<float>(a);
    case DType::kFloat64:
      return run_with_logits<double>(a);
    case DType::kFloat16:
      return run_with_logits<Half>(a);
    case DType::kBFloat16:
      return run_with_logits<BFloat16>(a);
  }
  throw std::invalid_argument("target_logits: unsupported dtype code");
}

// ---------------------------------------------------------------------------------------------
// Building blocks shared with the tree kernel (declared in verify_chain.h).

namespace {

// f(row) with the buffer read as its element type.
template <class F>
auto with_floats(const void* ptr, DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(static_cast<const float*>(ptr));
    case DType::kFloat64:
      return f(static_cast<const double*>(ptr));
    case DType::kFloat16:
      return f(static_cast<const Half*>(ptr));
    case DType::kBFloat16:
      return f(static_cast<const BFloat16*>(ptr));
  }
  throw std::invalid_argument("dtype: unsupported dtype code");
}

PositionStats as_stats(const TargetLaw& law) {
  PositionStats s;
  s.max = law.max;
  s.threshold = law.threshold;
  s.z = law.z;
  s.argmax = law.argmax;
  return s;
}

}  // namespace

TargetLaw target_law(const void* logits, DType dtype, int64_t vocab, const TargetParams& params) {
  RowParams rp;
  rp.greedy = !(params.temperature > 0.0f);
  rp.temperature = rp.greedy ? 1.0 : double(params.temperature);
  rp.inv_t = rp.greedy ? 1.0f : 1.0f / params.temperature;
  rp.top_k = params.top_k;
  rp.top_p = params.top_p;
  rp.filtered = !rp.greedy && ((rp.top_k > 0 && rp.top_k < vocab) || rp.top_p < 1.0f);
  // The chain's steps at one position: chunk statistics, their merge, then the filter.
  const int64_t chunks = (vocab + kChunk - 1) / kChunk;
  std::vector<ChunkStats> parts(chunks);
  std::vector<float> buf(std::min(vocab, kChunk)), vals;
  const PositionStats s = with_floats(logits, dtype, [&](const auto* row) {
    for (int64_t c = 0; c < chunks; ++c)
      parts[c] = chunk_stats(row + c * kChunk, std::min(kChunk, vocab - c * kChunk), c * kChunk,
                             rp.inv_t, rp.greedy, buf.data());
    PositionStats merged = merge_chunks(parts.data(), chunks, rp.greedy, rp.temperature);
    if (rp.filtered) filter_position(row, vocab, rp, merged, vals);
    return merged;
  });
  TargetLaw law;
  law.greedy = rp.greedy;
  law.temperature = rp.temperature;
  law.inv_t = rp.inv_t;
  law.max = s.max;
  law.threshold = s.threshold;
  law.z = s.z;
  law.argmax = s.argmax;
  return law;
}

double target_prob(const void* logits, DType dtype, int64_t x, const TargetLaw& law) {
  return with_floats(logits, dtype,
                     [&](const auto* row) { return prob_at(row, x, as_stats(law), law.temperature); });
}

void target_probs(const void* logits, DType dtype, int64_t vocab, const TargetLaw& law, float* out) {
  const float inv_z = static_cast<float>(1.0 / law.z);
  with_floats(logits, dtype, [&](const auto* row) {
    for (int64_t v = 0; v < vocab; ++v)
      out[v] = weight(sanitize_logit(to_float(row[v])), law.max, law.inv_t, law.threshold) * inv_z;
    return 0;
  });
}

double draft_prob(const void* probs, DType dtype, int64_t x) {
  return with_floats(probs, dtype, [&](const auto* row) { return sanitize_prob(to_double(row[x])); });
}

void draft_probs_row(const void* probs, DType dtype, int64_t vocab, float* out) {
  with_floats(probs, dtype, [&](const auto* row) {
    for (int64_t v = 0; v < vocab; ++v) out[v] = sanitize_prob(to_float(row[v]));
    return 0;
  });
}

void philox_race_exponentials(uint64_t seed, uint32_t c1, int64_t n, float* out) {
  philox_race_noise(seed, 0, c1, n, out);
}

}  // namespace draftwise
