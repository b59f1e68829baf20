// CUDA kernels of the projected holistic-attention operator (schemas in ../holistic_attention_projected.cpp).
//
// For every pair n, with r = user_index[n], j = item_index[n]: s1 = <user[r], item[j]>,
// s2 = <user_sim[r], item_sim[j]>, a = sigmoid(s1/sqrt(d), s2/sqrt(d), (s1 + s2)/sqrt(2d)) and
//   out[n] = a_self values[j, 0] + a_sim values[j, 1] + a_glob values[j, 2].
//
// One warp per pair; the warps of the grid stride over the N pairs (the loop bound is the same for every
// lane of a warp, so all of them take part in every shuffle). Lanes cover d and e with a stride of 32 and
// the dot products are summed with __shfl_xor_sync butterflies. Accumulation is in at::opmath_type (float;
// double for double). The backward recomputes the gates and scatters each pair's contributions into
// accumulator-type buffers with atomicAdd (several pairs share a user or an item row), which are cast to
// the inputs' dtype afterwards; the order of the atomic adds varies, so it is not bitwise deterministic.
// Indices are validated by the Python wrapper; the kernels assert them too. Double atomicAdd needs sm_60+.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "device_math.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace grasp {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const T* a, const T* b, int64_t n, int lane) {
  acc_t s = 0;
  for (int64_t k = lane; k < n; k += 32) s += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return warp_sum(s);
}

template <typename T>
struct Inputs {
  const T* user;
  const T* user_sim;
  const T* item;
  const T* item_sim;
  const T* values;  // [M, 3, e]
  const int64_t* user_index;
  const int64_t* item_index;
  int64_t U, M, N, d, e;
};

template <typename acc_t>
struct Pair {
  int64_t r, j;
  acc_t a[3];  // gates: self, similar, global
};

template <typename T, typename acc_t>
__device__ __forceinline__ Pair<acc_t> pair(const Inputs<T>& in, int64_t n, int lane, acc_t c1, acc_t c2) {
  Pair<acc_t> p;
  p.r = in.user_index[n];
  p.j = in.item_index[n];
  CUDA_KERNEL_ASSERT(p.r >= 0 && p.r < in.U && p.j >= 0 && p.j < in.M);
  const acc_t s1 = warp_dot<T, acc_t>(in.user + p.r * in.d, in.item + p.j * in.d, in.d, lane);
  const acc_t s2 = warp_dot<T, acc_t>(in.user_sim + p.r * in.d, in.item_sim + p.j * in.d, in.d, lane);
  p.a[0] = sigmoid(s1 * c1);
  p.a[1] = sigmoid(s2 * c1);
  p.a[2] = sigmoid((s1 + s2) * c2);
  return p;
}

__device__ __forceinline__ int64_t first_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}

__device__ __forceinline__ int64_t warp_stride() {
  return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gather_forward_kernel(Inputs<T> in, T* __restrict__ out, acc_t c1, acc_t c2) {
  const int lane = threadIdx.x & 31;
  for (int64_t n = first_warp(); n < in.N; n += warp_stride()) {
    const Pair<acc_t> p = pair<T, acc_t>(in, n, lane, c1, c2);
    const T* v = in.values + p.j * 3 * in.e;
    for (int64_t k = lane; k < in.e; k += 32) {
      out[n * in.e + k] = static_cast<T>(p.a[0] * static_cast<acc_t>(v[k]) +
                                         p.a[1] * static_cast<acc_t>(v[in.e + k]) +
                                         p.a[2] * static_cast<acc_t>(v[2 * in.e + k]));
    }
  }
}

template <typename acc_t>
struct Grads {
  acc_t* user;
  acc_t* user_sim;
  acc_t* item;
  acc_t* item_sim;
  acc_t* values;
};

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gather_backward_kernel(const T* __restrict__ grad_out, Inputs<T> in, Grads<acc_t> gr, acc_t c1, acc_t c2) {
  const int lane = threadIdx.x & 31;
  const int64_t d = in.d, e = in.e;
  for (int64_t n = first_warp(); n < in.N; n += warp_stride()) {
    const Pair<acc_t> p = pair<T, acc_t>(in, n, lane, c1, c2);
    const T* g = grad_out + n * e;
    const T* v = in.values + p.j * 3 * e;
    acc_t dg[3] = {0, 0, 0};
    for (int64_t k = lane; k < e; k += 32) {
      const acc_t gk = static_cast<acc_t>(g[k]);
      dg[0] += gk * static_cast<acc_t>(v[k]);
      dg[1] += gk * static_cast<acc_t>(v[e + k]);
      dg[2] += gk * static_cast<acc_t>(v[2 * e + k]);
      acc_t* gv = gr.values + p.j * 3 * e;
      atomicAdd(gv + k, p.a[0] * gk);
      atomicAdd(gv + e + k, p.a[1] * gk);
      atomicAdd(gv + 2 * e + k, p.a[2] * gk);
    }
    acc_t dz[3];
#pragma unroll
    for (int x = 0; x < 3; ++x) dz[x] = warp_sum(dg[x]) * p.a[x] * (acc_t(1) - p.a[x]);
    const acc_t ds1 = dz[0] * c1 + dz[2] * c2;
    const acc_t ds2 = dz[1] * c1 + dz[2] * c2;
    const T *u = in.user + p.r * d, *us = in.user_sim + p.r * d;
    const T *i = in.item + p.j * d, *is = in.item_sim + p.j * d;
    for (int64_t k = lane; k < d; k += 32) {
      atomicAdd(gr.item + p.j * d + k, ds1 * static_cast<acc_t>(u[k]));
      atomicAdd(gr.item_sim + p.j * d + k, ds2 * static_cast<acc_t>(us[k]));
      atomicAdd(gr.user + p.r * d + k, ds1 * static_cast<acc_t>(i[k]));
      atomicAdd(gr.user_sim + p.r * d + k, ds2 * static_cast<acc_t>(is[k]));
    }
  }
}

void check_inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                  const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& user_index,
                  const at::Tensor& item_index) {
  TORCH_CHECK(user.dim() == 2 && item.dim() == 2 && user.size(1) == item.size(1),
              "hae_gather (CUDA): user [U, d] and item [M, d] must share d, got ", user.sizes(), " and ",
              item.sizes());
  TORCH_CHECK(user_sim.sizes() == user.sizes() && item_sim.sizes() == item.sizes(),
              "hae_gather (CUDA): user_sim / item_sim must match user / item");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == item.size(0) && values.size(1) == 3,
              "hae_gather (CUDA): values must be [M, 3, e] with M = ", item.size(0), ", got ", values.sizes());
  TORCH_CHECK(user_index.dim() == 1 && item_index.sizes() == user_index.sizes(),
              "hae_gather (CUDA): user_index and item_index must be 1-d of one length");
  for (const at::Tensor* t : {&user, &user_sim, &item, &item_sim, &values}) {
    TORCH_CHECK(t->is_cuda() && t->device() == item.device() && t->is_contiguous() &&
                    t->scalar_type() == item.scalar_type(),
                "hae_gather (CUDA): inputs must be contiguous tensors of one dtype on one CUDA device");
  }
  for (const at::Tensor* t : {&user_index, &item_index}) {
    TORCH_CHECK(t->device() == item.device() && t->is_contiguous() && t->scalar_type() == at::kLong,
                "hae_gather (CUDA): indices must be contiguous int64 tensors on the inputs' device");
  }
}

