// Device code of the top-k neighbour operator (docs/design.md section 4; schemas in csrc/topk_neighbor_mean.cpp):
// the selection and gather kernels, with no ATen headers, compiled by nvcc into grasp._C (the host code is in
// topk_neighbor_mean_kernel.cu) and by NVRTC at first use (grasp/ops/_topk_neighbor_mean_cuda_jit.py). The design
// below covers both hosts, which tile and launch alike.
//
//
// topk_neighbor_mean_search(queries [q, D], db [n, D], k, query_start, exclude_self)
//   -> scores float32 [q, k] (descending), indices int64 [q, k]; equal scores are
//      ordered by the smaller index, also when deciding which of them make the top k.
//
//   Tiled products. The database is streamed in tiles of NT rows and the queries
//   in tiles of QT rows; each (query tile, database tile) pair becomes one float32
//   score block [QT, NT] (at most kTileElems floats), so the q x n matrix never
//   exists. The block is a cuBLAS GEMM through ATen:
//     float32        at::mm under at::NoTF32Guard: cuBLAS then runs true fp32
//                    (TF32 off even if the user enabled it). When torch would route
//                    fp32 GEMMs elsewhere (cuBLASLt preferred, TunableOp on), paths
//                    that may ignore the guard, the tiles are multiplied in float64
//                    and rounded to float32 instead: never TF32.
//     float16/bf16   at::mm(a, b, out_dtype=float32) (torch >= 2.8): tensor cores
//                    with float32 accumulation and float32 output, so candidate
//                    ranking is not spoiled by 16-bit rounding of the scores.
//                    (float16 only: torch's opt-in allow_fp16_accumulation would
//                    make cuBLAS accumulate in float16; the wrapper uses bfloat16.)
//     float64        rows are rounded to float32 first (as the reference does) and
//                    take the float32 path.
//   Autocast is excluded inside the op, so these GEMMs keep their dtypes under an
//   enclosing torch.autocast.
//
//   Per-query k-selection. The running top k of every query lives in the output
//   tensors themselves (sorted best first; empty slots hold the sentinel
//   (-inf, INT64_MAX), which every real candidate beats). After each score block,
//   knn_select_kernel merges block rows into them, one warp per query row:
//     * the warp copies the running list into a shared-memory buffer of
//       C = 2 * KPAD slots (KPAD = k rounded up to 32, 64, 128 or 256) and takes
//       the threshold (the current k-th best) from slot k - 1;
//     * lanes read the row 32 * kUnroll scores at a time (coalesced); a score
//       enters the buffer only if it beats the threshold in the order
//       (score desc, index asc) and is not the query's own row; slots are handed
//       out with a ballot + popc prefix, so the buffer stays dense;
//     * when the next batch of up to 32 entrants would overflow the buffer, the
//       warp compacts it: a bitonic sort of all C slots (best first), keeping the
//       first k and raising the threshold to slot k - 1. After a compaction at
//       least C - k >= KPAD >= 32 slots are free, so one batch always fits;
//     * at the end of the row the buffer is sorted once more (if anything entered)
//       and its first k slots are written back.
//   The comparison uses the (score, index) pair, so ties are broken by the smaller
//   index exactly, independently of tile boundaries and of the order entrants
//   arrive in. k > kMaxWarpK (large k, tiny n) takes a slower exact path on ATen
//   ops: the running list and the block row are concatenated and stably sorted by
//   score (running entries hold smaller indices than the block's and are already
//   in (score desc, index asc) order, so a stable descending sort gives that order).
//
// topk_neighbor_mean_gather(x [n, D], indices [q, k]) -> [q, D] in x's dtype: every output
//   row is cut into VEC-wide column chunks (16-byte loads when D and the pointers
//   allow), one thread per chunk sums the k rows x[indices[r, j]] in j order, in
//   at::opmath_type (float, double for double), and divides by k. A block holds
//   as many whole rows as fit its 256 threads (5 rows of 48 chunks at D = 384 in
//   bf16: 240 threads busy), so small D keeps the threads busy too; rows of more
//   than 256 chunks are split over blockIdx.y in equal parts. Indices are
//   range-checked on the host (a TORCH_CHECK, not a device assert that would
#pragma once

