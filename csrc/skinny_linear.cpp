// y = x @ w^T + bias for a few rows of x: the linear layers of a verification forward on the CPU.
//
// With M <= 16 input rows, a linear layer is bound by reading its weight: each weight element is
// used only M times. BLAS GEMMs pack the weight into a scratch layout on every call (at least
// three passes over it); these kernels read each weight row once, straight from memory, and
// apply it to all M input rows, which stay in L1. Threads split the output columns.
//
// Each output element is one dot product over k, summed in float32 in a fixed order (16-lane or
// 8-lane partial sums, then a lane reduction), so a row's result does not depend on M.

#include "skinny_linear.h"

// GCC 12 warns that its own AVX-512 headers read an undefined register (they do so on purpose).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace draftwise {
namespace {

constexpr int64_t kMinColumnsPerThread = 32;  // fewer columns are not worth waking a thread for

// Portable path: the same sums, without vector instructions.
void linear_block_scalar(const SkinnyLinearArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float* w = a.weight + n * a.k;
    for (int64_t m = 0; m < a.m; ++m) {
      const float* x = a.x + m * a.k;
      float acc = 0.f;
      for (int64_t i = 0; i < a.k; ++i) acc += x[i] * w[i];
      a.y[m * a.n + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

// kRows input rows x 4 weight rows: 4 * kRows accumulators of 16 lanes. The weight rows come from
// memory on the first pass over the input rows and from L1 after it; the same offset of the next 4
// weight rows is prefetched meanwhile, one block (4 * K floats) ahead of the reads.
template <int kRows>
__attribute__((target("avx512f"))) void rows_avx512(const SkinnyLinearArgs& a, int64_t n0, int64_t nb,
                                                    int64_t m0, bool prefetch) {
  const int64_t k = a.k;
  const int64_t k_main = k - k % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k % 16)) - 1u);
  const float* w[4];
  for (int j = 0; j < 4; ++j) w[j] = a.weight + (n0 + std::min<int64_t>(j, nb - 1)) * k;
  const float* x[kRows];
  for (int i = 0; i < kRows; ++i) x[i] = a.x + (m0 + i) * k;
  __m512 acc[4][kRows];
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < kRows; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k_main; c += 16) {
    if (prefetch)
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(w[j] + 4 * k + c), _MM_HINT_T0);
    __m512 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_ps(w[j] + c);
    for (int i = 0; i < kRows; ++i) {
      const __m512 xv = _mm512_loadu_ps(x[i] + c);
      for (int j = 0; j < 4; ++j) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  if (tail) {
    __m512 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_maskz_loadu_ps(tail, w[j] + k_main);
    for (int i = 0; i < kRows; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x[i] + k_main);
      for (int j = 0; j < 4; ++j) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  for (int64_t j = 0; j < nb; ++j) {
    const float b = a.bias ? a.bias[n0 + j] : 0.f;
    for (int i = 0; i < kRows; ++i) a.y[(m0 + i) * a.n + n0 + j] = _mm512_reduce_add_ps(acc[j][i]) + b;
  }
}

__attribute__((target("avx512f"))) void linear_block_avx512(const SkinnyLinearArgs& a,
                                                            int64_t n_begin, int64_t n_end) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 4) {
    const int64_t nb = std::min<int64_t>(4, n_end - n0);
    const bool prefetch = n0 + 8 <= n_end;
    for (int64_t m0 = 0; m0 < a.m; m0 += 4) {
      switch (std::min<int64_t>(4, a.m - m0)) {
        case 1: rows_avx512<1>(a, n0, nb, m0, prefetch && m0 == 0); break;
        case 2: rows_avx512<2>(a, n0, nb, m0, prefetch && m0 == 0); break;
        case 3: rows_avx512<3>(a, n0, nb, m0, prefetch && m0 == 0); break;
        default: rows_avx512<4>(a, n0, nb, m0, prefetch && m0 == 0); break;
      }
    }
  }
}

