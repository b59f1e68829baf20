// Small inline helpers shared by the CPU kernels: a SIMD dot product with a wider accumulator, and the sigmoid.
#pragma once
// Never include it together with device_math.cuh: both define grasp::sigmoid.

#include <cmath>
#include <cstdint>

namespace grasp {
// Internal linkage: every kernel file gets its own copy (the CPU and CUDA helpers share names).
namespace {

// sum_k a[k] * b[k], accumulated in acc_t (at::opmath_type of T: float for half/bfloat16/float, double for double).
template <typename T, typename acc_t>
inline acc_t dot(const T* a, const T* b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return s;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

}  // namespace
}  // namespace grasp