#include "device_math.cuh"

namespace grasp {
namespace topk_neighbor_mean_device {

// Selection: warps per block, scores per lane per step; the sentinel index of an empty slot.
constexpr int kSelectWarps = 4;
constexpr int kSelectThreads = kSelectWarps * 32;
constexpr int kUnroll = 8;
constexpr int64_t kEmptyIndex = dev::kInt64Max;

// topk_neighbor_mean_gather: threads per block.
constexpr int kMeanThreads = 256;

// ---------------------------------------------------------------------------
// Selection kernel.

// (sa, ia) ranks before (sb, ib): higher score, or equal score and smaller index.
__device__ __forceinline__ bool better(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// Sorts the C (a power of two) buffer slots of one warp best first: a bitonic
// network, each lane doing C / 64 compare-exchanges per stage. Every lane of the
// warp must call it; it starts and ends with a __syncwarp.
template <int C>
__device__ __forceinline__ void warp_sort(float* s, int64_t* idx, int lane) {
  __syncwarp();
#pragma unroll 1
  for (int size = 2; size <= C; size <<= 1) {
#pragma unroll 1
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
#pragma unroll
      for (int p = 0; p < C / 64; ++p) {  // C / 2 pairs, 32 per pass
        const int t = p * 32 + lane;
        const int lo = 2 * t - (t & (stride - 1));  // pair t: lo has bit `stride` clear
        const int hi = lo + stride;
        const float s_lo = s[lo], s_hi = s[hi];
        const int64_t i_lo = idx[lo], i_hi = idx[hi];
        // Runs with (lo & size) == 0 are sorted best first, the others worst first;
        // the last merge (size == C) leaves the whole buffer best first.
        const bool swap = (lo & size) == 0 ? better(s_hi, i_hi, s_lo, i_lo)
                                           : better(s_lo, i_lo, s_hi, i_hi);
        if (swap) {
          s[lo] = s_hi;
          s[hi] = s_lo;
          idx[lo] = i_hi;
          idx[hi] = i_lo;
        }
      }
      __syncwarp();
    }
  }
}

// Fills the unused slots [count, C) with the sentinel and sorts the buffer; the
// first k slots are then the top k of everything the buffer held.
template <int C>
__device__ __forceinline__ void compact(float* s, int64_t* idx, int count, int lane) {
  for (int t = count + lane; t < C; t += 32) {
    s[t] = -INFINITY;
    idx[t] = kEmptyIndex;
  }
  warp_sort<C>(s, idx, lane);
}

// Merges the score block [rows, cols] (row r = query row r of this tile, column c =
// database row col0 + c) into the running lists best_s / best_i [rows, k] (sorted
// best first). One warp per query row; see the file comment.
template <int KPAD>
__global__ void __launch_bounds__(kSelectThreads)
    knn_select_kernel(const float* __restrict__ block, int rows, int cols, int64_t col0,
                      float* __restrict__ best_s, int64_t* __restrict__ best_i, int k,
                      int64_t self0, bool exclude_self) {
  constexpr int C = 2 * KPAD;
  __shared__ float buf_s[kSelectWarps][C];
  __shared__ int64_t buf_i[kSelectWarps][C];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * kSelectWarps + warp;
  if (r >= rows) return;  // the whole warp leaves; no block-wide barrier below
  float* bs = buf_s[warp];
  int64_t* bi = buf_i[warp];
  float* out_s = best_s + static_cast<int64_t>(r) * k;
  int64_t* out_i = best_i + static_cast<int64_t>(r) * k;

  for (int t = lane; t < C; t += 32) {
    if (t < k) {
      bs[t] = out_s[t];
      bi[t] = out_i[t];
    } else {
      bs[t] = -INFINITY;
      bi[t] = kEmptyIndex;
    }
  }
  __syncwarp();
  float th_s = bs[k - 1];  // threshold: the current k-th best (maybe the sentinel)
  int64_t th_i = bi[k - 1];
  int count = k;           // filled slots; the same value in every lane

  const float* row = block + static_cast<int64_t>(r) * cols;
  const int64_t self = exclude_self ? self0 + r : int64_t{-1};
  const unsigned below = (1u << lane) - 1u;  // lanes ranked before this one

  for (int base = 0; base < cols; base += 32 * kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32 + lane;
      v[u] = c < cols ? row[c] : -INFINITY;
    }
    bool any = false;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32 + lane;
      const int64_t j = col0 + c;
      any |= c < cols && j != self && better(v[u], j, th_s, th_i);
    }
    if (!__any_sync(kFullMask, any)) continue;  // the common case once the list is good

#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = base + u * 32 + lane;
      const int64_t j = col0 + c;
      const bool take = c < cols && j != self && better(v[u], j, th_s, th_i);
      const unsigned mask = __ballot_sync(kFullMask, take);
      if (mask == 0u) continue;
      const int n_take = __popc(mask);
      if (count + n_take > C) {
        // Entrants tested against the old threshold stay valid candidates; the
        // compaction leaves C - k >= 32 free slots, enough for this batch.
        compact<C>(bs, bi, count, lane);
        count = k;
        th_s = bs[k - 1];
        th_i = bi[k - 1];
      }
      if (take) {
        const int pos = count + __popc(mask & below);
        bs[pos] = v[u];
        bi[pos] = j;
      }
      count += n_take;
    }
  }

  if (count > k) compact<C>(bs, bi, count, lane);  // else slots [0, k) are unchanged
  for (int t = lane; t < k; t += 32) {
    out_s[t] = bs[t];
    out_i[t] = bi[t];
  }
}

