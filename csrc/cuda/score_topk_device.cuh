// Device code of the score_topk operator (schemas in ../score_topk.cpp): the kernels, with no ATen headers,
// compiled by nvcc into grasp._C (the host code is in score_topk_kernel.cu) and by NVRTC at first use
// (grasp/ops/_score_topk_cuda_jit.py); the design below covers both hosts, which launch alike.
//
// score_topk_dot(query [B, d], table [M, d], exclude [B, X]?, k)
// score_topk_gated(query, table, user [B, c], user_sim [B, c], item [M, c], item_sim [M, c],
//                  values [M, 3, e], bias [e], out_query [B, e], exclude?, k)
//   -> scores float32 [B, k] (descending), indices int64 [B, k]
//
//   s[b, j] = <query[b], table[j]>, in the gated form plus <out_query[b], gelu(h[b, j])> with
//   h[b, j] = sig(s1/sqrt(c)) values[j,0] + sig(s2/sqrt(c)) values[j,1] + sig((s1+s2)/sqrt(2c)) values[j,2]
//             + bias,
//   s1 = <user[b], item[j]>, s2 = <user_sim[b], item_sim[j]>, gelu the exact erf form. Equal scores are
//   ordered by the smaller index, also when deciding which of them make the top k. Rows listed in
//   exclude[b] (-1 entries, and any other value outside [0, M), match no row) and rows whose score is not
//   above -inf (NaN, -inf) are never returned; when fewer than k rows remain, the tail is (-inf, -1).
//   Accumulation is in float32 for every input dtype (float32, float16, bfloat16); the [B, M] score matrix
//   never exists.
//
// Fused search (k <= kMaxFusedK): score_topk_kernel, grid (ceil(B / kUsers), splits), 256 threads.
//   Block (x, y) owns the kUsers = 32 users from 32 x and the item range of split y (whole tiles of
//   kItems = 64 items; the items are split when the user blocks alone are too few to fill the GPU, see
//   choose_splits). It streams its range tile by tile; per tile:
//   * tile products. The [32 users, 64 items] blocks of query.table^T (and, gated, user.item^T and
//     user_sim.item_sim^T) are computed through shared memory: both operands are staged in chunks of
//     kStageBytes per row along the reduction dimension (16-byte loads when rows and pointers allow), then
//     each warp computes a 16 x 16 sub-block. float16 / bfloat16 use tensor cores (mma.sync m16n8k16,
//     float32 accumulators; sm_80+). float32 uses float4 shared-memory loads and float32 FMAs: tensor cores
//     would mean TF32, whose 10-bit mantissa perturbs scores enough to reorder close candidates. Every
//     thread ends with the same 2 users x 4 items of every product (the mma accumulator layout), so the
//     gated maths needs no exchange between threads.
//   * gated term. Each thread turns its 8 pairs' s1, s2 into the three gates, then walks e in chunks of
//     kEc: the tile's values rows, the block's out_query rows and bias are staged in shared memory as
//     float; per element it forms h for its 8 pairs (12 value loads, 2 out_query loads, 1 bias load),
//     applies the exact GELU and accumulates <out_query, gelu(h)> onto the dot score. This per-pair loop is
//     the gated form's main cost (it has no GEMM shape: the GELU sits between the two products).
//   * selection. The scores go to a [32, 64] shared tile (aliasing the staging area, free by then) and each
//     warp merges 4 users' rows into their running lists the way topk_neighbor_mean's select kernel does
//     (a threshold at the current k-th best in (score desc, index asc) order; entrants appended densely by
//     ballot + popc), with one change that saves shared memory for 32 users per block: instead of a
//     2 x KPAD buffer re-sorted when full, a user has a sorted list of KPAD slots (KPAD = k rounded up to
//     32, 64, 128 or 256) and a 32-slot queue. A full queue is flushed into the list in registers: the warp
//     sorts the queue (one entry per lane, a shuffle bitonic sort, worst first), lane l keeps the better of
//     list slot KPAD - 32 + l and queue entry l (the top KPAD of both, as a bitonic sequence), and a bitonic
//     merge (register compare-exchanges for strides >= 32, shuffles below) sorts the list again; the
//     threshold becomes slot k - 1. Entrants tested against an older threshold stay valid candidates. A
//     candidate that passes the threshold is looked up in the user's exclude row (sorted once on the host;
//     binary search), so excluded rows never enter and cost nothing unless they would rank. Lists of
//     KPAD <= 64 live in shared memory (32 users x KPAD slots); longer ones in the block's rows of the
//     partial-result buffer in global memory (L2), touched only by flushes.
//   Each block leaves its users' lists, sorted, in part [B, splits, KPAD]; score_topk_merge_kernel (one warp
//   per user) streams the splits' first k entries through the same queue and list, leaving a split as soon
//   as one of its entries fails the threshold (the rest is worse), and writes the outputs (empty slots:
//   -inf, -1). With one split this amounts to a copy.
// Large k (> kMaxFusedK): the same kernel without selection writes float32 score blocks of about
//   kFallbackElems values ([rows, cols + 1], a spare column taking the scattered exclusions of other
//   blocks), and ATen ops merge them into the running lists as topk_neighbor_mean's large-k path does (a
//   stable sort of the running list followed by the block's columns, whose indices are all larger).
//
// Users sit at rows 32 x and items at columns 64 t of the tiles whatever the split count, so every score is
// computed by the same instructions, and the lists compare (score, index) pairs exactly: results do not
// depend on the launch shape. Indices are int32 in the kernels (M < 2^31 - 65 is checked; INT32_MAX marks an
// empty slot). Inputs are checked on the host (TORCH_CHECK naming the argument); the Python wrapper checks
// their values (finite inputs, exclude in range).
#pragma once

