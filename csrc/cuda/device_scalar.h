// Host side of the CUDA kernels: the device code's type for each ATen scalar type (at::Half and
// at::BFloat16 are passed to the kernels as grasp::Half and grasp::BFloat16 of device_math.cuh, the same
// 2-byte values) and typed data pointers of tensors.
#pragma once

#include <ATen/ATen.h>

#include "device_math.cuh"

namespace grasp {

template <typename S>
struct DeviceScalarOf {
  using type = S;
};
template <>
struct DeviceScalarOf<at::Half> {
  using type = Half;
};
template <>
struct DeviceScalarOf<at::BFloat16> {
  using type = BFloat16;
};
template <typename S>
using device_scalar_t = typename DeviceScalarOf<S>::type;

static_assert(sizeof(Half) == sizeof(at::Half) && alignof(Half) == alignof(at::Half));
static_assert(sizeof(BFloat16) == sizeof(at::BFloat16) && alignof(BFloat16) == alignof(at::BFloat16));

// t's data as T (T a device scalar type of t's dtype).
template <typename T>
T* data_as(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

}  // namespace grasp
