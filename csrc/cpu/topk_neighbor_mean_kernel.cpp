// CPU kernels of the top-k neighbour operator (schemas in ../topk_neighbor_mean.cpp).
//
// topk_neighbor_mean_search: the streaming top-k of topk_stream.h, whose score tiles here come from
// one ATen matmul ([query_tile, D] x [D, db_tile]) into a reusable per-thread buffer (2 MiB), run
// single-threaded inside the workers. No temporary depends on n: a [query_tile, db_tile] block, the
// tiles' top-k states and, for float16/bfloat16 inputs, float32 copies of the two tiles.
//
// Precision: float32 and float16/bfloat16 (upcast tile by tile) use float32
// products, float64 uses float64 products; scores are returned as float32.
// Autocast is excluded inside the op, so an enclosing torch.autocast cannot turn
// the tile matmuls into 16-bit ones.
//
// topk_neighbor_mean_gather: one task per block of query rows, accumulating in float32
// (float64 for float64 x).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "topk_stream.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace grasp {
namespace {

constexpr int64_t kQueryTile = 512;    // query rows per matmul tile (at most)
constexpr int64_t kMinQueryTile = 32;  // below this per thread, split the database instead
constexpr int64_t kDbTile = 1024;      // database rows per matmul tile

// The score tiles of one thread: queries x database rows by at::mm (see topk_stream.h).
template <typename scalar_t>
struct SearchWorker {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kUpcast = !std::is_same<scalar_t, acc_t>::value;
  at::AutoDispatchBelowADInplaceOrView guard;  // for the worker's thread, while it lives
  const at::Tensor& queries;
  const at::Tensor& db;
  int64_t query_start;
  bool exclude_self;
  at::Tensor sim, qbuf, dbuf, qtile;
  int64_t r0 = 0, rq = 0;

  SearchWorker(const at::Tensor& queries_, const at::Tensor& db_, int64_t query_start_, bool exclude_self_,
               int64_t qt)
      : queries(queries_), db(db_), query_start(query_start_), exclude_self(exclude_self_) {
    const at::TensorOptions opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t nt = std::min(kDbTile, db.size(0)), D = queries.size(1);
    sim = at::empty({qt * nt}, opts);
    if (kUpcast) {
      qbuf = at::empty({qt, D}, opts);
      dbuf = at::empty({nt, D}, opts);
    }
  }
  void rows(int64_t r0_, int64_t rq_) {
    r0 = r0_;
    rq = rq_;
    qtile = queries.narrow(0, r0, rq);
    if (kUpcast) qtile = qbuf.narrow(0, 0, rq).copy_(qtile);
  }
  const acc_t* tile(int64_t j0, int64_t nt) {
    at::Tensor dtile = db.narrow(0, j0, nt);
    if (kUpcast) dtile = dbuf.narrow(0, 0, nt).copy_(dtile);
    at::Tensor s = sim.narrow(0, 0, rq * nt).view({rq, nt});
    at::mm_out(s, qtile, dtile.t());  // single-threaded inside at::parallel_for
    return s.const_data_ptr<acc_t>();
  }
  int64_t skip(int64_t r, int64_t j0, int64_t nt) const {
    const int64_t c = exclude_self ? query_start + r0 + r - j0 : -1;
    return c < nt ? c : -1;
  }
};

template <typename scalar_t, typename Sel>
void search_impl(const at::Tensor& queries, const at::Tensor& db, int64_t k, int64_t query_start,
                 bool exclude_self, at::Tensor& scores, at::Tensor& indices) {
  using acc_t = at::opmath_type<scalar_t>;
  auto make_worker = [&](int64_t qt) { return SearchWorker<scalar_t>(queries, db, query_start, exclude_self, qt); };
  stream_topk<acc_t, Sel, false>(queries.size(0), db.size(0), k, kDbTile, kQueryTile, kMinQueryTile, make_worker,
                                 scores.data_ptr<float>(), indices.data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> topk_neighbor_mean_search_cpu(const at::Tensor& queries, const at::Tensor& db, int64_t k,
                                                  int64_t query_start, bool exclude_self) {
  TORCH_CHECK(queries.dim() == 2 && db.dim() == 2,
              "topk_neighbor_mean_search (cpu): queries [q, D] and db [n, D] expected, got ", queries.sizes(), " and ",
              db.sizes());
  TORCH_CHECK(queries.size(1) == db.size(1), "topk_neighbor_mean_search (cpu): D mismatch: queries ", queries.sizes(),
              ", db ", db.sizes());
  TORCH_CHECK(queries.device().is_cpu() && db.device().is_cpu() && queries.is_contiguous() &&
                  db.is_contiguous() && queries.scalar_type() == db.scalar_type(),
              "topk_neighbor_mean_search (cpu): queries and db must be contiguous CPU tensors of one dtype");
  const int64_t q = queries.size(0), n = db.size(0);
  TORCH_CHECK(n >= 1 && queries.size(1) >= 1, "topk_neighbor_mean_search (cpu): empty database or D = 0");
  TORCH_CHECK(k >= 1 && k <= n - (exclude_self ? 1 : 0), "topk_neighbor_mean_search (cpu): k = ", k,
              " out of range for n = ", n, exclude_self ? " with exclude_self" : "");
  TORCH_CHECK(query_start >= 0, "topk_neighbor_mean_search (cpu): query_start must be >= 0, got ", query_start);
  // The tiles are multiplied in the inputs' precision whatever autocast says (worker threads start
  // without autocast; this covers the calling thread, which takes tasks too).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor scores = at::empty({q, k}, queries.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({q, k}, queries.options().dtype(at::kLong));
  if (q == 0) return {scores, indices};
  const at::Tensor qd = queries.detach(), dd = db.detach();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(), "topk_neighbor_mean_search_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (k <= kSortedK) {
      search_impl<scalar_t, SortedTopK<acc_t>>(qd, dd, k, query_start, exclude_self, scores, indices);
    } else {
      search_impl<scalar_t, BufferedTopK<acc_t>>(qd, dd, k, query_start, exclude_self, scores, indices);
    }
  });
  return {scores, indices};
}