#include "device_math.cuh"

namespace grasp {
namespace score_topk_device {

// Fused kernel geometry: threads, users and items per block tile, users each warp selects for.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUsers = 32;
constexpr int kItems = 64;
constexpr int kUsersPerWarp = kUsers / kWarps;
static_assert(kUsers == 32 && kItems == 64 && kWarps == 8,
              "the warp tiling below assumes 8 warps on a 32 x 64 tile");

// Staging: bytes of one operand row per reduction chunk, and its padding (16 bytes, which makes the fragment
// and float4 loads below free of bank conflicts); elements of e per gated chunk, and that row's padding.
constexpr int kStageBytes = 128;
constexpr int kEc = 8;
constexpr int kEcStride = kEc + 4;
// Score tile row stride in floats (8 floats of padding: conflict-free float2 stores from the fragments).
constexpr int kScoreStride = kItems + 8;

// Selection: queue slots per user, longest list kept in shared memory, largest k of the fused path.
constexpr int kQueue = 32;
constexpr int kMaxSharedList = 64;
constexpr int64_t kMaxFusedK = 256;
constexpr int kNoIndex = dev::kInt32Max;

// Merge kernel: warps (users) per block.
constexpr int kMergeWarps = 4;

// Host-side choices: blocks per SM to aim for, fewest item tiles per split, large-k block size.
constexpr int64_t kBlocksPerSm = 4;
constexpr int64_t kMinSplitTiles = 4;
constexpr int64_t kFallbackElems = int64_t{1} << 22;

template <typename T>
struct Stage {
  static constexpr int kChunk = kStageBytes / static_cast<int>(sizeof(T));  // reduction elements per chunk
  static constexpr int kRow = kChunk + 16 / static_cast<int>(sizeof(T));   // padded row, in elements
  static constexpr int kGemmBytes = (kUsers + kItems) * kRow * static_cast<int>(sizeof(T));
  static constexpr int kGatedBytes = (3 * kItems + kUsers) * kEcStride * 4 + kEc * 4;
  static constexpr int kScoreBytes = kUsers * kScoreStride * 4;
  static constexpr int kBytes = dev::max(kGemmBytes, dev::max(kGatedBytes, kScoreBytes));
};

template <typename T>
struct Params {
  const T* query;      // [B, d]
  const T* table;      // [M, d]
  const T* user;       // [B, c]       (gated only)
  const T* user_sim;   // [B, c]
  const T* item;       // [M, c]
  const T* item_sim;   // [M, c]
  const T* values;     // [M, 3, e]
  const T* bias;       // [e]
  const T* out_query;  // [B, e]
  const int64_t* exclude;  // [B, X], each row sorted ascending; nullptr when X == 0
  int d, c, e, X;
  float c1, c2;  // 1 / sqrt(c), 1 / sqrt(2c)
  // 16-byte loads allowed for (query, table), (user, item), (user_sim, item_sim), (values, out_query).
  bool vec_dot, vec_s1, vec_s2, vec_e;
  // Users u_base .. u_base + u_count - 1 and items j_base .. j_base + j_count - 1; split y starts at tile
  // y * tiles_per_split of the item range.
  int u_base, u_count, j_base, j_count, tiles_per_split;
  // Fused path: k, and the lists part_s / part_i [B, splits, KPAD].
  int k, splits;
  float* part_s;
  int* part_i;
  // Score-block path: block [u_count, block_stride], column j - j_base.
  float* block;
  int64_t block_stride;
};

// ---------------------------------------------------------------------------
// Tile products.

// The thread's place in the 32 x 64 tile: warp w owns the 16 x 16 sub-block at rows rb = 16 (w & 1),
// columns cb = 16 (w >> 1); g = lane / 4 and t2 = 2 (lane % 4) as in the mma.sync fragment layouts. The
// thread's output acc[4 nt + 2 h + q] sits at row(h) = rb + g + 8 h, column col(nt, q) = cb + 8 nt + t2 + q
// (h, nt, q in {0, 1}).
struct Frag {
  int rb, cb, g, t2;
  __device__ __forceinline__ int row(int h) const { return rb + g + 8 * h; }
  __device__ __forceinline__ int col(int nt, int q) const { return cb + 8 * nt + t2 + q; }
};

__device__ __forceinline__ Frag frag_of(int warp, int lane) {
  return {16 * (warp & 1), 16 * (warp >> 1), lane >> 2, 2 * (lane & 3)};
}

// Copies rows [0, rows) x columns [col0, col0 + width) of src (row stride src_stride) to dst (row stride
// dst_stride, column 0 = col0) as D; rows >= valid_rows and columns >= valid_cols read as zero. vec: 16-byte
// loads, which needs 16-byte aligned rows and valid_cols, col0, width multiples of 16 / sizeof(T).
template <typename T, typename D>
__device__ __forceinline__ void stage_rows(D* dst, int dst_stride, const T* src, int64_t src_stride, int rows,
                                           int valid_rows, int col0, int width, int valid_cols, bool vec) {
  constexpr int V = 16 / sizeof(T);
  if (vec) {
    const int per_row = width / V;
    for (int t = threadIdx.x; t < rows * per_row; t += kThreads) {
      const int r = t / per_row;
      const int c = (t - r * per_row) * V;
      const bool in = r < valid_rows && col0 + c < valid_cols;
      const T* s = src + r * src_stride + col0 + c;
      D* o = dst + r * dst_stride + c;
      if constexpr (dev::is_same_v<D, T>) {
        *reinterpret_cast<uint4*>(o) = in ? *reinterpret_cast<const uint4*>(s) : make_uint4(0u, 0u, 0u, 0u);
      } else {
        Pack<T, V> pk;
        if (in) pk = *reinterpret_cast<const Pack<T, V>*>(s);
#pragma unroll
        for (int v = 0; v < V; ++v) o[v] = in ? static_cast<float>(pk.v[v]) : 0.0f;
      }
    }
  } else {
    for (int t = threadIdx.x; t < rows * width; t += kThreads) {
      const int r = t / width;
      const int c = t - r * width;
      const bool in = r < valid_rows && col0 + c < valid_cols;
      const float x = in ? static_cast<float>(src[r * src_stride + col0 + c]) : 0.0f;
      dst[r * dst_stride + c] = static_cast<D>(x);
    }
  }
}

// One m16n8k16 tensor-core product with float32 accumulators: c += a (16 x 16, row-major) b (16 x 8).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (dev::is_same_v<T, BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// Whether T's tile products use tensor cores in this compilation (16-bit types on sm_80 and newer).
template <typename T>
__device__ constexpr bool use_mma() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return !dev::is_same_v<T, float>;
#else
  return false;
#endif
}

// acc += the thread's 8 outputs of As [32, kChunk] . Bs [64, kChunk]^T (row stride kRow, in shared memory).
template <typename T>
__device__ __forceinline__ void chunk_product(const T* As, const T* Bs, const Frag& f, float (&acc)[8]) {
  constexpr int KC = Stage<T>::kChunk, KR = Stage<T>::kRow;
  if constexpr (use_mma<T>()) {
    // 32-bit words: two consecutive elements of a row.
    const uint32_t* A = reinterpret_cast<const uint32_t*>(As);
    const uint32_t* Bw = reinterpret_cast<const uint32_t*>(Bs);
    constexpr int W = KR / 2;
    const int tw = f.t2 / 2;
#pragma unroll
    for (int kk = 0; kk < KC / 2; kk += 8) {  // 16 elements per step
      uint32_t a[4];
      a[0] = A[(f.rb + f.g) * W + kk + tw];
      a[1] = A[(f.rb + f.g + 8) * W + kk + tw];
      a[2] = A[(f.rb + f.g) * W + kk + tw + 4];
      a[3] = A[(f.rb + f.g + 8) * W + kk + tw + 4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int n = f.cb + 8 * nt + f.g;
        float c[4] = {acc[4 * nt], acc[4 * nt + 1], acc[4 * nt + 2], acc[4 * nt + 3]};
        mma_16816<T>(c, a, Bw[n * W + kk + tw], Bw[n * W + kk + tw + 4]);
        acc[4 * nt] = c[0];
        acc[4 * nt + 1] = c[1];
        acc[4 * nt + 2] = c[2];
        acc[4 * nt + 3] = c[3];
      }
    }
  } else if constexpr (dev::is_same_v<T, float>) {
#pragma unroll 2
    for (int kk = 0; kk < KC; kk += 4) {
      float4 a[2], b[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) a[h] = *reinterpret_cast<const float4*>(As + f.row(h) * KR + kk);
#pragma unroll
      for (int nq = 0; nq < 4; ++nq) {
        b[nq] = *reinterpret_cast<const float4*>(Bs + f.col(nq >> 1, nq & 1) * KR + kk);
      }
#pragma unroll
      for (int nq = 0; nq < 4; ++nq) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& o = acc[4 * (nq >> 1) + 2 * h + (nq & 1)];
          o = fmaf(a[h].x, b[nq].x, o);
          o = fmaf(a[h].y, b[nq].y, o);
          o = fmaf(a[h].z, b[nq].z, o);
          o = fmaf(a[h].w, b[nq].w, o);
        }
      }
    }
  } else {
    // 16-bit types below sm_80: the same products with scalar FMAs.
#pragma unroll 4
    for (int kk = 0; kk < KC; ++kk) {
#pragma unroll
      for (int nq = 0; nq < 4; ++nq) {
        const float b = static_cast<float>(Bs[f.col(nq >> 1, nq & 1) * KR + kk]);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& o = acc[4 * (nq >> 1) + 2 * h + (nq & 1)];
          o = fmaf(static_cast<float>(As[f.row(h) * KR + kk]), b, o);
        }
      }
    }
  }
}

