// Host side of the CUDA kernels of the projected holistic-attention operator: input checks, the grouping of the
// pairs (ATen sorts), launch shapes and the dispatch over dtypes; the kernels and their design are in
// holistic_attention_projected_device.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "device_scalar.h"
#include "holistic_attention_projected_device.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace grasp {
namespace {

using namespace holistic_attention_projected_device;

void check_inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                  const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& user_index,
                  const at::Tensor& item_index) {
  TORCH_CHECK(user.dim() == 2 && item.dim() == 2 && user.size(1) == item.size(1),
              "holistic_attention_projected (CUDA): user [U, d] and item [M, d] must share d, got ", user.sizes(), " and ",
              item.sizes());
  TORCH_CHECK(user_sim.sizes() == user.sizes() && item_sim.sizes() == item.sizes(),
              "holistic_attention_projected (CUDA): user_sim / item_sim must match user / item");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == item.size(0) && values.size(1) == 3,
              "holistic_attention_projected (CUDA): values must be [M, 3, e] with M = ", item.size(0), ", got ", values.sizes());
  TORCH_CHECK(user_index.dim() == 1 && item_index.sizes() == user_index.sizes(),
              "holistic_attention_projected (CUDA): user_index and item_index must be 1-d of one length");
  for (const at::Tensor* t : {&user, &user_sim, &item, &item_sim, &values}) {
    TORCH_CHECK(t->is_cuda() && t->device() == item.device() && t->is_contiguous() &&
                    t->scalar_type() == item.scalar_type(),
                "holistic_attention_projected (CUDA): inputs must be contiguous tensors of one dtype on one CUDA device");
  }
  for (const at::Tensor* t : {&user_index, &item_index}) {
    TORCH_CHECK(t->device() == item.device() && t->is_contiguous() && t->scalar_type() == at::kLong,
                "holistic_attention_projected (CUDA): indices must be contiguous int64 tensors on the inputs' device");
  }
}

template <typename T>
Inputs<T> make_inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                      const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& user_index,
                      const at::Tensor& item_index) {
  return {data_as<const T>(user),     data_as<const T>(user_sim),   data_as<const T>(item),
          data_as<const T>(item_sim), data_as<const T>(values),     user_index.data_ptr<int64_t>(),
          item_index.data_ptr<int64_t>(), user.size(0), item.size(0), user_index.size(0),
          item.size(1),             values.size(2)};
}

// A warp per pair up to this many blocks (several waves of a large GPU); beyond it the warps stride.
constexpr int64_t kMaxBlocks = 8192;

