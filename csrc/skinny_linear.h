// Linear layers of a few input rows (y = x @ w^T + bias, M <= 16) on CPU float32 buffers.
#pragma once

#include <cstdint>

namespace draftwise {

// Instruction set of the kernel; the Python side asks for the best one this CPU has.
enum class SkinnyIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct SkinnyLinearArgs {
  const float* x = nullptr;       // [M, K], contiguous
  const float* weight = nullptr;  // [N, K], contiguous
  const float* bias = nullptr;    // [N] or nullptr
  float* y = nullptr;             // [M, N], contiguous
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  SkinnyIsa isa = SkinnyIsa::kScalar;
  int num_threads = 0;  // <= 0: the OpenMP default
};

SkinnyIsa skinny_linear_best_isa();

void skinny_linear(const SkinnyLinearArgs& args);

}  // namespace draftwise
