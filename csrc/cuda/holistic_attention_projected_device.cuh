// Device code of the projected holistic-attention operator (schemas in ../holistic_attention_projected.cpp): the
// kernels, with no ATen headers, compiled by nvcc into grasp._C (the host code is in
// holistic_attention_projected_kernel.cu) and by NVRTC at first use (grasp/ops/_holistic_attention_projected_cuda_jit.py).
//
// For every pair n, with r = user_index[n], j = item_index[n]: s1 = <user[r], item[j]>,
// s2 = <user_sim[r], item_sim[j]>, a = sigmoid(s1/sqrt(d), s2/sqrt(d), (s1 + s2)/sqrt(2d)) and
//   out[n] = a_self values[j, 0] + a_sim values[j, 1] + a_glob values[j, 2].
//
// One warp per pair; the warps of the grid stride over the N pairs (the loop bound is the same for every
// lane of a warp, so all of them take part in every shuffle). Lanes cover d and e with a stride of 32 and
// the dot products are summed with __shfl_xor_sync butterflies (every lane ends with the same bits: each
// step adds the same two values). Accumulation is in acc_t (float; double for double).
//
// The backward is deterministic and has no atomics (the segmented reduction of the CPU and Triton kernels):
// (1) a warp per pair recomputes the gates and writes them with the logits' gradients ds1, ds2 to a small
// [N, 5] buffer; (2) the host sorts the pairs by item and by user (stable) with each row's offsets
// (searchsorted); (3) the sorted pairs are cut into chunks of equal length, a warp per chunk and 32
// columns sums each row's pairs in sorted order, so a row that holds most of the pairs is spread over many
// warps; rows that cross a chunk boundary leave partial sums, which (4) a combine kernel adds in a fixed order.
// Indices are validated by the Python wrapper; the kernels assert them too.
#pragma once

#include "device_math.cuh"

namespace grasp {
namespace holistic_attention_projected_device {

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
__device__ __forceinline__ Pair<acc_t> pair_gates(const Inputs<T>& in, int64_t n, int lane, acc_t c1, acc_t c2) {
  Pair<acc_t> p;
  p.r = in.user_index[n];
  p.j = in.item_index[n];
  GRASP_DEVICE_CHECK(p.r >= 0 && p.r < in.U && p.j >= 0 && p.j < in.M);
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
    const Pair<acc_t> p = pair_gates<T, acc_t>(in, n, lane, c1, c2);
    const T* v = in.values + p.j * 3 * in.e;
    for (int64_t k = lane; k < in.e; k += 32) {
      out[n * in.e + k] = static_cast<T>(p.a[0] * static_cast<acc_t>(v[k]) +
                                         p.a[1] * static_cast<acc_t>(v[in.e + k]) +
                                         p.a[2] * static_cast<acc_t>(v[2 * in.e + k]));
    }
  }
}

// ---- backward: per-pair scalars, then segmented sums by item and by user (no atomics) ----

// Row n of the [N, kPairStride] buffer `pair`: a_self, a_sim, a_glob, ds1 = dL/ds1, ds2 = dL/ds2.
constexpr int kPairStride = 5;
constexpr int kGates = 0, kLogits = 3;

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gather_pairs_kernel(const T* __restrict__ grad_out, Inputs<T> in, acc_t* __restrict__ pair, acc_t c1, acc_t c2) {
  const int lane = threadIdx.x & 31;
  const int64_t e = in.e;
  for (int64_t n = first_warp(); n < in.N; n += warp_stride()) {
    const Pair<acc_t> p = pair_gates<T, acc_t>(in, n, lane, c1, c2);
    const T* g = grad_out + n * e;
    const T* v = in.values + p.j * 3 * e;
    acc_t dg[3] = {0, 0, 0};
    for (int64_t k = lane; k < e; k += 32) {
      const acc_t gk = static_cast<acc_t>(g[k]);
      dg[0] += gk * static_cast<acc_t>(v[k]);
      dg[1] += gk * static_cast<acc_t>(v[e + k]);
      dg[2] += gk * static_cast<acc_t>(v[2 * e + k]);
    }
    acc_t dz[3];
#pragma unroll
    for (int x = 0; x < 3; ++x) dz[x] = warp_sum(dg[x]) * p.a[x] * (acc_t(1) - p.a[x]);
    if (lane == 0) {
      acc_t* row = pair + n * kPairStride;
      row[0] = p.a[0];
      row[1] = p.a[1];
      row[2] = p.a[2];
      row[kLogits] = dz[0] * c1 + dz[2] * c2;
      row[kLogits + 1] = dz[1] * c1 + dz[2] * c2;
    }
  }
}

// The pairs grouped by a table's rows (items or users): `order` lists the pair ids row by row (stable),
// `keys[q]` is the row of position q and `starts[s]..starts[s + 1]` the positions of row s.
struct Groups {
  const int64_t* keys;
  const int64_t* order;
  const int64_t* starts;
};

// K segmented sums over the pairs of each row s of a table: out_k[s] = sum_n pair[n, coef + k] table_k[row(n)],
// W-wide, with row(n) = gather[n] (nullptr: n itself). out_k[s] is at out[k] + s * out_row_stride.
template <typename T, typename acc_t, int K>
struct SegmentSum {
  Groups groups;
  const int64_t* gather;
  const acc_t* pair;
  int coef;
  const T* table[K];
  T* out[K];
  int64_t out_row_stride;
  acc_t* partial;  // [chunks, 2 slots, K, W]: the sums of segments that cross a chunk boundary
  int64_t N, W, chunk;
};

// Pairs loaded ahead of the sequential additions of a segment sum (the sum's order stays n by n).
constexpr int kAhead = 8;

// One warp per (chunk of `chunk` sorted positions, 32 columns): lane l sums column blockIdx.y * 32 + l of each
// segment of the chunk, pair by pair in sorted order, so every sum has one order whatever the launch. A segment
// that lies wholly in the chunk is written to its output row; one that crosses a chunk boundary leaves its
// partial sum in slot 0 (the chunk's first segment) or 1 (its last).
template <typename T, typename acc_t, int K>
__global__ void __launch_bounds__(kThreads) segment_sum_kernel(SegmentSum<T, acc_t, K> a) {
  const int64_t c = first_warp();
  const int64_t col = static_cast<int64_t>(blockIdx.y) * 32 + (threadIdx.x & 31);
  const int64_t lo = c * a.chunk;
  if (lo >= a.N) return;
  const int64_t hi = dev::min(lo + a.chunk, a.N);
  const bool live = col < a.W;
  for (int64_t pos = lo; pos < hi;) {
    const int64_t seg = a.groups.keys[pos], first = a.groups.starts[seg], last = a.groups.starts[seg + 1];
    const int64_t end = dev::min(last, hi);
    acc_t acc[K];
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = 0;
    for (int64_t q0 = pos; q0 < end; q0 += kAhead) {
      acc_t term[kAhead][K];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
        const int64_t q = q0 + u;
        const bool ok = q < end;
        const int64_t n = ok ? a.groups.order[q] : 0;
        const int64_t row = a.gather ? (ok ? a.gather[n] : 0) : n;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          term[u][k] = ok && live ? a.pair[n * kPairStride + a.coef + k] *
                                        static_cast<acc_t>(a.table[k][row * a.W + col])
                                  : acc_t(0);
        }
      }
#pragma unroll
      for (int u = 0; u < kAhead; ++u) {
#pragma unroll
        for (int k = 0; k < K; ++k) acc[k] += term[u][k];
      }
    }
    if (live) {
      if (first >= lo && last <= hi) {
#pragma unroll
        for (int k = 0; k < K; ++k) a.out[k][seg * a.out_row_stride + col] = static_cast<T>(acc[k]);
      } else {
        const int64_t slot = c * 2 + (pos > lo ? 1 : 0);
#pragma unroll
        for (int k = 0; k < K; ++k) a.partial[(slot * K + k) * a.W + col] = acc[k];
      }
    }
    pos = end;
  }
}

