// CPU kernels of the score-and-select operator (schemas in ../score_topk.cpp).
//
// Both run the streaming top-k of topk_stream.h: tasks of (user tile, item part) pulled by the threads,
// item tiles streamed in increasing index order, a running top-k per user. A worker computes one
// [users, items] score tile into a per-thread buffer:
//
// - score_topk_dot: one ATen matmul, query tile x table tile^T (single-threaded inside the workers).
// - score_topk_gated: the same matmul, then the two gate GEMMs (user x item^T, user_sim x item_sim^T) into
//   a [3, users, items] buffer that becomes the three gates (scaled, one vectorised sigmoid call). Then,
//   item by item (its three value rows stay in L1 across the tile's users), one loop over e per pair
//   computes h = g0 v0 + g1 v1 + g2 v2 + bias, its GELU (gelu_erf.h) and the dot with out_query, all
//   in registers. For float32 that loop is compiled for AVX-512, AVX2 and the baseline ISA, the best
//   of which the loader picks (target_clones). Each pair runs the same code, so equal inputs give equal
//   scores wherever the pair sits (duplicate item rows tie exactly). Every buffer is a few hundred KiB,
//   sized for the L2 cache; none depends on M.
//
// Exclusions: each user's valid entries are sorted once (O(B X log X)); a tile sets the scores of the
// excluded items it holds to -inf by advancing a cursor through that list, and the scan leaves out every
// score not above -inf. Scores accumulate in float32 (float64 for float64 inputs); autocast is excluded
// inside the op, so the tile matmuls keep the inputs' precision under an enclosing torch.autocast.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "gelu_erf.h"
#include "topk_stream.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace grasp {
namespace {

// Plain form: the kNN search's tiles (a 2 MiB score buffer per thread).
constexpr int64_t kDotUserTile = 512;
constexpr int64_t kDotMinUserTile = 32;
constexpr int64_t kDotItemTile = 1024;
// Gated form: smaller tiles, whose item rows (table, item, item_sim, values), gates and scores stay in L2.
constexpr int64_t kGatedUserTile = 64;
constexpr int64_t kGatedMinUserTile = 16;
constexpr int64_t kGatedItemTile = 256;

// Each user's excluded rows, sorted: entries [start[b], start[b + 1]) of rows.
struct Exclusions {
  std::vector<int64_t> start, rows;
};

Exclusions sorted_exclusions(const std::optional<at::Tensor>& exclude, int64_t B, int64_t M) {
  Exclusions ex;
  ex.start.assign(B + 1, 0);
  if (!exclude.has_value() || exclude->size(1) == 0) return ex;
  const int64_t X = exclude->size(1);
  const int64_t* p = exclude->const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t valid = 0;
    for (int64_t x = 0; x < X; ++x) {
      const int64_t j = p[b * X + x];
      TORCH_CHECK(j >= -1 && j < M, "score_topk (cpu): exclude[", b, ", ", x, "] = ", j,
                  " is neither a row of table (0..", M - 1, ") nor -1");
      valid += j >= 0;
    }
    ex.start[b + 1] = ex.start[b] + valid;
  }
  ex.rows.resize(ex.start[B]);
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* out = ex.rows.data() + ex.start[b];
      for (int64_t x = 0; x < X; ++x) {
        if (p[b * X + x] >= 0) *out++ = p[b * X + x];
      }
      std::sort(ex.rows.data() + ex.start[b], out);
    }
  });
  return ex;
}

// The gated form's extra inputs (all contiguous, of the query's dtype).
struct GatedInputs {
  at::Tensor user, user_sim, item, item_sim, values, bias, out_query;
};

