// Device helpers shared by the CUDA kernels: the portable prelude (fixed-width integers, limits and type
// traits, which NVRTC compiles without the C++ standard library), the 16-bit float types of the device code,
// exp and sigmoid in the accumulator type, the full warp mask, the vector type of 16-byte (or narrower)
// global accesses, the exact GELU, the order of top-k entries.
//
// The kernels' device code (the <op>_device.cuh headers) includes only this file, so one copy of it is
// compiled both by nvcc into grasp._C and at first use by NVRTC (grasp/ops/_cuda_jit.py).
#pragma once
// Never include it together with vec_math.h: both define grasp::sigmoid.

#ifdef __CUDACC_RTC__
using int8_t = signed char;
using uint8_t = unsigned char;
using int16_t = short;
using uint16_t = unsigned short;
using int32_t = int;
using uint32_t = unsigned int;
using int64_t = long long;
using uint64_t = unsigned long long;
using uintptr_t = unsigned long long;
#define INFINITY __int_as_float(0x7f800000)
#else
#include <cmath>
#include <cstdint>
#endif

namespace grasp {

// std::is_same_v, std::conditional_t, std::max / std::min and the limits the device code needs, without
// <type_traits>, <algorithm> or <limits>.
namespace dev {
template <typename A, typename B>
inline constexpr bool is_same_v = false;
template <typename A>
inline constexpr bool is_same_v<A, A> = true;

template <bool C, typename A, typename B>
struct conditional {
  using type = A;
};
template <typename A, typename B>
struct conditional<false, A, B> {
  using type = B;
};
template <bool C, typename A, typename B>
using conditional_t = typename conditional<C, A, B>::type;

template <typename T>
__host__ __device__ constexpr T max(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
__host__ __device__ constexpr T min(T a, T b) {
  return b < a ? b : a;
}

constexpr int32_t kInt32Max = 2147483647;
constexpr int64_t kInt64Max = 9223372036854775807LL;
}  // namespace dev

// IEEE half and bfloat16 as the device code sees them: 2-byte values converted to and from float with
// round-to-nearest-even (the conversions of at::Half / at::BFloat16 and of cuda_fp16.h / cuda_bf16.h, which
// NVRTC does not ship). The extension's host code passes at::Half / at::BFloat16 data as these types, so
// both compilers build the same kernels from the same code.
struct alignas(2) Half {
  uint16_t bits;
  Half() = default;
  __device__ __forceinline__ explicit Half(float f) {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(f));
  }
  __device__ __forceinline__ explicit operator float() const {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
  }
};

struct alignas(2) BFloat16 {
  uint16_t bits;
  BFloat16() = default;
  __device__ __forceinline__ explicit BFloat16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(f));
#else
    const uint32_t u = __float_as_uint(f);
    bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0)  // NaN
                                           : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
  }
  __device__ __forceinline__ explicit operator float() const { return __uint_as_float(uint32_t(bits) << 16); }
};

// A device-side check of what the host already validated: a failure stops the kernel (the launch then fails
// with an error instead of reading out of bounds). ATen's CUDA_KERNEL_ASSERT is not available to NVRTC.
#define GRASP_DEVICE_CHECK(cond) \
  do {                           \
    if (!(cond)) __trap();       \
  } while (0)

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
