// Host side of the CUDA kernels of the holistic-attention operator (docs/design.md section 2): input checks,
// launch shapes and the dispatch over dtypes; the kernels are in holistic_attention_device.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "device_scalar.h"
#include "holistic_attention_device.cuh"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

namespace grasp {
namespace {

using namespace holistic_attention_device;

// ---------------------------------------------------------------------------
// Host side.

void check_inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                  const at::Tensor& item_sim, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(item.is_cuda(), "hae (CUDA): item must be a CUDA tensor, got device ",
              item.device());
  const auto dtype = item.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "hae (CUDA): item must be float32, float64, float16 or bfloat16, got ", dtype);
  const std::array<std::pair<const char*, const at::Tensor*>, 4> named{
      {{"user", &user}, {"user_sim", &user_sim}, {"item", &item}, {"item_sim", &item_sim}}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == item.device(), "hae (CUDA): ", name, " is on ", t->device(),
                " but item is on ", item.device());
    TORCH_CHECK(t->scalar_type() == dtype, "hae (CUDA): ", name, " has dtype ",
                t->scalar_type(), " but item has dtype ", dtype);
    TORCH_CHECK(t->is_contiguous(), "hae (CUDA): ", name, " must be contiguous");
  }
  TORCH_CHECK(item.dim() == 3, "hae (CUDA): item must be [B, L, d], got shape ", item.sizes());
  TORCH_CHECK(item_sim.sizes() == item.sizes(), "hae (CUDA): item_sim has shape ",
              item_sim.sizes(), " but item has shape ", item.sizes());
  const int64_t B = item.size(0), d = item.size(2);
  TORCH_CHECK(user.dim() == 2 || user.dim() == 3,
              "hae (CUDA): user must be [B, d] or [B, L, d], got shape ", user.sizes());
  if (user.dim() == 2) {
    TORCH_CHECK(user.size(0) == B && user.size(1) == d, "hae (CUDA): user has shape ",
                user.sizes(), " but item [B, L, d] has shape ", item.sizes());
  } else {
    TORCH_CHECK(user.sizes() == item.sizes(), "hae (CUDA): user has shape ", user.sizes(),
                " but item has shape ", item.sizes());
  }
  TORCH_CHECK(user_sim.sizes() == user.sizes(), "hae (CUDA): user_sim has shape ",
              user_sim.sizes(), " but user has shape ", user.sizes());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == item.device(), "hae (CUDA): mask is on ", m.device(),
                " but item is on ", item.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kByte,
                "hae (CUDA): mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == item.size(1),
                "hae (CUDA): mask has shape ", m.sizes(), " but item [B, L, d] has shape ",
                item.sizes());
    TORCH_CHECK(m.is_contiguous(), "hae (CUDA): mask must be contiguous");
  }
}

// 16-byte accesses are used when d is a multiple of the vector width and every
// tensor starts 16-byte aligned; each row then starts aligned too.
template <typename T>
bool can_vectorise(int64_t d, std::initializer_list<const void*> ptrs) {
  if (d % (16 / static_cast<int64_t>(sizeof(T))) != 0) return false;
  return std::all_of(ptrs.begin(), ptrs.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; });
}

// Lanes per position: the next power of two >= the number of chunks, at most 32.
int team_size(int64_t cols) {
  int team = 1;
  while (team < 32 && team < cols) team <<= 1;
  return team;
}

// Blocks for the position-strided (sigmoid) kernels: enough to give every team
// one position, capped so that large inputs grid-stride instead (the cap is
// several waves of resident blocks on any current GPU).
constexpr int64_t kMaxFlatBlocks = 8192;

int64_t flat_blocks(int64_t positions, int team) {
  const int64_t per_block = static_cast<int64_t>(kWarps) * (32 / team);
  return std::min((positions + per_block - 1) / per_block, kMaxFlatBlocks);
}

Scales scales(int64_t d) {
  return {1.0 / std::sqrt(static_cast<double>(d)), 1.0 / std::sqrt(2.0 * static_cast<double>(d))};
}

