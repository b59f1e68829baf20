// Host side of the CUDA kernels of the score_topk operator: input checks, the split of the item range, launch
// shapes, the large-k path's ATen merges and the dispatch over dtypes; the kernels and their design are in
// score_topk_device.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "device_scalar.h"
#include "score_topk_device.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace grasp {
namespace {

using namespace score_topk_device;

// ---------------------------------------------------------------------------

// The operands of one call (the gated ones undefined for score_topk_dot).
struct Inputs {
  const char* op;
  at::Tensor query, table, user, user_sim, item, item_sim, values, bias, out_query, exclude;
  bool gated;
};

void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& query,
                  std::initializer_list<int64_t> shape, const char* what) {
  TORCH_CHECK(t.defined(), op, " (CUDA): ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, " (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == query.device(), op, " (CUDA): ", name, " is on ", t.device(), " but query is on ",
              query.device());
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), op, " (CUDA): ", name, " has dtype ", t.scalar_type(),
              " but query has dtype ", query.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), op, " (CUDA): ", name, " must be ", what, ", got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, " (CUDA): ", name, " must be contiguous");
}

void check_inputs(const Inputs& in, int64_t k) {
  const char* op = in.op;
  const at::Tensor& q = in.query;
  TORCH_CHECK(q.is_cuda(), op, " (CUDA): query must be a CUDA tensor, got device ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              " (CUDA): query must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(q.dim() == 2, op, " (CUDA): query must be [B, d], got shape ", q.sizes());
  TORCH_CHECK(q.is_contiguous(), op, " (CUDA): query must be contiguous");
  const int64_t B = q.size(0), d = q.size(1);
  TORCH_CHECK(in.table.dim() == 2, op, " (CUDA): table must be [M, d], got shape ", in.table.sizes());
  const int64_t M = in.table.size(0);
  check_tensor(op, "table", in.table, q, {M, d}, "[M, d] with query's d");
  if (in.gated) {
    TORCH_CHECK(in.user.dim() == 2 && in.user.size(1) >= 1, op,
                " (CUDA): user must be [B, c] with c >= 1, got shape ", in.user.sizes());
    const int64_t c = in.user.size(1);
    check_tensor(op, "user", in.user, q, {B, c}, "[B, c] with query's B");
    check_tensor(op, "user_sim", in.user_sim, q, {B, c}, "[B, c] (user's shape)");
    check_tensor(op, "item", in.item, q, {M, c}, "[M, c] with table's M and user's c");
    check_tensor(op, "item_sim", in.item_sim, q, {M, c}, "[M, c] (item's shape)");
    TORCH_CHECK(in.values.dim() == 3, op, " (CUDA): values must be [M, 3, e], got shape ", in.values.sizes());
    const int64_t e = in.values.size(2);
    check_tensor(op, "values", in.values, q, {M, 3, e}, "[M, 3, e] with table's M");
    check_tensor(op, "bias", in.bias, q, {e}, "[e] with values' e");
    check_tensor(op, "out_query", in.out_query, q, {B, e}, "[B, e] with query's B and values' e");
    TORCH_CHECK(e <= std::numeric_limits<int32_t>::max() / 3 && c <= std::numeric_limits<int32_t>::max(), op,
                " (CUDA): c = ", c, " or e = ", e, " is too large");
  }
  if (in.exclude.defined()) {
    const at::Tensor& x = in.exclude;
    TORCH_CHECK(x.device() == q.device(), op, " (CUDA): exclude is on ", x.device(), " but query is on ",
                q.device());
    TORCH_CHECK(x.scalar_type() == at::kLong, op, " (CUDA): exclude must be int64, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 2 && x.size(0) == B, op, " (CUDA): exclude must be [B, X] with query's B = ", B,
                ", got shape ", x.sizes());
    TORCH_CHECK(x.is_contiguous(), op, " (CUDA): exclude must be contiguous");
    TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max(), op,
                " (CUDA): exclude has too many columns: ", x.size(1));
  }
  TORCH_CHECK(k >= 1 && k <= M, op, " (CUDA): k must be in [1, M] = [1, ", M, "], got ", k);
  // Item indices are int32 in the kernels, INT32_MAX marking empty slots, and tile starts stay below it.
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max() && M < kNoIndex - kItems &&
                  d <= std::numeric_limits<int32_t>::max(),
              op, " (CUDA): B = ", B, ", M = ", M, " or d = ", d, " is too large");
}