template <typename scalar_t>
void topk_neighbor_mean_gather_impl(const at::Tensor& x, const at::Tensor& indices, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), D = x.size(1), q = indices.size(0), k = indices.size(1);
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const int64_t* idx_p = indices.const_data_ptr<int64_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  // Grain: about 32k elements of x per task.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * D));
  at::parallel_for(0, q, grain, [&](int64_t b, int64_t e) {
    std::vector<acc_t> acc(D);
    for (int64_t r = b; r < e; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t* a = acc.data();
      for (int64_t i = 0; i < k; ++i) {
        const int64_t j = idx_p[r * k + i];
        TORCH_CHECK(j >= 0 && j < n, "topk_neighbor_mean_gather (cpu): index ", j, " out of range for n = ", n);
        const scalar_t* xr = x_p + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += static_cast<acc_t>(xr[d]);
      }
      scalar_t* o = out_p + r * D;
      const acc_t kk = static_cast<acc_t>(k);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d] / kk);
    }
  });
}

at::Tensor topk_neighbor_mean_gather_cpu(const at::Tensor& x, const at::Tensor& indices) {
  TORCH_CHECK(x.dim() == 2, "topk_neighbor_mean_gather (cpu): x must be [n, D], got ", x.sizes());
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong,
              "topk_neighbor_mean_gather (cpu): indices must be an int64 [q, k] tensor");
  TORCH_CHECK(
      x.device().is_cpu() && indices.device().is_cpu() && x.is_contiguous() && indices.is_contiguous(),
      "topk_neighbor_mean_gather (cpu): x and indices must be contiguous CPU tensors");
  TORCH_CHECK(indices.size(1) >= 1, "topk_neighbor_mean_gather (cpu): k must be >= 1");
  at::Tensor out = at::empty({indices.size(0), x.size(1)}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_neighbor_mean_gather_cpu",
                                  [&] { topk_neighbor_mean_gather_impl<scalar_t>(x, indices, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grasp, CPU, m) {
  m.impl("topk_neighbor_mean_search", &topk_neighbor_mean_search_cpu);
  m.impl("topk_neighbor_mean_gather", &topk_neighbor_mean_gather_cpu);
}

}  // namespace grasp