template <typename T>
Inputs<T> make_inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                      const at::Tensor& item_sim, const std::optional<at::Tensor>& mask) {
  return {data_as<const T>(user),
          data_as<const T>(user_sim),
          data_as<const T>(item),
          data_as<const T>(item_sim),
          mask.has_value() ? static_cast<const uint8_t*>(mask->data_ptr()) : nullptr,
          item.size(1),
          item.size(2),
          user.dim() == 3};
}

template <typename T, typename acc_t, int VEC>
void launch_forward(const Inputs<T>& in, T* out, int64_t B, bool softmax) {
  const int64_t positions = B * in.L;
  const int team = team_size(in.d / VEC);
  const Scales sc = scales(in.d);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (softmax) {
    holistic_attention_forward_kernel<T, acc_t, VEC, true>
        <<<static_cast<unsigned>(B), kThreads, 0, stream>>>(in, out, positions, team, sc);
  } else {
    holistic_attention_forward_kernel<T, acc_t, VEC, false>
        <<<static_cast<unsigned>(flat_blocks(positions, team)), kThreads, 0, stream>>>(
            in, out, positions, team, sc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Most chunks per lane that a [B, d] user's backward sums in registers in one
// column pass: 16 accumulator-type values per lane for each of user and
// user_sim, so one pass covers d <= 32 * 16 = 512 at every vector width.
template <int VEC>
constexpr int kMaxUserChunks = 16 / VEC;

template <typename T, typename acc_t, int VEC, bool SOFTMAX, int CH>
void launch_backward_kernel(const T* grad_out, const Inputs<T>& in, const Grads<T>& gr,
                            int64_t blocks, int64_t positions, int team) {
  holistic_attention_backward_kernel<T, acc_t, VEC, SOFTMAX, CH>
      <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_out, in, gr, positions, team, scales(in.d));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A [B, d] user takes one block per row, with as few register chunks per lane
// as its row needs (1, 2, or kMaxUserChunks and several passes beyond that).
template <typename T, typename acc_t, int VEC, bool SOFTMAX>
void launch_backward_act(const T* grad_out, const Inputs<T>& in, const Grads<T>& gr, int64_t B) {
  const int64_t positions = B * in.L;
  const int64_t cols = in.d / VEC;
  const int team = team_size(cols);
  const int64_t chunks = (cols + team - 1) / team;  // per lane, to cover the row in one pass
  if (in.user_per_position) {
    const int64_t blocks = SOFTMAX ? B : flat_blocks(positions, team);
    launch_backward_kernel<T, acc_t, VEC, SOFTMAX, 0>(grad_out, in, gr, blocks, positions, team);
  } else if (chunks == 1) {
    launch_backward_kernel<T, acc_t, VEC, SOFTMAX, 1>(grad_out, in, gr, B, positions, team);
  } else if (chunks == 2) {
    launch_backward_kernel<T, acc_t, VEC, SOFTMAX, 2>(grad_out, in, gr, B, positions, team);
  } else {
    launch_backward_kernel<T, acc_t, VEC, SOFTMAX, kMaxUserChunks<VEC>>(grad_out, in, gr, B,
                                                                        positions, team);
  }
}

template <typename T, typename acc_t, int VEC>
void launch_backward(const T* grad_out, const Inputs<T>& in, const Grads<T>& gr, int64_t B,
                     bool softmax) {
  if (softmax) {
    launch_backward_act<T, acc_t, VEC, true>(grad_out, in, gr, B);
  } else {
    launch_backward_act<T, acc_t, VEC, false>(grad_out, in, gr, B);
  }
}

at::Tensor holistic_attention_forward_cuda(const at::Tensor& user, const at::Tensor& user_sim,
                            const at::Tensor& item, const at::Tensor& item_sim,
                            const std::optional<at::Tensor>& mask, bool softmax) {
  check_inputs(user, user_sim, item, item_sim, mask);
  const int64_t B = item.size(0), L = item.size(1), d = item.size(2);
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), "hae (CUDA): batch size ", B,
              " is too large");
  const c10::cuda::CUDAGuard guard(item.device());
  at::Tensor out = at::empty({B, L, 4 * d}, item.options());
  if (out.numel() == 0) return out;  // B * L == 0 or d == 0: nothing to compute

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, item.scalar_type(), "holistic_attention_forward_cuda", [&] {
        using T = device_scalar_t<scalar_t>;
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kVec = 16 / sizeof(T);
        const auto in = make_inputs<T>(user, user_sim, item, item_sim, mask);
        T* o = data_as<T>(out);
        if (can_vectorise<T>(d, {in.user, in.user_sim, in.item, in.item_sim, o})) {
          launch_forward<T, acc_t, kVec>(in, o, B, softmax);
        } else {
          launch_forward<T, acc_t, 1>(in, o, B, softmax);
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> holistic_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& user, const at::Tensor& user_sim,
    const at::Tensor& item, const at::Tensor& item_sim, const std::optional<at::Tensor>& mask,
    bool softmax) {
  check_inputs(user, user_sim, item, item_sim, mask);
  const int64_t B = item.size(0), L = item.size(1), d = item.size(2);
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), "hae (CUDA): batch size ", B,
              " is too large");
  TORCH_CHECK(grad_out.device() == item.device(), "hae (CUDA): grad_out is on ",
              grad_out.device(), " but item is on ", item.device());
  TORCH_CHECK(grad_out.scalar_type() == item.scalar_type(), "hae (CUDA): grad_out has dtype ",
              grad_out.scalar_type(), " but item has dtype ", item.scalar_type());
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == L &&
                  grad_out.size(2) == 4 * d,
              "hae (CUDA): grad_out must be [B, L, 4d] = [", B, ", ", L, ", ", 4 * d, "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.is_contiguous(), "hae (CUDA): grad_out must be contiguous");
  const c10::cuda::CUDAGuard guard(item.device());
  if (B * L == 0 || d == 0) {  // nothing flows; a [B, d] user gets an empty sum
    return {at::zeros(user.sizes(), user.options()), at::zeros(user_sim.sizes(), user_sim.options()),
            at::zeros(item.sizes(), item.options()),
            at::zeros(item_sim.sizes(), item_sim.options())};
  }
  at::Tensor grad_user = at::empty(user.sizes(), user.options());
  at::Tensor grad_user_sim = at::empty(user_sim.sizes(), user_sim.options());
  at::Tensor grad_item = at::empty(item.sizes(), item.options());
  at::Tensor grad_item_sim = at::empty(item_sim.sizes(), item_sim.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, item.scalar_type(), "holistic_attention_backward_cuda", [&] {
        using T = device_scalar_t<scalar_t>;
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int kVec = 16 / sizeof(T);
        const auto in = make_inputs<T>(user, user_sim, item, item_sim, mask);
        const Grads<T> gr{data_as<T>(grad_user), data_as<T>(grad_user_sim), data_as<T>(grad_item),
                          data_as<T>(grad_item_sim)};
        const T* g = data_as<const T>(grad_out);
        if (can_vectorise<T>(d, {in.user, in.user_sim, in.item, in.item_sim, g, gr.user,
                                        gr.user_sim, gr.item, gr.item_sim})) {
          launch_backward<T, acc_t, kVec>(g, in, gr, B, softmax);
        } else {
          launch_backward<T, acc_t, 1>(g, in, gr, B, softmax);
        }
      });
  return {grad_user, grad_user_sim, grad_item, grad_item_sim};
}

}  // namespace
}  // namespace grasp

TORCH_LIBRARY_IMPL(grasp, CUDA, m) {
  m.impl("holistic_attention_forward", &grasp::holistic_attention_forward_cuda);
  m.impl("holistic_attention_backward", &grasp::holistic_attention_backward_cuda);
}