// Whether rows of row_len elements of t can be read 16 bytes at a time.
bool vec_rows(const at::Tensor& t, int64_t row_len) {
  const int64_t v = 16 / t.element_size();
  return row_len % v == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

template <typename T>
Params<T> make_params(const Inputs& in, const at::Tensor& exclude_sorted) {
  Params<T> p{};
  p.query = data_as<const T>(in.query);
  p.table = data_as<const T>(in.table);
  p.d = static_cast<int>(in.query.size(1));
  p.vec_dot = vec_rows(in.query, p.d) && vec_rows(in.table, p.d);
  if (in.gated) {
    p.user = data_as<const T>(in.user);
    p.user_sim = data_as<const T>(in.user_sim);
    p.item = data_as<const T>(in.item);
    p.item_sim = data_as<const T>(in.item_sim);
    p.values = data_as<const T>(in.values);
    p.bias = data_as<const T>(in.bias);
    p.out_query = data_as<const T>(in.out_query);
    p.c = static_cast<int>(in.user.size(1));
    p.e = static_cast<int>(in.values.size(2));
    p.c1 = 1.0f / std::sqrt(static_cast<float>(p.c));
    p.c2 = 1.0f / std::sqrt(2.0f * static_cast<float>(p.c));
    p.vec_s1 = vec_rows(in.user, p.c) && vec_rows(in.item, p.c);
    p.vec_s2 = vec_rows(in.user_sim, p.c) && vec_rows(in.item_sim, p.c);
    p.vec_e = vec_rows(in.values, p.e) && vec_rows(in.out_query, p.e);
  }
  if (exclude_sorted.defined() && exclude_sorted.size(1) > 0) {
    p.exclude = exclude_sorted.data_ptr<int64_t>();
    p.X = static_cast<int>(exclude_sorted.size(1));
  }
  return p;
}

template <typename T, bool GATED, int KPAD>
void launch_fused_kpad(const Params<T>& p, dim3 grid, cudaStream_t stream) {
  score_topk_kernel<T, GATED, KPAD><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int KPAD>
void launch_merge(const at::Tensor& part_s, const at::Tensor& part_i, int B, int splits, int k,
                  at::Tensor& scores, at::Tensor& indices, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((B + kMergeWarps - 1) / kMergeWarps);
  score_topk_merge_kernel<KPAD><<<blocks, kMergeWarps * 32, 0, stream>>>(
      part_s.data_ptr<float>(), part_i.data_ptr<int>(), B, splits, k, scores.data_ptr<float>(),
      indices.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Item splits of the fused search: enough blocks for kBlocksPerSm per SM when the user blocks alone are too
// few, each split still covering at least max(kMinSplitTiles, 8 KPAD / kItems) tiles so that scanning its
// items outweighs merging its list.
int64_t choose_splits(int64_t user_blocks, int64_t tiles, int kpad) {
  int sm_count = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t sms = std::max(sm_count, 1);
  const int64_t wanted = (sms * kBlocksPerSm + user_blocks - 1) / user_blocks;
  const int64_t min_tiles = std::max<int64_t>(kMinSplitTiles, 8 * kpad / kItems);
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(tiles / min_tiles, 65535));
  return std::clamp<int64_t>(wanted, 1, most);
}

template <typename T, bool GATED>
void run_fused(Params<T> p, int64_t B, int64_t M, int64_t k, at::Tensor& scores, at::Tensor& indices) {
  const int kpad = k <= 32 ? 32 : k <= 64 ? 64 : k <= 128 ? 128 : 256;
  const int64_t user_blocks = (B + kUsers - 1) / kUsers;
  const int64_t tiles = (M + kItems - 1) / kItems;
  int64_t splits = choose_splits(user_blocks, tiles, kpad);
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  const auto opts = scores.options();
  const at::Tensor part_s = at::empty({B, splits, kpad}, opts.dtype(at::kFloat));
  const at::Tensor part_i = at::empty({B, splits, kpad}, opts.dtype(at::kInt));
  p.u_base = 0;
  p.u_count = static_cast<int>(B);
  p.j_base = 0;
  p.j_count = static_cast<int>(M);
  p.tiles_per_split = static_cast<int>(tiles_per_split);
  p.k = static_cast<int>(k);
  p.splits = static_cast<int>(splits);
  p.part_s = part_s.data_ptr<float>();
  p.part_i = part_i.data_ptr<int>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(user_blocks), static_cast<unsigned>(splits));
  const int b = static_cast<int>(B), s = static_cast<int>(splits), kk = static_cast<int>(k);
  switch (kpad) {
    case 32:
      launch_fused_kpad<T, GATED, 32>(p, grid, stream);
      launch_merge<32>(part_s, part_i, b, s, kk, scores, indices, stream);
      break;
    case 64:
      launch_fused_kpad<T, GATED, 64>(p, grid, stream);
      launch_merge<64>(part_s, part_i, b, s, kk, scores, indices, stream);
      break;
    case 128:
      launch_fused_kpad<T, GATED, 128>(p, grid, stream);
      launch_merge<128>(part_s, part_i, b, s, kk, scores, indices, stream);
      break;
    default:
      launch_fused_kpad<T, GATED, 256>(p, grid, stream);
      launch_merge<256>(part_s, part_i, b, s, kk, scores, indices, stream);
      break;
  }
}

// Large k: score blocks from the kernel, merged into the running lists (the outputs) with ATen ops.
template <typename T, bool GATED>
void run_blocks(Params<T> p, const at::Tensor& exclude, int64_t B, int64_t M, int64_t k, at::Tensor& scores,
                at::Tensor& indices) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Blocks of rows_tile x cols_tile scores; the candidates, k + cols_tile per row, stay near kFallbackElems.
  const int64_t rows_tile =
      std::clamp<int64_t>(kFallbackElems / (k + 16 * kItems), 1, std::min<int64_t>(B, 8 * kUsers));
  const int64_t cols_tile =
      std::min(M, std::max<int64_t>(16 * kItems, (kFallbackElems / rows_tile - k) / kItems * kItems));
  const auto opts = scores.options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  indices.fill_(std::numeric_limits<int64_t>::max());  // empty slots rank after every real row of equal score
  p.tiles_per_split = 1;
  for (int64_t c0 = 0; c0 < M; c0 += cols_tile) {
    const int64_t cols = std::min(cols_tile, M - c0);
    const at::Tensor col_index = at::arange(c0, c0 + cols, opts.dtype(at::kLong));
    for (int64_t r0 = 0; r0 < B; r0 += rows_tile) {
      const int64_t rows = std::min(rows_tile, B - r0);
      at::Tensor block = at::empty({rows, cols + 1}, opts.dtype(at::kFloat));
      p.u_base = static_cast<int>(r0);
      p.u_count = static_cast<int>(rows);
      p.j_base = static_cast<int>(c0);
      p.j_count = static_cast<int>(cols);
      p.block = block.data_ptr<float>();
      p.block_stride = cols + 1;
      const dim3 grid(static_cast<unsigned>((rows + kUsers - 1) / kUsers),
                      static_cast<unsigned>((cols + kItems - 1) / kItems));
      score_topk_kernel<T, GATED, 0><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (exclude.defined() && exclude.size(1) > 0) {
        // Excluded rows of this block to -inf, every other entry to the spare last column.
        const at::Tensor ex = exclude.narrow(0, r0, rows);
        const at::Tensor col = at::where((ex >= c0) & (ex < c0 + cols), ex - c0, at::full_like(ex, cols));
        block.scatter_(1, col, kNegInf);
      }
      const at::Tensor blk = block.narrow(1, 0, cols);
      at::Tensor best_s = scores.narrow(0, r0, rows);
      at::Tensor best_i = indices.narrow(0, r0, rows);
      // The running list (best first, ties by index) followed by the block's columns (larger indices, in
      // order): a stable descending sort orders equal scores by index. Rows not above -inf are left out.
      at::Tensor cand_s = at::cat({best_s, blk}, 1);
      cand_s.masked_fill_(cand_s.isnan(), kNegInf);
      const at::Tensor cand_i = at::cat({best_i, col_index.unsqueeze(0).expand({rows, cols})}, 1);
      const auto sorted = at::sort(cand_s, std::optional<bool>(true), /*dim=*/1, /*descending=*/true);
      const at::Tensor order = std::get<1>(sorted).narrow(1, 0, k);
      best_s.copy_(std::get<0>(sorted).narrow(1, 0, k));
      best_i.copy_(cand_i.gather(1, order));
    }
  }
  indices.masked_fill_(scores == kNegInf, -1);
}

std::tuple<at::Tensor, at::Tensor> score_topk_cuda(const Inputs& in, int64_t k) {
  check_inputs(in, k);
  const c10::cuda::CUDAGuard guard(in.query.device());
  // The large-k path's ATen ops work on float32 score blocks and keep them so under an enclosing autocast.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = in.query.size(0), M = in.table.size(0);
  const auto opts = in.query.options();
  const bool fused = k <= kMaxFusedK;
  // The fused path's merge kernel writes every output slot; the large-k path merges into the outputs.
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::Tensor scores = fused ? at::empty({B, k}, opts.dtype(at::kFloat))
                            : at::full({B, k}, neg_inf, opts.dtype(at::kFloat));
  at::Tensor indices = at::empty({B, k}, opts.dtype(at::kLong));
  if (B == 0) return {scores, indices};
  // The fused kernel looks excluded rows up by binary search in sorted rows.
  at::Tensor exclude;
  if (in.exclude.defined() && in.exclude.size(1) > 0) {
    exclude = fused ? std::get<0>(at::sort(in.exclude, /*dim=*/1)) : in.exclude;
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const Params<T> p = make_params<T>(in, exclude);
    if (in.gated) {
      if (fused) {
        run_fused<T, true>(p, B, M, k, scores, indices);
      } else {
        run_blocks<T, true>(p, exclude, B, M, k, scores, indices);
      }
    } else {
      if (fused) {
        run_fused<T, false>(p, B, M, k, scores, indices);
      } else {
        run_blocks<T, false>(p, exclude, B, M, k, scores, indices);
      }
    }
  };
  switch (in.query.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(Half{});
      break;
    default:
      run(BFloat16{});
      break;
  }
  return {scores, indices};
}

std::tuple<at::Tensor, at::Tensor> score_topk_dot_cuda(const at::Tensor& query, const at::Tensor& table,
                                                       const std::optional<at::Tensor>& exclude, int64_t k) {
  Inputs in{"score_topk_dot", query, table};
  in.gated = false;
  if (exclude.has_value()) in.exclude = *exclude;
  return score_topk_cuda(in, k);
}

std::tuple<at::Tensor, at::Tensor> score_topk_gated_cuda(
    const at::Tensor& query, const at::Tensor& table, const at::Tensor& user, const at::Tensor& user_sim,
    const at::Tensor& item, const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& bias,
    const at::Tensor& out_query, const std::optional<at::Tensor>& exclude, int64_t k) {
  Inputs in{"score_topk_gated", query, table, user, user_sim, item, item_sim, values, bias, out_query};
  in.gated = true;
  if (exclude.has_value()) in.exclude = *exclude;
  return score_topk_cuda(in, k);
}

}  // namespace
}  // namespace grasp

TORCH_LIBRARY_IMPL(grasp, CUDA, m) {
  m.impl("score_topk_dot", &grasp::score_topk_dot_cuda);
  m.impl("score_topk_gated", &grasp::score_topk_gated_cuda);
}