// ---------------------------------------------------------------------------
// topk_neighbor_mean_gather. Rows are read and written VEC elements at a time
// through Pack (device_math.cuh).

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void add_row(const T* p, acc_t (&acc)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(pk.v[e]);
}

// Thread t of block (bx, y) works on row bx * rows_per_block + t / row_threads and
// on its column chunks y * row_threads + t % row_threads, stepping by
// gridDim.y * row_threads. Rows are added in j order.
template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kMeanThreads)
    gather_mean_kernel(const T* __restrict__ x, const int64_t* __restrict__ indices,
                       T* __restrict__ out, int64_t q, int64_t D, int64_t k, int row_threads,
                       int rows_per_block) {
  const int row_in_block = static_cast<int>(threadIdx.x) / row_threads;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_block + row_in_block;
  if (r >= q) return;
  const int64_t chunks = D / VEC;
  const int64_t* idx = indices + r * k;
  const int lane = static_cast<int>(threadIdx.x) - row_in_block * row_threads;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * row_threads + lane; c < chunks;
       c += static_cast<int64_t>(gridDim.y) * row_threads) {
    const int64_t col = c * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = acc_t(0);
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {  // four independent row loads in flight
      const int64_t s0 = idx[j], s1 = idx[j + 1], s2 = idx[j + 2], s3 = idx[j + 3];
      add_row<VEC>(x + s0 * D + col, acc);
      add_row<VEC>(x + s1 * D + col, acc);
      add_row<VEC>(x + s2 * D + col, acc);
      add_row<VEC>(x + s3 * D + col, acc);
    }
    for (; j < k; ++j) add_row<VEC>(x + idx[j] * D + col, acc);
    Pack<T, VEC> pk;
#pragma unroll
    for (int e = 0; e < VEC; ++e) pk.v[e] = static_cast<T>(acc[e] / static_cast<acc_t>(k));
    *reinterpret_cast<Pack<T, VEC>*>(out + r * D + col) = pk;
  }
}

}  // namespace topk_neighbor_mean_device
}  // namespace grasp
