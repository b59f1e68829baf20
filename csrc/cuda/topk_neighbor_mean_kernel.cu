// Host side of the CUDA kernels of the top-k neighbour operator (docs/design.md section 4): input checks, the
// tiled score GEMMs through ATen, the large-k path, launch shapes and the dispatch over dtypes. The kernels and
// the design are in topk_neighbor_mean_device.cuh.
#include <ATen/ATen.h>
#include <ATen/BlasBackend.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/tunable/Tunable.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include "device_scalar.h"
#include "topk_neighbor_mean_device.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

// at::mm(a, b, out_dtype) (float32 output from float16/bfloat16 inputs) exists since torch 2.8.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define GRASP_HAVE_MM_OUT_DTYPE 1
#else
#define GRASP_HAVE_MM_OUT_DTYPE 0
#endif

namespace grasp {
namespace {

using namespace topk_neighbor_mean_device;

// Largest k of the warp selection path.
constexpr int64_t kMaxWarpK = 256;

// Tiling: queries per tile, bounds on database rows per tile, score-block budget.
constexpr int64_t kQueryTile = 4096;
constexpr int64_t kDbTileMin = 16384;
constexpr int64_t kDbTileMax = int64_t{1} << 20;
constexpr int64_t kTileElems = int64_t{1} << 26;     // 256 MiB of float32 scores
constexpr int64_t kConvertElems = int64_t{1} << 26;  // converted database rows (float64 paths)
constexpr int64_t kFallbackElems = int64_t{1} << 24; // [rows, k + cols] candidates, large-k path


template <int KPAD>
void launch_select(const float* block, int rows, int cols, int64_t col0, float* best_s,
                   int64_t* best_i, int k, int64_t self0, bool exclude_self,
                   cudaStream_t stream) {
  const int blocks = (rows + kSelectWarps - 1) / kSelectWarps;
  knn_select_kernel<KPAD><<<blocks, kSelectThreads, 0, stream>>>(
      block, rows, cols, col0, best_s, best_i, k, self0, exclude_self);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Merges a [rows, cols] float32 score block into the running lists of `rows`
// queries (best_s / best_i point at the first of them).
void select_block(const at::Tensor& block, int64_t col0, float* best_s, int64_t* best_i,
                  int64_t k, int64_t self0, bool exclude_self) {
  const int rows = static_cast<int>(block.size(0));
  const int cols = static_cast<int>(block.size(1));
  const float* p = block.data_ptr<float>();
  const int kk = static_cast<int>(k);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (k <= 32) {
    launch_select<32>(p, rows, cols, col0, best_s, best_i, kk, self0, exclude_self, stream);
  } else if (k <= 64) {
    launch_select<64>(p, rows, cols, col0, best_s, best_i, kk, self0, exclude_self, stream);
  } else if (k <= 128) {
    launch_select<128>(p, rows, cols, col0, best_s, best_i, kk, self0, exclude_self, stream);
  } else {
    launch_select<256>(p, rows, cols, col0, best_s, best_i, kk, self0, exclude_self, stream);
  }
}

// Large-k path (k > kMaxWarpK): the same merge with ATen ops. best_s / best_i are
// [rows, k] views of the outputs; `block` is a temporary and is modified.
void select_block_sorted(at::Tensor& block, int64_t col0, at::Tensor& best_s,
                         at::Tensor& best_i, int64_t self0, bool exclude_self) {
  const int64_t rows = block.size(0), cols = block.size(1), k = best_s.size(1);
  if (exclude_self) {
    // Row r's own column is self0 + r - col0 when that lies in [0, cols): it gets
    // -inf, below every real (finite) score, so it never reaches the final top k.
    const int64_t lo = std::max<int64_t>(0, col0 - self0);
    const int64_t hi = std::min<int64_t>(rows, col0 + cols - self0);
    if (lo < hi) {
      const at::Tensor flat =
          at::arange(lo, hi, best_i.options()) * (cols + 1) + (self0 - col0);
      block.view({-1}).index_fill_(0, flat, -std::numeric_limits<float>::infinity());
    }
  }
  const at::Tensor cols_idx =
      at::arange(col0, col0 + cols, best_i.options()).unsqueeze(0).expand({rows, cols});
  const at::Tensor cand_s = at::cat({best_s, block}, 1);
  const at::Tensor cand_i = at::cat({best_i, cols_idx}, 1);
  const auto sorted = at::sort(cand_s, std::optional<bool>(true), /*dim=*/1, /*descending=*/true);
  const at::Tensor order = std::get<1>(sorted).narrow(1, 0, k);
  best_s.copy_(std::get<0>(sorted).narrow(1, 0, k));
  best_i.copy_(cand_i.gather(1, order));
}

// ---------------------------------------------------------------------------
// Score blocks.

enum class Gemm {
  kFloat32,     // float32 operands, cuBLAS fp32 under NoTF32Guard
  kFloat64,     // float64 operands (float32 values), rounded to float32 afterwards
  kLowToFloat,  // float16 / bfloat16 operands, float32 output
};

// Whether a float32 at::mm is sure to run as true fp32 under NoTF32Guard: the
// guard sets the math mode of torch's cuBLAS handle, so it holds on the default
// cuBLAS route but not necessarily when torch prefers cuBLASLt or TunableOp picks
// the kernel.
bool fp32_gemm_honours_guard() {
  if (at::globalContext().blasPreferredBackend() == at::BlasBackend::Cublaslt) return false;
  return !at::cuda::tunable::getTuningContext()->IsTunableOpEnabled();
}

// Scores [rows, cols] float32 (contiguous) of a [rows, D] and b [cols, D].
at::Tensor score_block(const at::Tensor& a, const at::Tensor& b, Gemm mode) {
  if (mode == Gemm::kFloat32) {
    const at::NoTF32Guard no_tf32;
    return at::mm(a, b.t()).contiguous();
  }
  if (mode == Gemm::kFloat64) return at::mm(a, b.t()).to(at::kFloat).contiguous();
#if GRASP_HAVE_MM_OUT_DTYPE
  return at::mm(a, b.t(), at::kFloat).contiguous();
#else
  TORCH_CHECK(false, "topk_neighbor_mean_search (CUDA): float32-output GEMMs of 16-bit inputs need torch >= 2.8");
  return at::Tensor();
#endif
}

// How the score blocks of `dtype` inputs are computed.
Gemm gemm_mode(at::ScalarType dtype) {
  if ((dtype == at::kHalf || dtype == at::kBFloat16) && GRASP_HAVE_MM_OUT_DTYPE) {
    return Gemm::kLowToFloat;
  }
  // float32, float64 (rounded to float32 first), and 16-bit inputs on torch < 2.8
  // (widened to float32: exact products, slower).
  return fp32_gemm_honours_guard() ? Gemm::kFloat32 : Gemm::kFloat64;
}

// The operand for `mode` from input rows t (a view of queries or db).
at::Tensor gemm_operand(const at::Tensor& t, Gemm mode) {
  if (mode == Gemm::kLowToFloat) return t;
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  return mode == Gemm::kFloat64 ? f.to(at::kDouble) : f;
}

// ---------------------------------------------------------------------------
// topk_neighbor_mean_search.

void check_search_inputs(const at::Tensor& queries, const at::Tensor& db, int64_t k,
                         int64_t query_start, bool exclude_self) {
  TORCH_CHECK(queries.is_cuda(), "topk_neighbor_mean_search (CUDA): queries must be a CUDA tensor, got device ",
              queries.device());
  TORCH_CHECK(db.device() == queries.device(), "topk_neighbor_mean_search (CUDA): db is on ", db.device(),
              " but queries is on ", queries.device());
  const auto dtype = queries.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "topk_neighbor_mean_search (CUDA): queries must be float32, float64, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(db.scalar_type() == dtype, "topk_neighbor_mean_search (CUDA): db has dtype ", db.scalar_type(),
              " but queries has dtype ", dtype);
  TORCH_CHECK(queries.dim() == 2, "topk_neighbor_mean_search (CUDA): queries must be [q, D], got shape ",
              queries.sizes());
  TORCH_CHECK(db.dim() == 2, "topk_neighbor_mean_search (CUDA): db must be [n, D], got shape ", db.sizes());
  TORCH_CHECK(db.size(1) == queries.size(1), "topk_neighbor_mean_search (CUDA): db has D = ", db.size(1),
              " but queries has D = ", queries.size(1));
  TORCH_CHECK(queries.is_contiguous(), "topk_neighbor_mean_search (CUDA): queries must be contiguous");
  TORCH_CHECK(db.is_contiguous(), "topk_neighbor_mean_search (CUDA): db must be contiguous");
  TORCH_CHECK(query_start >= 0, "topk_neighbor_mean_search (CUDA): query_start must be >= 0, got ",
              query_start);
  const int64_t n = db.size(0);
  // Query row 0 excludes row query_start; later rows exclude later rows.
  const int64_t available = n - ((exclude_self && query_start < n) ? 1 : 0);
  TORCH_CHECK(k >= 1 && k <= available, "topk_neighbor_mean_search (CUDA): k must be in [1, ", available,
              "] for n = ", n, exclude_self ? " with self excluded" : "", ", got k = ", k);
  TORCH_CHECK(query_start <= std::numeric_limits<int64_t>::max() - queries.size(0),
              "topk_neighbor_mean_search (CUDA): query_start ", query_start, " is too large");
}

std::tuple<at::Tensor, at::Tensor> topk_neighbor_mean_search_cuda(const at::Tensor& queries,
                                                    const at::Tensor& db, int64_t k,
                                                    int64_t query_start, bool exclude_self) {
  check_search_inputs(queries, db, k, query_start, exclude_self);
  const c10::cuda::CUDAGuard guard(queries.device());
  // The score blocks are float32 GEMMs (or float32-output 16-bit ones) whatever autocast says: under
  // CUDA autocast at::mm would otherwise return float16 blocks.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t q = queries.size(0), n = db.size(0), D = queries.size(1);
  const auto opts = queries.options();
  // Running lists = outputs, initialised to the sentinel (-inf, INT64_MAX).
  at::Tensor scores = at::full({q, k}, -std::numeric_limits<float>::infinity(),
                               opts.dtype(at::kFloat));
  at::Tensor indices = at::full({q, k}, kEmptyIndex, opts.dtype(at::kLong));
  if (q == 0) return {scores, indices};

  const Gemm mode = gemm_mode(queries.scalar_type());
  // Whether database tiles are copied (float64 inputs, 16-bit inputs widened, float64 GEMMs).
  const bool converts =
      mode == Gemm::kFloat64 || (mode == Gemm::kFloat32 && queries.scalar_type() != at::kFloat);
  const bool warp_path = k <= kMaxWarpK;

  // Tile sizes: QT x NT float32 scores per block (kTileElems), NT at least
  // kDbTileMin so small query counts still get long GEMMs, converted database
  // tiles bounded by kConvertElems; the large-k path bounds QT x (k + NT).
  int64_t qt, nt;
  if (warp_path) {
    qt = std::min(q, kQueryTile);
    nt = std::clamp(kTileElems / qt, kDbTileMin, kDbTileMax);
  } else {
    nt = kDbTileMin;
    qt = std::clamp(kFallbackElems / (k + nt), int64_t{1}, q);
  }
  if (converts) {
    nt = std::min(nt, std::max<int64_t>(256, kConvertElems / std::max<int64_t>(D, 1)));
  }
  nt = std::min(nt, n);

  const at::Tensor q_op = gemm_operand(queries, mode);  // O(q D) when converted
  float* best_s = scores.data_ptr<float>();
  int64_t* best_i = indices.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < n; c0 += nt) {
    const int64_t cols = std::min(nt, n - c0);
    const at::Tensor db_op = gemm_operand(db.narrow(0, c0, cols), mode);
    for (int64_t r0 = 0; r0 < q; r0 += qt) {
      const int64_t rows = std::min(qt, q - r0);
      at::Tensor block = score_block(q_op.narrow(0, r0, rows), db_op, mode);
      if (warp_path) {
        select_block(block, c0, best_s + r0 * k, best_i + r0 * k, k, query_start + r0,
                     exclude_self);
      } else {
        at::Tensor s = scores.narrow(0, r0, rows);
        at::Tensor i = indices.narrow(0, r0, rows);
        select_block_sorted(block, c0, s, i, query_start + r0, exclude_self);
      }
    }
  }
  return {scores, indices};
}


// Launch shape: rows of up to kMeanThreads chunks share a block (one thread per
// chunk, as many whole rows as fit); longer rows take blockIdx.y parts of equal
// size, at most kMeanThreads chunks each.
template <typename T, typename acc_t, int VEC>
void launch_gather_mean(const T* x, const int64_t* idx, T* out, int64_t q, int64_t D, int64_t k) {
  const int64_t chunks = D / VEC;
  int64_t ys = 1, row_threads = chunks, rows_per_block = 1;
  if (chunks > kMeanThreads) {
    ys = std::min<int64_t>((chunks + kMeanThreads - 1) / kMeanThreads, 65535);
    row_threads = std::min<int64_t>((chunks + ys - 1) / ys, kMeanThreads);
  } else {
    rows_per_block = kMeanThreads / chunks;
  }
  const int64_t threads = row_threads * rows_per_block;
  const int64_t blocks = (q + rows_per_block - 1) / rows_per_block;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(ys));
  gather_mean_kernel<T, acc_t, VEC><<<grid, static_cast<unsigned>(threads), 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(
      x, idx, out, q, D, k, static_cast<int>(row_threads), static_cast<int>(rows_per_block));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor topk_neighbor_mean_gather_cuda(const at::Tensor& x, const at::Tensor& indices) {
  TORCH_CHECK(x.is_cuda(), "topk_neighbor_mean_gather (CUDA): x must be a CUDA tensor, got device ",
              x.device());
  TORCH_CHECK(indices.device() == x.device(), "topk_neighbor_mean_gather (CUDA): indices is on ",
              indices.device(), " but x is on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "topk_neighbor_mean_gather (CUDA): x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() == 2, "topk_neighbor_mean_gather (CUDA): x must be [n, D], got shape ", x.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "topk_neighbor_mean_gather (CUDA): indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.dim() == 2, "topk_neighbor_mean_gather (CUDA): indices must be [q, k], got shape ",
              indices.sizes());
  TORCH_CHECK(x.is_contiguous(), "topk_neighbor_mean_gather (CUDA): x must be contiguous");
  TORCH_CHECK(indices.is_contiguous(), "topk_neighbor_mean_gather (CUDA): indices must be contiguous");
  const int64_t n = x.size(0), D = x.size(1), q = indices.size(0), k = indices.size(1);
  TORCH_CHECK(q <= std::numeric_limits<int32_t>::max(), "topk_neighbor_mean_gather (CUDA): q = ", q,
              " is too large");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({q, D}, x.options());
  if (q == 0 || D == 0) return out;
  if (indices.numel() > 0) {
    const auto [lo, hi] = at::aminmax(indices);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < n, "topk_neighbor_mean_gather (CUDA): indices must lie in [0, ", n,
                "), got values in [", lo_v, ", ", hi_v, "]");
  }
  // k == 0 gives 0 / 0 = NaN rows, like the mean of an empty set in torch.

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "topk_neighbor_mean_gather_cuda", [&] {
    using T = device_scalar_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(T);
    const T* xp = data_as<const T>(x);
    const int64_t* ip = indices.data_ptr<int64_t>();
    T* op = data_as<T>(out);
    // 16-byte accesses when every row starts 16-byte aligned.
    const bool vec = D % kVec == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(op) % 16 == 0;
    if (vec) {
      launch_gather_mean<T, acc_t, kVec>(xp, ip, op, q, D, k);
    } else {
      launch_gather_mean<T, acc_t, 1>(xp, ip, op, q, D, k);
    }
  });
  return out;
}

}  // namespace
}  // namespace grasp

TORCH_LIBRARY_IMPL(grasp, CUDA, m) {
  m.impl("topk_neighbor_mean_search", &grasp::topk_neighbor_mean_search_cuda);
  m.impl("topk_neighbor_mean_gather", &grasp::topk_neighbor_mean_gather_cuda);
}
