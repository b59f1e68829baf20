// CPU kernels of the top-k neighbour operator (schemas in ../topk_neighbor_mean.cpp).
//
// topk_neighbor_mean_search: the queries are cut into tiles of up to kQueryTile rows and each
// tile streams the database in tiles of kDbTile rows. A tile's similarities
// come from one ATen matmul ([query_tile, D] x [D, db_tile]) into a reusable
// per-thread buffer (2 MiB), which the same thread then scans while it is
// still in cache: every query keeps a running top-k, and a block of 16
// similarities is rejected at once when none beats the query's current k-th
// best (one vectorised compare-and-or). The workers pull (query tile,
// database part) tasks from a shared counter; each runs its matmuls
// single-threaded (at::mm inside at::parallel_for), so the threads never wait
// for each other. When there are
// too few queries to keep every thread busy, the database is split into parts
// as well and the per-part top-k lists are merged at the end. No temporary
// depends on n: a [query_tile, db_tile] block, the tiles' top-k states and,
// for float16/bfloat16 inputs, float32 copies of the two tiles.
//
// Candidates reach a query's state in increasing index order, so an equal
// score never displaces a kept one: "ties -> smaller index" falls out of a
// strict compare against the k-th best. k <= kSortedK keeps a sorted array
// with insertion; larger k appends to a buffer of 2k entries that is cut back
// to the best k (nth_element) whenever it fills up.
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

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace grasp {
namespace {

constexpr int64_t kQueryTile = 512;        // query rows per matmul tile (at most)
constexpr int64_t kMinQueryTile = 32;      // below this per thread, split the database instead
constexpr int64_t kDbTile = 1024;          // database rows per matmul tile
constexpr int64_t kSortedK = 32;           // sorted insertion up to here, buffered selection above
constexpr int64_t kStateBytes = 32 << 20;  // bound of one thread's top-k states (large k)
constexpr int64_t kBlock = 16;             // similarities rejected together

template <typename acc_t>
struct Cand {
  acc_t s;
  int64_t i;  // -1: empty slot
};

// Strict order of the result: higher score first, then smaller index; empty slots last.
template <typename acc_t>
inline bool better(const Cand<acc_t>& a, const Cand<acc_t>& b) {
  if (a.i < 0) return false;
  if (b.i < 0) return true;
  return a.s > b.s || (a.s == b.s && a.i < b.i);
}

// Top-k of one query for small k: c[0..count) sorted by (score desc, index asc).
// push(v, j) requires that j exceeds every index pushed before and that
// !full() || v > thr(); a candidate equal to the k-th best then ranks behind it.
template <typename acc_t>
struct SortedTopK {
  Cand<acc_t>* c;
  int64_t k;
  int64_t count;

  void init(Cand<acc_t>* storage, int64_t k_) {
    c = storage;
    k = k_;
    count = 0;
  }
  bool full() const { return count == k; }
  acc_t thr() const { return c[k - 1].s; }
  void push(acc_t v, int64_t j) {
    int64_t p = count < k ? count++ : k - 1;
    while (p > 0 && c[p - 1].s < v) {
      c[p] = c[p - 1];
      --p;
    }
    c[p] = Cand<acc_t>{v, j};
  }
  // Returns how many entries c[0..) holds, in result order (at most k).
  int64_t finish() { return count; }
};

// Top-k of one query for large k: an unsorted buffer of cap >= k + 1 entries,
// cut back to its best k (threshold = the k-th best) whenever it is full.
// Same push contract as SortedTopK.
template <typename acc_t>
struct BufferedTopK {
  Cand<acc_t>* c;
  int64_t k;
  int64_t cap;
  int64_t size;
  bool full_;
  acc_t thr_;

  static int64_t capacity(int64_t k) { return std::max<int64_t>(2 * k, k + 64); }
  void init(Cand<acc_t>* storage, int64_t k_) {
    c = storage;
    k = k_;
    cap = capacity(k_);
    size = 0;
    full_ = false;
    thr_ = -std::numeric_limits<acc_t>::infinity();
  }
  bool full() const { return full_; }
  acc_t thr() const { return thr_; }
  void push(acc_t v, int64_t j) {
    c[size++] = Cand<acc_t>{v, j};
    if (size == cap) compact();
  }
  void compact() {
    std::nth_element(c, c + (k - 1), c + size, better<acc_t>);
    size = k;
    thr_ = c[k - 1].s;
    full_ = true;
  }
  // Sorts the entries into result order and returns how many of them to keep (at most k).
  int64_t finish() {
    std::sort(c, c + size, better<acc_t>);
    return std::min(size, k);
  }
};

// Feeds the similarities row[0..nt) of database rows j0.. to one query's state;
// column `skip` (the query itself, or -1) is left out.
template <typename acc_t, typename Sel>
inline void scan_row(Sel& sel, const acc_t* row, int64_t nt, int64_t j0, int64_t skip) {
  int64_t c = 0;
  for (; c < nt && !sel.full(); ++c) {
    if (c != skip) sel.push(row[c], j0 + c);
  }
  if (c == nt) return;
  acc_t thr = sel.thr();
  for (; c + kBlock <= nt; c += kBlock) {
    const acc_t* b = row + c;
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t i = 0; i < kBlock; ++i) any |= b[i] > thr;
    if (!any) continue;
    for (int64_t i = 0; i < kBlock; ++i) {
      if (b[i] > thr && c + i != skip) {
        sel.push(b[i], j0 + c + i);
        thr = sel.thr();
      }
    }
  }
  for (; c < nt; ++c) {
    if (row[c] > thr && c != skip) {
      sel.push(row[c], j0 + c);
      thr = sel.thr();
    }
  }
}

// How the (q x n) product is cut into tasks.
struct Plan {
  int64_t qt;        // query rows per tile
  int64_t n_qt;      // query tiles
  int64_t parts;     // database parts (1: no split)
  int64_t part_len;  // database rows per part (a multiple of kDbTile)
  int64_t tasks() const { return n_qt * parts; }
};

Plan make_plan(int64_t q, int64_t n, int64_t qt_max, int64_t threads) {
  const int64_t db_tiles = (n + kDbTile - 1) / kDbTile;
  Plan p{std::min(q, qt_max), 0, 1, db_tiles * kDbTile};
  if (threads > 1) {
    // As many query tiles as fit qt_max, rounded up to a multiple of the threads.
    int64_t n_qt = (q + qt_max - 1) / qt_max;
    n_qt = (n_qt + threads - 1) / threads * threads;
    p.qt = (q + n_qt - 1) / n_qt;
    if (p.qt < std::min(kMinQueryTile, qt_max) && db_tiles > 1) {
      // Few queries: one tile of them, the database split among the threads.
      p.qt = std::min(q, qt_max);
      const int64_t n_qt1 = (q + p.qt - 1) / p.qt;
      p.parts = std::min(db_tiles, (threads + n_qt1 - 1) / n_qt1);
      p.part_len = (db_tiles + p.parts - 1) / p.parts * kDbTile;
      p.parts = (n + p.part_len - 1) / p.part_len;
    }
  }
  p.n_qt = (q + p.qt - 1) / p.qt;
  return p;
}

template <typename scalar_t, typename Sel>
void search_impl(const at::Tensor& queries, const at::Tensor& db, int64_t k, int64_t query_start,
                 bool exclude_self, at::Tensor& scores, at::Tensor& indices) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kUpcast = !std::is_same<scalar_t, acc_t>::value;
  const int64_t q = queries.size(0), n = db.size(0), D = queries.size(1);
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t slots = std::is_same<Sel, SortedTopK<acc_t>>::value ? k : BufferedTopK<acc_t>::capacity(k);
  const int64_t qt_max =
      std::max<int64_t>(1, std::min<int64_t>(kQueryTile, kStateBytes / (slots * sizeof(Cand<acc_t>))));
  const Plan plan = make_plan(q, n, qt_max, threads);
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;

  float* scores_p = scores.data_ptr<float>();
  int64_t* indices_p = indices.data_ptr<int64_t>();
  // Per-part results when the database is split: [parts, q, k].
  std::vector<Cand<acc_t>> partial(plan.parts > 1 ? plan.parts * q * k : 0);
  std::atomic<int64_t> next{0};

  at::parallel_for(0, std::min(threads, plan.tasks()), 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::TensorOptions opts = at::TensorOptions().dtype(acc_type);
    at::Tensor sim = at::empty({plan.qt * std::min(kDbTile, n)}, opts);
    at::Tensor qbuf, dbuf;
    if (kUpcast) {
      qbuf = at::empty({plan.qt, D}, opts);
      dbuf = at::empty({std::min(kDbTile, n), D}, opts);
    }
    std::vector<Cand<acc_t>> storage(plan.qt * slots);
    std::vector<Sel> sel(plan.qt);
    for (int64_t t = next.fetch_add(1); t < plan.tasks(); t = next.fetch_add(1)) {
      const int64_t r0 = (t / plan.parts) * plan.qt, rq = std::min(plan.qt, q - r0);
      const int64_t part = t % plan.parts;
      const int64_t j_begin = part * plan.part_len, j_end = std::min(n, j_begin + plan.part_len);
      at::Tensor qtile = queries.narrow(0, r0, rq);
      if (kUpcast) qtile = qbuf.narrow(0, 0, rq).copy_(qtile);
      for (int64_t r = 0; r < rq; ++r) sel[r].init(storage.data() + r * slots, k);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kDbTile) {
        const int64_t nt = std::min(kDbTile, j_end - j0);
        at::Tensor dtile = db.narrow(0, j0, nt);
        if (kUpcast) dtile = dbuf.narrow(0, 0, nt).copy_(dtile);
        at::Tensor s = sim.narrow(0, 0, rq * nt).view({rq, nt});
        at::mm_out(s, qtile, dtile.t());  // single-threaded inside at::parallel_for
        const acc_t* s_p = s.const_data_ptr<acc_t>();
        for (int64_t r = 0; r < rq; ++r) {
          int64_t skip = exclude_self ? query_start + r0 + r - j0 : -1;
          if (skip >= nt) skip = -1;
          scan_row(sel[r], s_p + r * nt, nt, j0, skip);
        }
      }
      for (int64_t r = 0; r < rq; ++r) {
        const int64_t m = sel[r].finish();
        const Cand<acc_t>* c = sel[r].c;
        if (plan.parts > 1) {
          Cand<acc_t>* out = partial.data() + (part * q + r0 + r) * k;
          std::copy(c, c + m, out);
          std::fill(out + m, out + k, Cand<acc_t>{-std::numeric_limits<acc_t>::infinity(), -1});
        } else {
          float* so = scores_p + (r0 + r) * k;
          int64_t* io = indices_p + (r0 + r) * k;
          for (int64_t i = 0; i < m; ++i) {
            so[i] = static_cast<float>(c[i].s);
            io[i] = c[i].i;
          }
          std::fill(so + m, so + k, -std::numeric_limits<float>::infinity());
          std::fill(io + m, io + k, int64_t(-1));
        }
      }
    }
  });

  if (plan.parts > 1) {
    at::parallel_for(0, q, 1, [&](int64_t b, int64_t e) {
      std::vector<Cand<acc_t>> all(plan.parts * k);
      for (int64_t r = b; r < e; ++r) {
        for (int64_t part = 0; part < plan.parts; ++part) {
          const Cand<acc_t>* src = partial.data() + (part * q + r) * k;
          std::copy(src, src + k, all.begin() + part * k);
        }
        std::partial_sort(all.begin(), all.begin() + k, all.end(), better<acc_t>);
        for (int64_t i = 0; i < k; ++i) {
          scores_p[r * k + i] =
              all[i].i < 0 ? -std::numeric_limits<float>::infinity() : static_cast<float>(all[i].s);
          indices_p[r * k + i] = all[i].i;
        }
      }
    });
  }
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