// s[r, j] += <out_query[r], gelu(g_self[r, j] v[j, 0] + g_sim[r, j] v[j, 1] + g_glob[r, j] v[j, 2] + bias)> for
// the rq users and nt items of a tile: gates [3, rq, nt], values [nt, 3, e], out_query [rq, e], s [rq, nt].
template <typename scalar_t>
inline __attribute__((always_inline)) void gated_term_impl(scalar_t* s, const scalar_t* gates, const scalar_t* values,
                                                           const scalar_t* bias, const scalar_t* out_query, int64_t rq,
                                                           int64_t nt, int64_t e) {
  const int64_t n = rq * nt;
  for (int64_t j = 0; j < nt; ++j) {
    const scalar_t *v_self = values + j * 3 * e, *v_sim = v_self + e, *v_glob = v_sim + e;
    for (int64_t r = 0; r < rq; ++r) {
      const int64_t p = r * nt + j;
      const scalar_t a = gates[p], b = gates[n + p], c = gates[2 * n + p];
      const scalar_t* oq = out_query + r * e;
      scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t x = 0; x < e; ++x) acc += oq[x] * gelu_erf(a * v_self[x] + b * v_sim[x] + c * v_glob[x] + bias[x]);
      s[p] += acc;
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GRASP_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GRASP_VECTOR_CLONES
#endif

GRASP_VECTOR_CLONES void gated_term(float* s, const float* gates, const float* values, const float* bias,
                                    const float* out_query, int64_t rq, int64_t nt, int64_t e) {
  gated_term_impl(s, gates, values, bias, out_query, rq, nt, e);
}

void gated_term(double* s, const double* gates, const double* values, const double* bias, const double* out_query,
                int64_t rq, int64_t nt, int64_t e) {
  gated_term_impl(s, gates, values, bias, out_query, rq, nt, e);
}

// The score tiles of one thread (see topk_stream.h): matmuls, the gated term when `gated` is set, then
// the exclusions.
template <typename scalar_t>
struct ScoreWorker {
  at::AutoDispatchBelowADInplaceOrView guard;  // for the worker's thread, while it lives
  const at::Tensor& query;
  const at::Tensor& table;
  const GatedInputs* gated;
  const Exclusions& ex;
  scalar_t c1 = 0, c2 = 0;       // gate scales 1/sqrt(c), 1/sqrt(2c)
  at::Tensor s, gates;           // [qt * nt], [3 * qt * nt]
  at::Tensor q_t, u_t, us_t;     // the user tile's rows
  std::vector<int64_t> cursor;   // per user of the tile: next entry of its sorted exclusions
  int64_t r0 = 0, rq = 0;

  ScoreWorker(const at::Tensor& query_, const at::Tensor& table_, const GatedInputs* gated_, const Exclusions& ex_,
              int64_t qt, int64_t nt)
      : query(query_), table(table_), gated(gated_), ex(ex_), cursor(qt) {
    const at::TensorOptions opts = query.options();
    s = at::empty({qt * nt}, opts);
    if (gated) {
      const int64_t c = gated->user.size(1);
      c1 = scalar_t(1) / std::sqrt(scalar_t(c));
      c2 = scalar_t(1) / std::sqrt(scalar_t(2 * c));
      gates = at::empty({3 * qt * nt}, opts);
    }
  }

  void rows(int64_t r0_, int64_t rq_) {
    r0 = r0_;
    rq = rq_;
    q_t = query.narrow(0, r0, rq);
    if (gated) {
      u_t = gated->user.narrow(0, r0, rq);
      us_t = gated->user_sim.narrow(0, r0, rq);
    }
    for (int64_t r = 0; r < rq; ++r) cursor[r] = ex.start[r0 + r];
  }

  const scalar_t* tile(int64_t j0, int64_t nt) {
    at::Tensor st = s.narrow(0, 0, rq * nt).view({rq, nt});
    at::mm_out(st, q_t, table.narrow(0, j0, nt).t());  // single-threaded inside at::parallel_for
    scalar_t* sp = st.data_ptr<scalar_t>();
    if (gated) add_gated(sp, j0, nt);
    constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t r = 0; r < rq; ++r) {
      const int64_t end = ex.start[r0 + r + 1];
      int64_t& cur = cursor[r];
      for (; cur < end && ex.rows[cur] < j0 + nt; ++cur) {
        if (ex.rows[cur] >= j0) sp[r * nt + ex.rows[cur] - j0] = kNegInf;
      }
    }
    return sp;
  }

  int64_t skip(int64_t, int64_t, int64_t) const { return -1; }

  // s[r, j] += <out_query[r], gelu(h[r, j])> for the tile's users r and items j0 + j.
  void add_gated(scalar_t* sp, int64_t j0, int64_t nt) {
    const int64_t n = rq * nt;
    at::Tensor g = gates.narrow(0, 0, 3 * n).view({3, rq, nt});
    at::Tensor g_self = g.select(0, 0), g_sim = g.select(0, 1), g_glob = g.select(0, 2);
    at::mm_out(g_self, u_t, gated->item.narrow(0, j0, nt).t());
    at::mm_out(g_sim, us_t, gated->item_sim.narrow(0, j0, nt).t());
    at::add_out(g_glob, g_self, g_sim).mul_(c2);
    g.narrow(0, 0, 2).mul_(c1);
    g.sigmoid_();
    const int64_t e = gated->values.size(2);
    gated_term(sp, g.const_data_ptr<scalar_t>(), gated->values.const_data_ptr<scalar_t>() + j0 * 3 * e,
               gated->bias.const_data_ptr<scalar_t>(), gated->out_query.const_data_ptr<scalar_t>() + r0 * e, rq, nt, e);
  }
};

void check_like(const char* name, const at::Tensor& t, const at::Tensor& query) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == query.scalar_type(),
              "score_topk (cpu): ", name, " must be a contiguous CPU tensor of query's dtype");
}

void check_rows(const char* name, const at::Tensor& t, const at::Tensor& query, int64_t rows, int64_t width) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == width, "score_topk (cpu): ", name, " must be [",
              rows, ", ", width, "], got ", t.sizes());
  check_like(name, t, query);
}

