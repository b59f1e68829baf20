// Device helpers shared by the CUDA kernels: exp and sigmoid in the accumulator type, the full warp mask.
#pragma once
// Never include it together with vec_math.h: both define grasp::sigmoid.

#include <cmath>

namespace grasp {
// Internal linkage: every kernel file gets its own copy (the CPU and CUDA helpers share names).
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + exp_acc(-z));
}

}  // namespace
}  // namespace grasp