__attribute__((target("avx2,fma"))) float reduce_add_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// kRows (<= 3) input rows x 4 weight rows: 4 * kRows accumulators of 8 lanes, 16 vector registers
// at most. Prefetching as in the AVX-512 kernel, one cache line (16 floats) per weight row at a time.
template <int kRows>
__attribute__((target("avx2,fma"))) void rows_avx2(const SkinnyLinearArgs& a, int64_t n0, int64_t nb,
                                                   int64_t m0, bool prefetch) {
  const int64_t k = a.k;
  const int64_t k_main = k - k % 8;
  const float* w[4];
  for (int j = 0; j < 4; ++j) w[j] = a.weight + (n0 + std::min<int64_t>(j, nb - 1)) * k;
  const float* x[kRows];
  for (int i = 0; i < kRows; ++i) x[i] = a.x + (m0 + i) * k;
  __m256 acc[4][kRows];
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < kRows; ++i) acc[j][i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k_main; c += 8) {
    if (prefetch && c % 16 == 0)
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(w[j] + 4 * k + c), _MM_HINT_T0);
    __m256 xv[kRows];
    for (int i = 0; i < kRows; ++i) xv[i] = _mm256_loadu_ps(x[i] + c);
    for (int j = 0; j < 4; ++j) {
      const __m256 wv = _mm256_loadu_ps(w[j] + c);
      for (int i = 0; i < kRows; ++i) acc[j][i] = _mm256_fmadd_ps(wv, xv[i], acc[j][i]);
    }
  }
  for (int64_t j = 0; j < nb; ++j) {
    const float b = a.bias ? a.bias[n0 + j] : 0.f;
    for (int i = 0; i < kRows; ++i) {
      float sum = reduce_add_avx2(acc[j][i]);
      for (int64_t c = k_main; c < k; ++c) sum += x[i][c] * w[j][c];
      a.y[(m0 + i) * a.n + n0 + j] = sum + b;
    }
  }
}

__attribute__((target("avx2,fma"))) void linear_block_avx2(const SkinnyLinearArgs& a,
                                                           int64_t n_begin, int64_t n_end) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += 4) {
    const int64_t nb = std::min<int64_t>(4, n_end - n0);
    const bool prefetch = n0 + 8 <= n_end;
    for (int64_t m0 = 0; m0 < a.m; m0 += 3) {
      switch (std::min<int64_t>(3, a.m - m0)) {
        case 1: rows_avx2<1>(a, n0, nb, m0, prefetch && m0 == 0); break;
        case 2: rows_avx2<2>(a, n0, nb, m0, prefetch && m0 == 0); break;
        default: rows_avx2<3>(a, n0, nb, m0, prefetch && m0 == 0); break;
      }
    }
  }
}

using BlockKernel = void (*)(const SkinnyLinearArgs&, int64_t, int64_t);

BlockKernel pick_kernel(SkinnyIsa isa) {
  switch (isa) {
    case SkinnyIsa::kAvx512:
      return linear_block_avx512;
    case SkinnyIsa::kAvx2:
      return linear_block_avx2;
    default:
      return linear_block_scalar;
  }
}

}  // namespace

SkinnyIsa skinny_linear_best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return SkinnyIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SkinnyIsa::kAvx2;
  return SkinnyIsa::kScalar;
}

void skinny_linear(const SkinnyLinearArgs& a) {
  const BlockKernel kernel = pick_kernel(a.isa);
  const int64_t max_threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  // One contiguous run of output columns per thread, in multiples of the 4-column block.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(max_threads, a.n / kMinColumnsPerThread));
  const int64_t span = ((a.n + threads - 1) / threads + 3) / 4 * 4;
#pragma omp parallel for schedule(static, 1) num_threads(static_cast<int>(threads)) if (threads > 1)
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t begin = std::min(a.n, t * span);
    kernel(a, begin, std::min(a.n, begin + span));
  }
}

}  // namespace draftwise