unsigned blocks_for(int64_t pairs) {
  return static_cast<unsigned>(std::min((pairs + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
}

at::Tensor holistic_attention_projected_forward_cuda(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                                   const at::Tensor& item_sim, const at::Tensor& values,
                                   const at::Tensor& user_index, const at::Tensor& item_index) {
  check_inputs(user, user_sim, item, item_sim, values, user_index, item_index);
  const c10::cuda::CUDAGuard guard(item.device());
  const int64_t N = user_index.size(0), d = item.size(1), e = values.size(2);
  at::Tensor out = at::empty({N, e}, item.options());
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item.scalar_type(), "holistic_attention_projected_forward_cuda", [&] {
    using T = device_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<T>(user, user_sim, item, item_sim, values, user_index, item_index);
    const acc_t c1 = acc_t(1) / std::sqrt(acc_t(d)), c2 = acc_t(1) / std::sqrt(acc_t(2 * d));
    gather_forward_kernel<T, acc_t><<<blocks_for(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        in, data_as<T>(out), c1, c2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Sorted positions per chunk of the segmented sums: a power of two, at least kMinChunk, about kTargetChunks chunks
// (enough warps to fill a large GPU whatever the skew: one row holding every pair spreads over all chunks).
constexpr int64_t kTargetChunks = 4096, kMinChunk = 16;

int64_t chunk_length(int64_t N) {
  int64_t chunk = kMinChunk;
  while (chunk * kTargetChunks < N) chunk *= 2;
  return chunk;
}

// The pairs grouped by `index` (values in 0..rows-1): sorted keys, pair ids in that order (stable), offsets.
struct GroupTensors {
  at::Tensor keys, order, starts;
  Groups view() const {
    return {keys.data_ptr<int64_t>(), order.data_ptr<int64_t>(), starts.data_ptr<int64_t>()};
  }
};

GroupTensors group_by(const at::Tensor& index, int64_t rows) {
  auto [keys, order] = at::sort(index, /*stable=*/true);
  at::Tensor starts = at::searchsorted(keys, at::arange(rows + 1, index.options()));
  return {keys, order, starts};
}

// Launch the segmented sums of `a` and the combine of the segments that cross a chunk boundary.
template <typename T, typename acc_t, int K>
void launch_segment_sum(SegmentSum<T, acc_t, K> a, const at::Tensor& partial, cudaStream_t stream) {
  const int64_t chunks = (a.N + a.chunk - 1) / a.chunk;
  a.partial = partial.data_ptr<acc_t>();
  const unsigned column_tiles = static_cast<unsigned>((a.W + 31) / 32);
  const dim3 warp_per_chunk(static_cast<unsigned>((chunks + kWarpsPerBlock - 1) / kWarpsPerBlock), column_tiles);
  segment_sum_kernel<T, acc_t, K><<<warp_per_chunk, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 block_per_chunk(static_cast<unsigned>(chunks), column_tiles);
  segment_combine_kernel<T, acc_t, K><<<block_per_chunk, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Deterministic: no atomics, and every sum runs in an order fixed by the inputs (sorted pairs, fixed chunks).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> holistic_attention_projected_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
    const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& user_index,
    const at::Tensor& item_index) {
  check_inputs(user, user_sim, item, item_sim, values, user_index, item_index);
  const int64_t N = user_index.size(0), d = item.size(1), e = values.size(2);
  TORCH_CHECK(grad_out.device() == item.device() && grad_out.scalar_type() == item.scalar_type() &&
                  grad_out.is_contiguous() && grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == e,
              "holistic_attention_projected (CUDA): grad_out must be a contiguous [N, e] = [", N, ", ", e,
              "] tensor of the inputs' dtype and device, got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(item.device());
  at::Tensor gu = at::zeros_like(user), gus = at::zeros_like(user_sim), gi = at::zeros_like(item),
             gis = at::zeros_like(item_sim), gv = at::zeros_like(values);
  if (N == 0) return {gu, gus, gi, gis, gv};
  const auto acc_dtype = item.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor pair = at::empty({N, kPairStride}, item.options().dtype(acc_dtype));
  const int64_t chunk = chunk_length(N), chunks = (N + chunk - 1) / chunk;
  const GroupTensors by_item = group_by(item_index, item.size(0)), by_user = group_by(user_index, user.size(0));
  const at::Tensor partial3 = at::empty({chunks, 2, 3, e}, item.options().dtype(acc_dtype));
  const at::Tensor partial2 = at::empty({chunks, 2, 2, d}, item.options().dtype(acc_dtype));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item.scalar_type(), "holistic_attention_projected_backward_cuda", [&] {
    using T = device_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = make_inputs<T>(user, user_sim, item, item_sim, values, user_index, item_index);
    const acc_t c1 = acc_t(1) / std::sqrt(acc_t(d)), c2 = acc_t(1) / std::sqrt(acc_t(2 * d));
    const T* go = data_as<const T>(grad_out);
    acc_t* pairs = pair.data_ptr<acc_t>();
    gather_pairs_kernel<T, acc_t><<<blocks_for(N), kThreads, 0, stream>>>(go, in, pairs, c1, c2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad values[j, x] = sum a_x[n] grad_out[n] over the pairs of item j.
    T* gvp = data_as<T>(gv);
    launch_segment_sum<T, acc_t, 3>(
        {by_item.view(), nullptr, pairs, kGates, {go, go, go}, {gvp, gvp + e, gvp + 2 * e}, 3 * e, nullptr, N, e,
         chunk},
        partial3, stream);
    // grad item[j] = sum ds1[n] user[r_n], grad item_sim[j] = sum ds2[n] user_sim[r_n].
    launch_segment_sum<T, acc_t, 2>(
        {by_item.view(), in.user_index, pairs, kLogits, {in.user, in.user_sim},
         {data_as<T>(gi), data_as<T>(gis)}, d, nullptr, N, d, chunk},
        partial2, stream);
    // grad user[r] = sum ds1[n] item[j_n], grad user_sim[r] = sum ds2[n] item_sim[j_n]. The stream orders this
    // after the item sums, which read partial2 first.
    launch_segment_sum<T, acc_t, 2>(
        {by_user.view(), in.item_index, pairs, kLogits, {in.item, in.item_sim},
         {data_as<T>(gu), data_as<T>(gus)}, d, nullptr, N, d, chunk},
        partial2, stream);
  });
  return {gu, gus, gi, gis, gv};
}

}  // namespace
}  // namespace grasp

TORCH_LIBRARY_IMPL(grasp, CUDA, m) {
  m.impl("holistic_attention_projected_forward", &grasp::holistic_attention_projected_forward_cuda);
  m.impl("holistic_attention_projected_backward", &grasp::holistic_attention_projected_backward_cuda);
}