// One block per (chunk, 32 columns): the segment that starts in the chunk and runs past its end (if any) gets
// the sum of its partial sums over the chunks it spans. Warp w sums the chunks c + w, c + w + 8, ... in turn,
// then warp 0 adds the warps' sums in warp order: a fixed order, and a row that holds most of the pairs (as many
// partial sums as chunks) is combined by eight warps.
template <typename T, typename acc_t, int K>
__global__ void __launch_bounds__(kThreads) segment_combine_kernel(SegmentSum<T, acc_t, K> a) {
  const int64_t c = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * 32 + lane;
  const int64_t lo = c * a.chunk, hi = dev::min(lo + a.chunk, a.N);
  const int64_t seg = a.groups.keys[hi - 1], first = a.groups.starts[seg], last = a.groups.starts[seg + 1];
  if (first < lo || last <= hi) return;  // the same for the whole block
  const int64_t final_chunk = (last - 1) / a.chunk;
  acc_t acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0;
  if (col < a.W) {
#pragma unroll 4
    for (int64_t p = c + warp; p <= final_chunk; p += kWarpsPerBlock) {
      const int64_t slot = p * 2 + (p == c && first > lo ? 1 : 0);  // its slot in chunk c; slot 0 in the later ones
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] += a.partial[(slot * K + k) * a.W + col];
    }
  }
  __shared__ acc_t sums[kWarpsPerBlock][K][32];
#pragma unroll
  for (int k = 0; k < K; ++k) sums[warp][k][lane] = acc[k];
  __syncthreads();
  if (warp == 0 && col < a.W) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t total = sums[0][k][lane];
#pragma unroll
      for (int w = 1; w < kWarpsPerBlock; ++w) total += sums[w][k][lane];
      a.out[k][seg * a.out_row_stride + col] = static_cast<T>(total);
    }
  }
}

}  // namespace holistic_attention_projected_device
}  // namespace grasp