// acc = the thread's 8 outputs of a [32, K] . b [64, K]^T, a and b pointing at the tile's first rows (row
// stride K); rows at or past a_valid / b_valid read as zero. Ends with a block barrier (after the last
// chunk).
template <typename T>
__device__ __forceinline__ void tile_product(const T* a, int a_valid, const T* b, int b_valid, int K,
                                             bool vec, unsigned char* stage, const Frag& f, float (&acc)[8]) {
  constexpr int KC = Stage<T>::kChunk, KR = Stage<T>::kRow;
  T* As = reinterpret_cast<T*>(stage);
  T* Bs = As + kUsers * KR;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += KC) {
    stage_rows<T, T>(As, KR, a, K, kUsers, a_valid, k0, KC, K, vec);
    stage_rows<T, T>(Bs, KR, b, K, kItems, b_valid, k0, KC, K, vec);
    __syncthreads();
    chunk_product<T>(As, Bs, f, acc);
    __syncthreads();
  }
}

// acc += <out_query[u], gelu(h[u, j])> for the thread's 8 pairs, given their s1, s2. u0 / j0: the tile's
// first user and item. Ends with a block barrier when e > 0.
template <typename T>
__device__ __forceinline__ void add_gated_term(const Params<T>& p, int u0, int u_valid, int j0, int j_valid,
                                               const float (&s1)[8], const float (&s2)[8],
                                               unsigned char* stage, const Frag& f, float (&acc)[8]) {
  float a0[8], a1[8], a2[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    a0[i] = sigmoid(s1[i] * p.c1);
    a1[i] = sigmoid(s2[i] * p.c1);
    a2[i] = sigmoid((s1[i] + s2[i]) * p.c2);
  }
  // Staged as float: Vs [64 items x 3 slots, kEc] (row 3 j + slot), Os [32 users, kEc], Bias [kEc].
  float* Vs = reinterpret_cast<float*>(stage);
  float* Os = Vs + 3 * kItems * kEcStride;
  float* Bias = Os + kUsers * kEcStride;
  const int e = p.e;
  for (int e0 = 0; e0 < e; e0 += kEc) {
    stage_rows<T, float>(Vs, kEcStride, p.values + static_cast<int64_t>(j0) * 3 * e, e, 3 * kItems,
                         3 * j_valid, e0, kEc, e, p.vec_e);
    stage_rows<T, float>(Os, kEcStride, p.out_query + static_cast<int64_t>(u0) * e, e, kUsers, u_valid, e0,
                         kEc, e, p.vec_e);
    if (threadIdx.x < kEc) {
      const int x = e0 + static_cast<int>(threadIdx.x);
      Bias[threadIdx.x] = x < e ? static_cast<float>(p.bias[x]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 2
    for (int x = 0; x < kEc; ++x) {
      const float b = Bias[x];
      const float o[2] = {Os[f.row(0) * kEcStride + x], Os[f.row(1) * kEcStride + x]};
#pragma unroll
      for (int nq = 0; nq < 4; ++nq) {
        const float* v = Vs + 3 * f.col(nq >> 1, nq & 1) * kEcStride + x;
        const float v0 = v[0], v1 = v[kEcStride], v2 = v[2 * kEcStride];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = 4 * (nq >> 1) + 2 * h + (nq & 1);
          const float hv = fmaf(a2[i], v2, fmaf(a1[i], v1, fmaf(a0[i], v0, b)));
          acc[i] = fmaf(o[h], gelu_erf(hv), acc[i]);
        }
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Running top-k lists (one warp per user at a time).

// Sorts one entry per lane across the warp, worst first (lane 0 the worst): a bitonic network of shuffles.
__device__ __forceinline__ void warp_sort_worst_first(float& s, int& i, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const float os = __shfl_xor_sync(kFullMask, s, stride);
      const int oi = __shfl_xor_sync(kFullMask, i, stride);
      // Runs of `size` lanes with (lane & size) == 0 are sorted worst first, the others best first (size 32:
      // the whole warp worst first); in a pair, the lower lane keeps the worse entry in the first kind.
      const bool keep_worse = ((lane & stride) == 0) == ((lane & size) == 0);
      const bool take = keep_worse ? ranks_before(s, i, os, oi) : ranks_before(os, oi, s, i);
      if (take) {
        s = os;
        i = oi;
      }
    }
  }
}

// The bitonic-merge stages of strides 32 RS, 32 RS / 2, ..., 32 over a lane's R list registers (slot
// r * 32 + lane in register r): registers r and r + RS, the lower keeping the better entry. Recursing on the
// stride keeps every register index a compile-time constant, so the list never goes to local memory.
template <int R, int RS>
__device__ __forceinline__ void merge_registers(float (&s)[R], int (&id)[R]) {
  if constexpr (RS > 0) {
#pragma unroll
    for (int q = 0; q < R / 2; ++q) {
      const int r = (q / RS) * 2 * RS + q % RS;  // the q-th register whose RS bit is clear
      if (ranks_before(s[r + RS], id[r + RS], s[r], id[r])) {
        const float ts = s[r];
        const int ti = id[r];
        s[r] = s[r + RS];
        id[r] = id[r + RS];
        s[r + RS] = ts;
        id[r + RS] = ti;
      }
    }
    merge_registers<R, RS / 2>(s, id);
  }
}

// Merges the first `count` queue entries into the list (KPAD slots, best first; slot r * 32 + lane is held by
// that lane in register r during the merge) and sets the threshold to list slot k - 1. list_s / list_i may
// point to shared or global memory. Every lane of the warp calls it with the same count.
template <int KPAD>
__device__ __forceinline__ void flush_queue(float* list_s, int* list_i, const float* q_s, const int* q_i,
                                            int count, int k, int lane, float& th_s, int& th_i) {
  constexpr int R = KPAD / 32;
  __syncwarp();  // the queue entries and the list written by other lanes are visible
  float cs = -INFINITY;
  int ci = kNoIndex;
  if (lane < count) {
    cs = q_s[lane];
    ci = q_i[lane];
  }
  warp_sort_worst_first(cs, ci, lane);
  float s[R];
  int id[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    s[r] = list_s[r * 32 + lane];
    id[r] = list_i[r * 32 + lane];
  }
  // List slot KPAD - 32 + lane (best first) against the lane-th worst entry: the better of each pair makes
  // the top KPAD of list and queue, and the list becomes bitonic (descending, then ascending in the last 32).
  if (ranks_before(cs, ci, s[R - 1], id[R - 1])) {
    s[R - 1] = cs;
    id[R - 1] = ci;
  }
  // Bitonic merge, best first: slot pairs (p, p + stride), the lower slot keeping the better entry.
  merge_registers<R, R / 2>(s, id);
#pragma unroll
  for (int stride = 16; stride > 0; stride >>= 1) {  // strides below 32: the same register of two lanes
    const bool lower = (lane & stride) == 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float os = __shfl_xor_sync(kFullMask, s[r], stride);
      const int oi = __shfl_xor_sync(kFullMask, id[r], stride);
      if (lower ? ranks_before(os, oi, s[r], id[r]) : ranks_before(s[r], id[r], os, oi)) {
        s[r] = os;
        id[r] = oi;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    list_s[r * 32 + lane] = s[r];
    list_i[r * 32 + lane] = id[r];
  }
  // The threshold is read back from memory: picking register (k - 1) / 32 would index the register array at
  // run time, which puts it in local memory.
  __syncwarp();  // the list is written and the queue read before slot k - 1 is read or the queue refilled
  th_s = list_s[k - 1];
  th_i = list_i[k - 1];
}

// Offers one candidate per lane (take: it passed every test) to a user's list: appended to the queue, which
// is flushed first when the batch would overflow it. Every lane calls it with the same count.
template <int KPAD>
__device__ __forceinline__ void offer(bool take, float v, int j, float* list_s, int* list_i, float* q_s,
                                      int* q_i, int& count, int k, int lane, float& th_s, int& th_i) {
  const unsigned mask = __ballot_sync(kFullMask, take);
  if (mask == 0u) return;
  const int n = __popc(mask);
  if (count + n > kQueue) {
    flush_queue<KPAD>(list_s, list_i, q_s, q_i, count, k, lane, th_s, th_i);
    count = 0;
  }
  if (take) {
    const int pos = count + __popc(mask & ((1u << lane) - 1u));
    q_s[pos] = v;
    q_i[pos] = j;
  }
  count += n;
}

// Whether the ascending row holds j (binary search).
__device__ __forceinline__ bool sorted_contains(const int64_t* row, int n, int64_t j) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + ((hi - lo) >> 1);
    if (row[mid] < j) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < n && row[lo] == j;
}

// Shared memory of the selection: per user of the block its queue, threshold and queue fill, and for short
// lists the list itself (longer lists are in the partial-result buffer).
template <int KPAD, bool SHARED_LIST = (KPAD <= kMaxSharedList)>
struct TopkShared {
  float q_s[kUsers][kQueue];
  int q_i[kUsers][kQueue];
  float th_s[kUsers];
  int th_i[kUsers];
  int count[kUsers];
  float list_s[kUsers][KPAD];
  int list_i[kUsers][KPAD];
};

template <int KPAD>
struct TopkShared<KPAD, false> {
  float q_s[kUsers][kQueue];
  int q_i[kUsers][kQueue];
  float th_s[kUsers];
  int th_i[kUsers];
  int count[kUsers];
};

// The score-block path keeps no lists.
struct NoTopk {};

template <int KPAD>
using TopkState = dev::conditional_t<KPAD == 0, NoTopk, TopkShared<(KPAD > 0 ? KPAD : 32)>>;

// The list of user u (local row ul of the block): in shared memory for short lists, else the block's row of
// the partial-result buffer part [B, splits, KPAD].
template <int KPAD, typename T>
__device__ __forceinline__ float* list_scores(TopkShared<KPAD>& tk, const Params<T>& p, int u, int ul) {
  if constexpr (KPAD <= kMaxSharedList) {
    return tk.list_s[ul];
  } else {
    return p.part_s + (static_cast<int64_t>(u) * p.splits + blockIdx.y) * KPAD;
  }
}

template <int KPAD, typename T>
__device__ __forceinline__ int* list_indices(TopkShared<KPAD>& tk, const Params<T>& p, int u, int ul) {
  if constexpr (KPAD <= kMaxSharedList) {
    return tk.list_i[ul];
  } else {
    return p.part_i + (static_cast<int64_t>(u) * p.splits + blockIdx.y) * KPAD;
  }
}

// Empty lists and queues for the warp's users (rows u0 + ul, ul < u_valid).
template <int KPAD, typename T>
__device__ __forceinline__ void topk_init(TopkShared<KPAD>& tk, const Params<T>& p, int u0, int u_valid,
                                          int warp, int lane) {
  for (int i = 0; i < kUsersPerWarp; ++i) {
    const int ul = warp * kUsersPerWarp + i;
    if (ul >= u_valid) break;
    float* ls = list_scores(tk, p, u0 + ul, ul);
    int* li = list_indices(tk, p, u0 + ul, ul);
    for (int t = lane; t < KPAD; t += 32) {
      ls[t] = -INFINITY;
      li[t] = kNoIndex;
    }
    if (lane == 0) {
      tk.th_s[ul] = -INFINITY;
      tk.th_i[ul] = kNoIndex;
      tk.count[ul] = 0;
    }
  }
}

// Offers row ul of the score tile (items j0 .. j0 + j_valid - 1) to the warp's users' lists.
template <int KPAD, typename T>
__device__ __forceinline__ void topk_select(TopkShared<KPAD>& tk, const Params<T>& p, const float* tile,
                                            int u0, int u_valid, int j0, int j_valid, int warp, int lane) {
  for (int i = 0; i < kUsersPerWarp; ++i) {
    const int ul = warp * kUsersPerWarp + i;
    if (ul >= u_valid) break;
    const int64_t* ex = p.exclude ? p.exclude + static_cast<int64_t>(u0 + ul) * p.X : nullptr;
    float th_s = tk.th_s[ul];
    int th_i = tk.th_i[ul];
    int count = tk.count[ul];
#pragma unroll
    for (int half = 0; half < kItems / 32; ++half) {
      const int col = half * 32 + lane;
      const int j = j0 + col;
      const float v = tile[ul * kScoreStride + col];
      bool take = col < j_valid && v > -INFINITY && ranks_before(v, j, th_s, th_i);
      if (!__any_sync(kFullMask, take)) continue;
      if (take && ex != nullptr) take = !sorted_contains(ex, p.X, j);
      offer<KPAD>(take, v, j, list_scores(tk, p, u0 + ul, ul), list_indices(tk, p, u0 + ul, ul), tk.q_s[ul],
                  tk.q_i[ul], count, p.k, lane, th_s, th_i);
    }
    __syncwarp();  // every lane has read the state before lane 0 writes it
    if (lane == 0) {
      tk.th_s[ul] = th_s;
      tk.th_i[ul] = th_i;
      tk.count[ul] = count;
    }
  }
}

// Flushes the warp's users' queues and leaves their lists, sorted, in the partial-result buffer.
template <int KPAD, typename T>
__device__ __forceinline__ void topk_finish(TopkShared<KPAD>& tk, const Params<T>& p, int u0, int u_valid,
                                            int warp, int lane) {
  for (int i = 0; i < kUsersPerWarp; ++i) {
    const int ul = warp * kUsersPerWarp + i;
    if (ul >= u_valid) break;
    __syncwarp();
    const int count = tk.count[ul];
    float* ls = list_scores(tk, p, u0 + ul, ul);
    int* li = list_indices(tk, p, u0 + ul, ul);
    if (count > 0) {
      float th_s = -INFINITY;
      int th_i = kNoIndex;
      flush_queue<KPAD>(ls, li, tk.q_s[ul], tk.q_i[ul], count, p.k, lane, th_s, th_i);
    }
    if constexpr (KPAD <= kMaxSharedList) {
      __syncwarp();
      float* out_s = p.part_s + (static_cast<int64_t>(u0 + ul) * p.splits + blockIdx.y) * KPAD;
      int* out_i = p.part_i + (static_cast<int64_t>(u0 + ul) * p.splits + blockIdx.y) * KPAD;
      for (int t = lane; t < KPAD; t += 32) {
        out_s[t] = ls[t];
        out_i[t] = li[t];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Fused kernel.

// KPAD > 0: the fused search (lists of KPAD slots); KPAD == 0: the score-block path. See the file comment.
template <typename T, bool GATED, int KPAD>
__global__ void __launch_bounds__(kThreads, 2) score_topk_kernel(const Params<T> p) {
  __shared__ __align__(16) unsigned char stage[Stage<T>::kBytes];
  __shared__ TopkState<KPAD> tk;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const Frag f = frag_of(warp, lane);
  const int u0 = p.u_base + static_cast<int>(blockIdx.x) * kUsers;
  const int u_valid = min(kUsers, p.u_base + p.u_count - u0);
  const int64_t first = p.j_base + static_cast<int64_t>(blockIdx.y) * p.tiles_per_split * kItems;
  const int j_begin = static_cast<int>(dev::min<int64_t>(first, p.j_base + p.j_count));
  const int j_end = static_cast<int>(
      dev::min<int64_t>(first + static_cast<int64_t>(p.tiles_per_split) * kItems, p.j_base + p.j_count));

  if constexpr (KPAD > 0) topk_init(tk, p, u0, u_valid, warp, lane);

  for (int j0 = j_begin; j0 < j_end; j0 += kItems) {
    const int j_valid = min(kItems, j_end - j0);
    float acc[8];
    tile_product<T>(p.query + static_cast<int64_t>(u0) * p.d, u_valid,
                    p.table + static_cast<int64_t>(j0) * p.d, j_valid, p.d, p.vec_dot, stage, f, acc);
    if constexpr (GATED) {
      float s1[8], s2[8];
      tile_product<T>(p.user + static_cast<int64_t>(u0) * p.c, u_valid,
                      p.item + static_cast<int64_t>(j0) * p.c, j_valid, p.c, p.vec_s1, stage, f, s1);
      tile_product<T>(p.user_sim + static_cast<int64_t>(u0) * p.c, u_valid,
                      p.item_sim + static_cast<int64_t>(j0) * p.c, j_valid, p.c, p.vec_s2, stage, f, s2);
      add_gated_term<T>(p, u0, u_valid, j0, j_valid, s1, s2, stage, f, acc);
    }

    if constexpr (KPAD == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = f.row(h);
        if (r >= u_valid) continue;
        float* out = p.block + static_cast<int64_t>(u0 - p.u_base + r) * p.block_stride + (j0 - p.j_base);
#pragma unroll
        for (int nq = 0; nq < 4; ++nq) {
          const int cidx = f.col(nq >> 1, nq & 1);
          if (cidx < j_valid) out[cidx] = acc[4 * (nq >> 1) + 2 * h + (nq & 1)];
        }
      }
    } else {
      // The staging area is free: every product and chunk above ended with a barrier, and so did the
      // previous tile's selection.
      float* tile = reinterpret_cast<float*>(stage);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          *reinterpret_cast<float2*>(tile + f.row(h) * kScoreStride + f.col(nt, 0)) =
              make_float2(acc[4 * nt + 2 * h], acc[4 * nt + 2 * h + 1]);
        }
      }
      __syncthreads();
      topk_select(tk, p, tile, u0, u_valid, j0, j_valid, warp, lane);
      __syncthreads();  // the score tile is read before the next tile's staging overwrites it
    }
  }

  if constexpr (KPAD > 0) topk_finish(tk, p, u0, u_valid, warp, lane);
}

// One warp per user: merges the first k entries of the user's `splits` sorted lists in part [B, splits, KPAD]
// and writes its outputs (empty slots: -inf, -1).
template <int KPAD>
__global__ void __launch_bounds__(kMergeWarps * 32)
    score_topk_merge_kernel(const float* __restrict__ part_s, const int* __restrict__ part_i, int B,
                            int splits, int k, float* __restrict__ out_s, int64_t* __restrict__ out_i) {
  __shared__ float list_s[kMergeWarps][KPAD];
  __shared__ int list_i[kMergeWarps][KPAD];
  __shared__ float q_s[kMergeWarps][kQueue];
  __shared__ int q_i[kMergeWarps][kQueue];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int u = static_cast<int>(blockIdx.x) * kMergeWarps + warp;
  if (u >= B) return;  // the whole warp leaves; no block-wide barrier below
  float* ls = list_s[warp];
  int* li = list_i[warp];
  for (int t = lane; t < KPAD; t += 32) {
    ls[t] = -INFINITY;
    li[t] = kNoIndex;
  }
  float th_s = -INFINITY;
  int th_i = kNoIndex;
  int count = 0;
  for (int s = 0; s < splits; ++s) {
    const int64_t row = (static_cast<int64_t>(u) * splits + s) * KPAD;
    for (int base = 0; base < k; base += 32) {
      const int t = base + lane;
      const float v = t < k ? part_s[row + t] : -INFINITY;
      const int j = t < k ? part_i[row + t] : kNoIndex;
      const bool take = v > -INFINITY && ranks_before(v, j, th_s, th_i);
      const unsigned mask = __ballot_sync(kFullMask, take);
      offer<KPAD>(take, v, j, ls, li, q_s[warp], q_i[warp], count, k, lane, th_s, th_i);
      if (mask != kFullMask) break;  // this entry failed: the rest of the sorted list is worse
    }
  }
  if (count > 0) flush_queue<KPAD>(ls, li, q_s[warp], q_i[warp], count, k, lane, th_s, th_i);
  __syncwarp();
  for (int t = lane; t < k; t += 32) {
    const int j = li[t];
    out_s[static_cast<int64_t>(u) * k + t] = ls[t];
    out_i[static_cast<int64_t>(u) * k + t] = j == kNoIndex ? int64_t{-1} : int64_t{j};
  }
}

}  // namespace score_topk_device
}  // namespace grasp
