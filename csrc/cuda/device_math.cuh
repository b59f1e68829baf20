// Device helpers shared by the CUDA kernels: exp and sigmoid in the accumulator type, the full warp mask,
// the vector type of 16-byte (or narrower) global accesses, the exact GELU, the order of top-k entries.
#pragma once
// Never include it together with vec_math.h: both define grasp::sigmoid.

#include <cmath>

namespace grasp {
// Internal linkage: every kernel file gets its own copy (the CPU and CUDA helpers share names).
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// VEC consecutive elements of type T, aligned to their total size, so that reading or writing one
// through a suitably aligned pointer is a single vector access (16 bytes at VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp_acc(-z));
}

// GELU with the exact erf form, 0.5 x (1 + erf(x / sqrt 2)), in float.
__device__ __forceinline__ float gelu_erf(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

// Order of top-k entries: (score sa, index ia) ranks before (sb, ib) when its score is higher, or equal with a
// smaller index. A NaN score ranks neither before nor after anything.
template <typename I>
__device__ __forceinline__ bool ranks_before(float sa, I ia, float sb, I ib) {
  return sa > sb || (sa == sb && ia < ib);
}

}  // namespace
}  // namespace grasp
