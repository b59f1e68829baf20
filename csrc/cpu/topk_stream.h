// Streaming exact top-k over a (q x n) score matrix that is never stored, shared by the CPU kernels of
// topk_neighbor_mean (search) and score_topk.
//
// The rows (queries, users) are cut into tiles of up to qt_max rows, and each tile streams the columns
// (database rows, items) in tiles of `tile_n`; a kernel-specific Worker computes one [rows, columns]
// score tile into its own buffer, which the same thread then scans while it is still in cache: every
// row keeps a running top-k, and a block of kBlock scores is rejected at once when none beats the row's
// current k-th best (one vectorised compare-and-or). The workers pull (row tile, column part) tasks
// from a shared counter and run their ATen calls single-threaded (inside at::parallel_for), so the
// threads never wait for each other. When there are too few rows to keep every thread busy, the
// columns are split into parts as well and the per-part top-k lists are merged at the end. No
// temporary depends on n.
//
// Candidates reach a row's state in increasing column order, so an equal score never displaces a kept
// one: "ties -> smaller index" falls out of a strict compare against the k-th best. k <= kSortedK keeps
// a sorted array with insertion; larger k appends to a buffer of 2k entries that is cut back to the
// best k (nth_element) whenever it fills up. Slots that no candidate filled come out as (-inf, -1).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace grasp {
// Internal linkage: every kernel file gets its own copy.
namespace {

constexpr int64_t kSortedK = 32;           // sorted insertion up to here, buffered selection above
constexpr int64_t kStateBytes = 32 << 20;  // bound of one thread's top-k states (large k)
constexpr int64_t kBlock = 16;             // scores rejected together

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

// Top-k of one row for small k: c[0..count) sorted by (score desc, index asc).
// push(v, j) requires that j exceeds every index pushed before and that
// !full() || v > thr(); a candidate equal to the k-th best then ranks behind it.
template <typename acc_t>
struct SortedTopK {
  Cand<acc_t>* c;
  int64_t k;
  int64_t count;

  static int64_t capacity(int64_t k) { return k; }
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

// Top-k of one row for large k: an unsorted buffer of cap >= k + 1 entries,
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

// Whether a score may enter a row's state while the state is not full. kSkipDead: only scores above
// -inf (score_topk marks excluded columns -inf, and leaves out NaN and overflowed scores with them).
template <bool kSkipDead, typename acc_t>
inline bool admissible(acc_t v) {
  return !kSkipDead || v > -std::numeric_limits<acc_t>::infinity();
}

// Feeds the scores row[0..nt) of columns j0.. to one row's state; column `skip` (or -1) is left out.
template <bool kSkipDead, typename acc_t, typename Sel>
inline void scan_row(Sel& sel, const acc_t* row, int64_t nt, int64_t j0, int64_t skip) {
  int64_t c = 0;
  for (; c < nt && !sel.full(); ++c) {
    if (c != skip && admissible<kSkipDead>(row[c])) sel.push(row[c], j0 + c);
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

// How the (q x n) scores are cut into tasks.
struct Plan {
  int64_t qt;        // rows per tile
  int64_t n_qt;      // row tiles
  int64_t parts;     // column parts (1: no split)
  int64_t part_len;  // columns per part (a multiple of the column tile)
  int64_t tasks() const { return n_qt * parts; }
};

// Row tiles of at most qt_max rows, as many as a multiple of the threads; when that leaves fewer than
// min_qt rows per tile and there is more than one column tile, one row tile and the columns split.
inline Plan make_plan(int64_t q, int64_t n, int64_t qt_max, int64_t threads, int64_t tile_n, int64_t min_qt) {
  const int64_t col_tiles = (n + tile_n - 1) / tile_n;
  Plan p{std::max<int64_t>(1, std::min(q, qt_max)), 0, 1, col_tiles * tile_n};
  if (threads > 1 && q > 0) {
    int64_t n_qt = (q + qt_max - 1) / qt_max;
    n_qt = (n_qt + threads - 1) / threads * threads;
    p.qt = (q + n_qt - 1) / n_qt;
    if (p.qt < std::min(min_qt, qt_max) && col_tiles > 1) {
      p.qt = std::min(q, qt_max);
      const int64_t n_qt1 = (q + p.qt - 1) / p.qt;
      p.parts = std::min(col_tiles, (threads + n_qt1 - 1) / n_qt1);
      p.part_len = (col_tiles + p.parts - 1) / p.parts * tile_n;
      p.parts = (n + p.part_len - 1) / p.part_len;
    }
  }
  p.n_qt = (q + p.qt - 1) / p.qt;
  return p;
}

// The k best of every row of the (q x n) scores into scores_p [q, k] (float32) and indices_p [q, k].
//
// make_worker(qt) returns a per-thread Worker for row tiles of up to qt rows, with
//   void rows(int64_t r0, int64_t rq);                   the following tiles are of rows r0..r0+rq
//   const acc_t* tile(int64_t j0, int64_t nt);           row-major [rq, nt] scores of columns j0..j0+nt
//   int64_t skip(int64_t r, int64_t j0, int64_t nt);      a tile column row r never selects, or -1
// Tiles of one task come in increasing j0. qt_hint bounds the row tile (the states bound it too).
template <typename acc_t, typename Sel, bool kSkipDead, typename MakeWorker>
void stream_topk(int64_t q, int64_t n, int64_t k, int64_t tile_n, int64_t qt_hint, int64_t min_qt,
                 const MakeWorker& make_worker, float* scores_p, int64_t* indices_p) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t slots = Sel::capacity(k);
  const int64_t qt_max =
      std::max<int64_t>(1, std::min<int64_t>(qt_hint, kStateBytes / (slots * int64_t(sizeof(Cand<acc_t>)))));
  const Plan plan = make_plan(q, n, qt_max, threads, tile_n, min_qt);
  // Per-part results when the columns are split: [parts, q, k].
  std::vector<Cand<acc_t>> partial(plan.parts > 1 ? plan.parts * q * k : 0);
  std::atomic<int64_t> next{0};

  at::parallel_for(0, std::min(threads, plan.tasks()), 1, [&](int64_t, int64_t) {
    auto worker = make_worker(plan.qt);
    std::vector<Cand<acc_t>> storage(plan.qt * slots);
    std::vector<Sel> sel(plan.qt);
    for (int64_t t = next.fetch_add(1); t < plan.tasks(); t = next.fetch_add(1)) {
      const int64_t r0 = (t / plan.parts) * plan.qt, rq = std::min(plan.qt, q - r0);
      const int64_t part = t % plan.parts;
      const int64_t j_begin = part * plan.part_len, j_end = std::min(n, j_begin + plan.part_len);
      worker.rows(r0, rq);
      for (int64_t r = 0; r < rq; ++r) sel[r].init(storage.data() + r * slots, k);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += tile_n) {
        const int64_t nt = std::min(tile_n, j_end - j0);
        const acc_t* s = worker.tile(j0, nt);
        for (int64_t r = 0; r < rq; ++r) scan_row<kSkipDead>(sel[r], s + r * nt, nt, j0, worker.skip(r, j0, nt));
      }
      for (int64_t r = 0; r < rq; ++r) {
        const int64_t m = sel[r].finish();
        const Cand<acc_t>* c = sel[r].c;
        if (plan.parts > 1) {
          Cand<acc_t>* out = partial.data() + (part * q + r0 + r) * k;
          std::copy(c, c + m, out);
          std::fill(out + m, out + k, Cand<acc_t>{kNegInf, -1});
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

}  // namespace
}  // namespace grasp