void check_common(const at::Tensor& query, const at::Tensor& table, const std::optional<at::Tensor>& exclude,
                  int64_t k) {
  TORCH_CHECK(query.dim() == 2 && query.size(1) >= 1, "score_topk (cpu): query must be [B, d] with d >= 1, got ",
              query.sizes());
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
              "score_topk (cpu): the cpu kernels take float32 and float64, not ", query.scalar_type());
  check_rows("query", query, query, query.size(0), query.size(1));
  check_rows("table", table, query, table.size(0), query.size(1));
  TORCH_CHECK(k >= 1 && k <= table.size(0), "score_topk (cpu): k = ", k, " must be in 1..M = ", table.size(0));
  if (exclude.has_value()) {
    TORCH_CHECK(exclude->dim() == 2 && exclude->size(0) == query.size(0) && exclude->scalar_type() == at::kLong &&
                    exclude->device().is_cpu() && exclude->is_contiguous(),
                "score_topk (cpu): exclude must be a contiguous int64 CPU tensor [B, X] with B = ", query.size(0),
                ", got ", exclude->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor> score_topk_cpu(const at::Tensor& query, const at::Tensor& table,
                                                  const GatedInputs* gated, const std::optional<at::Tensor>& exclude,
                                                  int64_t k) {
  // The worker threads start without autocast; this covers the calling thread, which takes tasks too.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = query.size(0), M = table.size(0);
  at::Tensor scores = at::empty({B, k}, query.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({B, k}, query.options().dtype(at::kLong));
  if (B == 0) return {scores, indices};
  const Exclusions ex = sorted_exclusions(exclude, B, M);
  const at::Tensor q = query.detach(), t = table.detach();
  const int64_t nt = gated ? kGatedItemTile : kDotItemTile;
  const int64_t qt = gated ? kGatedUserTile : kDotUserTile, min_qt = gated ? kGatedMinUserTile : kDotMinUserTile;
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "score_topk_cpu", [&] {
    auto make_worker = [&](int64_t rows) { return ScoreWorker<scalar_t>(q, t, gated, ex, rows, std::min(nt, M)); };
    if (k <= kSortedK) {
      stream_topk<scalar_t, SortedTopK<scalar_t>, true>(B, M, k, nt, qt, min_qt, make_worker,
                                                         scores.data_ptr<float>(), indices.data_ptr<int64_t>());
    } else {
      stream_topk<scalar_t, BufferedTopK<scalar_t>, true>(B, M, k, nt, qt, min_qt, make_worker,
                                                           scores.data_ptr<float>(), indices.data_ptr<int64_t>());
    }
  });
  return {scores, indices};
}

std::tuple<at::Tensor, at::Tensor> score_topk_dot_cpu(const at::Tensor& query, const at::Tensor& table,
                                                      const std::optional<at::Tensor>& exclude, int64_t k) {
  check_common(query, table, exclude, k);
  return score_topk_cpu(query, table, nullptr, exclude, k);
}

std::tuple<at::Tensor, at::Tensor> score_topk_gated_cpu(
    const at::Tensor& query, const at::Tensor& table, const at::Tensor& user, const at::Tensor& user_sim,
    const at::Tensor& item, const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& bias,
    const at::Tensor& out_query, const std::optional<at::Tensor>& exclude, int64_t k) {
  check_common(query, table, exclude, k);
  const int64_t B = query.size(0), M = table.size(0), c = user.dim() == 2 ? user.size(1) : 0;
  TORCH_CHECK(c >= 1, "score_topk (cpu): user must be [B, c] with c >= 1, got ", user.sizes());
  check_rows("user", user, query, B, c);
  check_rows("user_sim", user_sim, query, B, c);
  check_rows("item", item, query, M, c);
  check_rows("item_sim", item_sim, query, M, c);
  const int64_t e = values.dim() == 3 ? values.size(2) : 0;
  TORCH_CHECK(values.dim() == 3 && values.size(0) == M && values.size(1) == 3 && e >= 1,
              "score_topk (cpu): values must be [M, 3, e] with M = ", M, " and e >= 1, got ", values.sizes());
  check_like("values", values, query);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == e, "score_topk (cpu): bias must be [", e, "], got ", bias.sizes());
  check_like("bias", bias, query);
  check_rows("out_query", out_query, query, B, e);
  const GatedInputs gated{user.detach(), user_sim.detach(), item.detach(), item_sim.detach(),
                          values.detach(), bias.detach(), out_query.detach()};
  return score_topk_cpu(query, table, &gated, exclude, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(grasp, CPU, m) {
  m.impl("score_topk_dot", &score_topk_dot_cpu);
  m.impl("score_topk_gated", &score_topk_gated_cpu);
}

}  // namespace grasp