template <typename T>
Inputs<T> make_inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                      const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& user_index,
                      const at::Tensor& item_index) {
  return {user.data_ptr<T>(),       user_sim.data_ptr<T>(),       item.data_ptr<T>(),
          item_sim.data_ptr<T>(),   values.data_ptr<T>(),         user_index.data_ptr<int64_t>(),
          item_index.data_ptr<int64_t>(), user.size(0), item.size(0), user_index.size(0),
          item.size(1),             values.size(2)};
}

// A warp per pair up to this many blocks (several waves of a large GPU); beyond it the warps stride.
constexpr int64_t kMaxBlocks = 8192;

unsigned blocks_for(int64_t pairs) {
  return static_cast<unsigned>(std::min((pairs + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
}

at::Tensor hae_gather_forward_cuda(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                                   const at::Tensor& item_sim, const at::Tensor& values,
                                   const at::Tensor& user_index, const at::Tensor& item_index) {
  check_inputs(user, user_sim, item, item_sim, values, user_index, item_index);
  const c10::cuda::CUDAGuard guard(item.device());
  const int64_t N = user_index.size(0), d = item.size(1), e = values.size(2);
  at::Tensor out = at::empty({N, e}, item.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item.scalar_type(), "hae_gather_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<scalar_t>(user, user_sim, item, item_sim, values, user_index, item_index);
    const acc_t c1 = acc_t(1) / std::sqrt(acc_t(d)), c2 = acc_t(1) / std::sqrt(acc_t(2 * d));
    gather_forward_kernel<scalar_t, acc_t><<<blocks_for(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        in, out.data_ptr<scalar_t>(), c1, c2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hae_gather_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
    const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& user_index,
    const at::Tensor& item_index) {
  // The atomic adds make the result depend on their order (torch.use_deterministic_algorithms refuses it).
  at::globalContext().alertNotDeterministic("hae_gather_backward_cuda");
  check_inputs(user, user_sim, item, item_sim, values, user_index, item_index);
  const int64_t N = user_index.size(0), d = item.size(1), e = values.size(2);
  TORCH_CHECK(grad_out.device() == item.device() && grad_out.scalar_type() == item.scalar_type() &&
                  grad_out.is_contiguous() && grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == e,
              "hae_gather (CUDA): grad_out must be a contiguous [N, e] = [", N, ", ", e,
              "] tensor of the inputs' dtype and device, got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(item.device());
  const auto acc_dtype = item.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor bufs[5];
  const at::Tensor* inputs[5] = {&user, &user_sim, &item, &item_sim, &values};
  for (int x = 0; x < 5; ++x) bufs[x] = at::zeros(inputs[x]->sizes(), item.options().dtype(acc_dtype));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item.scalar_type(), "hae_gather_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto in = make_inputs<scalar_t>(user, user_sim, item, item_sim, values, user_index, item_index);
      const Grads<acc_t> gr{bufs[0].data_ptr<acc_t>(), bufs[1].data_ptr<acc_t>(), bufs[2].data_ptr<acc_t>(),
                            bufs[3].data_ptr<acc_t>(), bufs[4].data_ptr<acc_t>()};
      const acc_t c1 = acc_t(1) / std::sqrt(acc_t(d)), c2 = acc_t(1) / std::sqrt(acc_t(2 * d));
      gather_backward_kernel<scalar_t, acc_t><<<blocks_for(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_out.data_ptr<scalar_t>(), in, gr, c1, c2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dtype = item.scalar_type();
  return {bufs[0].to(dtype), bufs[1].to(dtype), bufs[2].to(dtype), bufs[3].to(dtype), bufs[4].to(dtype)};
}

}  // namespace
}  // namespace grasp

TORCH_LIBRARY_IMPL(grasp, CUDA, m) {
  m.impl("hae_gather_forward", &grasp::hae_gather_forward_cuda);
  m.impl("hae_gather_backward", &grasp::hae_gather_backward_cuda);
}
