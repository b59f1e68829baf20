// Device code of the holistic-attention operator (docs/design.md section 2): the kernels, with no ATen
// headers, compiled by nvcc into grasp._C (holistic_attention_kernel.cu, the host launchers) and by NVRTC at
// first use (grasp/ops/_cuda_jit.py, which launches them the same way).
//
//
// For every position p = (b, l), with s1 = <u, i>, s2 = <ū, ī>:
//   z = (s1 / sqrt(d), s2 / sqrt(d), (s1 + s2) / sqrt(2d)),  a = act(z),
//   out[p] = [a_self*i | a_sim*ī | a_glob*i | a_glob*ī].
// The backward recomputes s1, s2 and the gates from the inputs.
//
// Work decomposition
//   A "team" of T lanes owns one position at a time (T = the next power of two
//   >= d / VEC, at most 32), so 32 / T teams share a warp and small d does not
//   leave most of a warp idle. Lane r of a team covers the VEC-wide chunks
//   r, r + T, r + 2T, ... of the d features. Team dot products are summed with
//   __shfl_xor_sync butterflies over lane offsets < T, which stay inside the
//   team (teams are aligned power-of-two lane groups); every lane of the warp
//   takes part in every shuffle, lanes without a position contributing zeros.
//   VEC = 16 / sizeof(scalar) (one 16-byte access per chunk) when d is a
//   multiple of it and every tensor pointer is 16-byte aligned, otherwise 1.
//
//   sigmoid: positions are independent; the grid's teams stride over all B*L.
//   softmax: one block per row b. A first pass builds per-branch online-softmax
//            statistics (running max m, S = sum exp(z - m) and, for the
//            backward, T = sum exp(z - m) * da) over the row's real positions;
//            they are merged across the teams of a warp by shuffles and across
//            warps in a fixed order through shared memory. The second pass
//            recomputes z and writes: a = exp(z - m) / S, and in the backward
//            dz = a * (da - T / S). A fully masked row has S = 0: all gates 0.
//   A [B, d] user gets grad_user[b] = sum_l ds1[b, l] * item[b, l] (likewise
//   user_sim) inside the backward kernel, so item and item_sim are read once:
//   its backward takes one block per row b for either activation; each lane
//   sums its chunks over the positions its team visits in registers, then the
//   teams of a warp are summed by shuffles and the warps in warp order through
//   shared memory. No atomics anywhere, so results are deterministic.
//
// Masked positions write exact zeros (output and gradients) without reading
// their values. Accumulation is in acc_t: float, double for double.
#pragma once

#include "device_math.cuh"

namespace grasp {
namespace holistic_attention_device {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Second __launch_bounds__ argument (0: none). Left free, ptxas trades a few
// registers for occupancy and spills some kernels (down to 64 registers); 1
// block per SM lifts that where spills appeared: the backward of a [B, d]
// user, whose lanes hold CH > 0 chunks of sums in registers, and float64.
template <typename acc_t, int CH>
constexpr int kMinBlocks = (CH > 0 || sizeof(acc_t) == 8) ? 1 : 0;

// ---------------------------------------------------------------------------
// Vector memory access: VEC consecutive elements in one aligned access (Pack, device_math.cuh).

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void load(const T* p, acc_t (&x)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) x[k] = static_cast<acc_t>(pk.v[k]);
}

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void store(T* p, const acc_t (&x)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(x[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// ---------------------------------------------------------------------------
// Teams and the positions they visit.

// Sum over the `team` lanes of each aligned lane group; every lane of the group
// gets the same bits (each butterfly step adds the same two values on both
// partner lanes). Must be called by all 32 lanes of the warp.
template <typename acc_t>
__device__ __forceinline__ acc_t team_sum(acc_t v, int team) {
  for (int off = team >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Where this thread's team starts and how it strides over positions. Visiting
// positions `base + slot` for base = first, first + step, ... < end keeps the
// loop trip count uniform across a warp, so every lane reaches every shuffle.
struct Schedule {
  int64_t first, step, end;
  int slot;  // index of the team inside the warp
  int rank;  // index of the lane inside the team

  __device__ Schedule(bool row_per_block, int64_t positions, int64_t L, int team) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int log_team = __ffs(team) - 1;
    const int per_warp = 32 >> log_team;
    slot = lane >> log_team;
    rank = lane & (team - 1);
    if (row_per_block) {  // block b walks the L positions of row b
      const int64_t begin = static_cast<int64_t>(blockIdx.x) * L;
      first = begin + static_cast<int64_t>(warp) * per_warp;
      step = static_cast<int64_t>(kWarps) * per_warp;
      end = begin + L;
    } else {  // the whole grid walks all positions
      first = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * per_warp;
      step = static_cast<int64_t>(gridDim.x) * kWarps * per_warp;
      end = positions;
    }
  }
};

// Row pointers of one position.
template <typename T>
struct Rows {
  const T* u;
  const T* us;
  const T* i;
  const T* is;
};

template <typename T>
struct Inputs {
  const T* user;
  const T* user_sim;
  const T* item;
  const T* item_sim;
  const uint8_t* mask;  // nullptr: every position is real
  int64_t L, d;
  bool user_per_position;  // user is [B, L, d] rather than [B, d]

  __device__ __forceinline__ Rows<T> rows(int64_t p) const {
    const int64_t q = user_per_position ? p : p / L;
    return {user + q * d, user_sim + q * d, item + p * d, item_sim + p * d};
  }
  __device__ __forceinline__ bool real(int64_t p) const { return mask == nullptr || mask[p] != 0; }
};

struct Scales {
  double inv_sqrt_d, inv_sqrt_2d;
};

template <typename acc_t>
struct Logits {
  acc_t z[3];  // self, sim, glob
};

template <typename acc_t>
__device__ __forceinline__ Logits<acc_t> logits(acc_t s1, acc_t s2, const Scales& sc) {
  const acc_t inv_d = static_cast<acc_t>(sc.inv_sqrt_d);
  const acc_t inv_2d = static_cast<acc_t>(sc.inv_sqrt_2d);
  return {{s1 * inv_d, s2 * inv_d, (s1 + s2) * inv_2d}};
}

// ---------------------------------------------------------------------------
// Online softmax statistics of one branch: running max m, S = sum exp(z - m),
// T = sum exp(z - m) * da. Empty: m = -inf, S = T = 0.

template <typename acc_t>
struct Online {
  acc_t m, s, t;
};

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> empty_online() {
  return {static_cast<acc_t>(-INFINITY), acc_t(0), acc_t(0)};
}

// Merges two partial statistics (order-independent up to rounding). The block
// result is taken from lane 0 of each warp and merged in warp order, so every
// thread ends up with the same bits.
template <typename acc_t>
__device__ __forceinline__ Online<acc_t> merge(const Online<acc_t>& a, const Online<acc_t>& b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == static_cast<acc_t>(-INFINITY)) return a;  // both empty; avoids exp(-inf + inf)
  const acc_t fa = exp_acc(a.m - m);
  const acc_t fb = exp_acc(b.m - m);
  return {m, a.s * fa + b.s * fb, a.t * fa + b.t * fb};
}

// Merges the three branch statistics over the whole block; every thread gets
// the row's totals. Lanes of a team hold identical values on entry. Must be
// called once per kernel by every thread of the block.
template <typename acc_t>
__device__ void block_merge(Online<acc_t> (&st)[3], int team) {
  __shared__ Online<acc_t> partial[kWarps][3];
  for (int off = team; off < 32; off <<= 1) {
#pragma unroll
    for (int x = 0; x < 3; ++x) {
      const Online<acc_t> other{__shfl_xor_sync(kFullMask, st[x].m, off),
                                __shfl_xor_sync(kFullMask, st[x].s, off),
                                __shfl_xor_sync(kFullMask, st[x].t, off)};
      st[x] = merge(st[x], other);
    }
  }
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int x = 0; x < 3; ++x) partial[threadIdx.x >> 5][x] = st[x];
  }
  __syncthreads();
#pragma unroll
  for (int x = 0; x < 3; ++x) {
    st[x] = partial[0][x];
    for (int w = 1; w < kWarps; ++w) st[x] = merge(st[x], partial[w][x]);
  }
}

// ---------------------------------------------------------------------------
// Team dot products of one position (zeros when !active).

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void team_scores(const Rows<T>& r, int64_t cols, int rank, int team,
                                            bool active, acc_t& s1, acc_t& s2) {
  acc_t p1 = 0, p2 = 0;
  if (active) {
    for (int64_t c = rank; c < cols; c += team) {
      acc_t u[VEC], i[VEC], us[VEC], is[VEC];
      load<VEC>(r.u + c * VEC, u);
      load<VEC>(r.i + c * VEC, i);
      load<VEC>(r.us + c * VEC, us);
      load<VEC>(r.is + c * VEC, is);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        p1 += u[k] * i[k];
        p2 += us[k] * is[k];
      }
    }
  }
  s1 = team_sum(p1, team);
  s2 = team_sum(p2, team);
}

// Scores plus the gate gradients da_self = <g1, i>, da_sim = <g2, ī>,
// da_glob = <g3, i> + <g4, ī>, where g = g1|g2|g3|g4 is the position's grad_out row.
template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void team_scores_and_da(const Rows<T>& r, const T* g, int64_t d,
                                                   int64_t cols, int rank, int team, bool active,
                                                   acc_t& s1, acc_t& s2, acc_t (&da)[3]) {
  acc_t p1 = 0, p2 = 0, q1 = 0, q2 = 0, q3 = 0;
  if (active) {
    for (int64_t c = rank; c < cols; c += team) {
      const int64_t o = c * VEC;
      acc_t u[VEC], i[VEC], us[VEC], is[VEC], g1[VEC], g2[VEC], g3[VEC], g4[VEC];
      load<VEC>(r.u + o, u);
      load<VEC>(r.i + o, i);
      load<VEC>(r.us + o, us);
      load<VEC>(r.is + o, is);
      load<VEC>(g + o, g1);
      load<VEC>(g + d + o, g2);
      load<VEC>(g + 2 * d + o, g3);
      load<VEC>(g + 3 * d + o, g4);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        p1 += u[k] * i[k];
        p2 += us[k] * is[k];
        q1 += g1[k] * i[k];
        q2 += g2[k] * is[k];
        q3 += g3[k] * i[k] + g4[k] * is[k];
      }
    }
  }
  s1 = team_sum(p1, team);
  s2 = team_sum(p2, team);
  da[0] = team_sum(q1, team);
  da[1] = team_sum(q2, team);
  da[2] = team_sum(q3, team);
}

// ---------------------------------------------------------------------------
// Softmax first pass: the row's per-branch statistics st (m, S and, with
// WITH_DA, T = sum exp(z - m) * da from grad_out; without it T = 0 and
// grad_out is not read). Each team folds in its real positions one at a time,
// then block_merge combines the block. Every thread of the block must call it,
// with the row-per-block schedule s; every thread gets the same bits.
template <int VEC, bool WITH_DA, typename T, typename acc_t>
__device__ __forceinline__ void softmax_stats(const Inputs<T>& in, const T* grad_out,
                                              const Schedule& s, int team, const Scales& sc,
                                              Online<acc_t> (&st)[3]) {
  const int64_t d = in.d;
  const int64_t cols = d / VEC;
#pragma unroll
  for (int x = 0; x < 3; ++x) st[x] = empty_online<acc_t>();
  for (int64_t base = s.first; base < s.end; base += s.step) {
    const int64_t p = base + s.slot;
    const bool active = p < s.end && in.real(p);
    const Rows<T> r = active ? in.rows(p) : Rows<T>{};
    acc_t s1, s2, da[3] = {};
    if constexpr (WITH_DA) {
      team_scores_and_da<VEC>(r, active ? grad_out + p * 4 * d : nullptr, d, cols, s.rank, team,
                              active, s1, s2, da);
    } else {
      team_scores<VEC>(r, cols, s.rank, team, active, s1, s2);
    }
    if (active) {
      const Logits<acc_t> lg = logits(s1, s2, sc);
#pragma unroll
      for (int x = 0; x < 3; ++x) st[x] = merge(st[x], Online<acc_t>{lg.z[x], acc_t(1), da[x]});
    }
  }
  block_merge(st, team);
}

// ---------------------------------------------------------------------------
// Forward: out [B, L, 4d]. SOFTMAX launches one block per row, sigmoid any grid.

template <typename T, typename acc_t, int VEC, bool SOFTMAX>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t, 0>)
    holistic_attention_forward_kernel(const Inputs<T> in, T* __restrict__ out, int64_t positions, int team,
                       Scales sc) {
  const int64_t d = in.d;
  const int64_t cols = d / VEC;
  const Schedule s(SOFTMAX, positions, in.L, team);

  Online<acc_t> st[3];
  if constexpr (SOFTMAX) softmax_stats<VEC, false, T>(in, nullptr, s, team, sc, st);

  for (int64_t base = s.first; base < s.end; base += s.step) {
    const int64_t p = base + s.slot;
    const bool valid = p < s.end;
    const bool active = valid && in.real(p);
    const Rows<T> r = active ? in.rows(p) : Rows<T>{};
    acc_t s1, s2;
    team_scores<VEC>(r, cols, s.rank, team, active, s1, s2);
    if (!valid) continue;  // after the shuffles: the whole warp took part
    T* o = out + p * 4 * d;
    if (!active) {
      acc_t zero[VEC] = {};
      for (int64_t c = s.rank; c < cols; c += team) {
#pragma unroll
        for (int part = 0; part < 4; ++part) store<VEC>(o + part * d + c * VEC, zero);
      }
      continue;
    }
    const Logits<acc_t> lg = logits(s1, s2, sc);
    acc_t a[3];
#pragma unroll
    for (int x = 0; x < 3; ++x) {
      if constexpr (SOFTMAX) {
        a[x] = exp_acc(lg.z[x] - st[x].m) / st[x].s;  // s >= 1: this row has a real position
      } else {
        a[x] = sigmoid(lg.z[x]);
      }
    }
    for (int64_t c = s.rank; c < cols; c += team) {
      const int64_t e = c * VEC;
      acc_t i[VEC], is[VEC], y[VEC];
      load<VEC>(r.i + e, i);
      load<VEC>(r.is + e, is);
#pragma unroll
      for (int k = 0; k < VEC; ++k) y[k] = a[0] * i[k];
      store<VEC>(o + e, y);
#pragma unroll
      for (int k = 0; k < VEC; ++k) y[k] = a[1] * is[k];
      store<VEC>(o + d + e, y);
#pragma unroll
      for (int k = 0; k < VEC; ++k) y[k] = a[2] * i[k];
      store<VEC>(o + 2 * d + e, y);
#pragma unroll
      for (int k = 0; k < VEC; ++k) y[k] = a[2] * is[k];
      store<VEC>(o + 3 * d + e, y);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward. The gates and their gradients per position, then grad_item,
// grad_item_sim and the user's gradient: written per position for a
// [B, L, d] user, summed over the row inside the block for a [B, d] user.

template <typename T>
struct Grads {
  T* user;
  T* user_sim;
  T* item;
  T* item_sim;
};

// The gates a of one real position and the gradients ds1, ds2 of its scores
// s1 = <u, i>, s2 = <ū, ī>.
template <typename acc_t>
struct PositionGrad {
  acc_t a[3];
  acc_t ds1, ds2;
};

template <bool SOFTMAX, typename acc_t>
__device__ __forceinline__ PositionGrad<acc_t> position_grad(acc_t s1, acc_t s2,
                                                            const acc_t (&da)[3],
                                                            const Online<acc_t> (&st)[3],
                                                            const Scales& sc) {
  const Logits<acc_t> lg = logits(s1, s2, sc);
  PositionGrad<acc_t> pg;
  acc_t dz[3];
#pragma unroll
  for (int x = 0; x < 3; ++x) {
    if constexpr (SOFTMAX) {
      pg.a[x] = exp_acc(lg.z[x] - st[x].m) / st[x].s;  // s >= 1: this row has a real position
      dz[x] = pg.a[x] * (da[x] - st[x].t / st[x].s);
    } else {
      pg.a[x] = sigmoid(lg.z[x]);
      dz[x] = da[x] * pg.a[x] * (acc_t(1) - pg.a[x]);
    }
  }
  const acc_t inv_d = static_cast<acc_t>(sc.inv_sqrt_d);
  const acc_t inv_2d = static_cast<acc_t>(sc.inv_sqrt_2d);
  pg.ds1 = dz[0] * inv_d + dz[2] * inv_2d;
  pg.ds2 = dz[1] * inv_d + dz[2] * inv_2d;
  return pg;
}

// grad_item and grad_item_sim of the VEC-wide chunk at column e of a real
// position (g: its grad_out row; gi, gis: its gradient rows). Returns the
// chunk of item and item_sim in i and is, for the user's gradient.
template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void item_grads_chunk(const Rows<T>& r, const T* g, T* gi, T* gis,
                                                 int64_t d, int64_t e,
                                                 const PositionGrad<acc_t>& pg, acc_t (&i)[VEC],
                                                 acc_t (&is)[VEC]) {
  acc_t u[VEC], us[VEC], g1[VEC], g2[VEC], g3[VEC], g4[VEC], y[VEC];
  load<VEC>(r.u + e, u);
  load<VEC>(r.us + e, us);
  load<VEC>(g + e, g1);
  load<VEC>(g + d + e, g2);
  load<VEC>(g + 2 * d + e, g3);
  load<VEC>(g + 3 * d + e, g4);
#pragma unroll
  for (int k = 0; k < VEC; ++k) y[k] = pg.a[0] * g1[k] + pg.a[2] * g3[k] + pg.ds1 * u[k];
  store<VEC>(gi + e, y);
#pragma unroll
  for (int k = 0; k < VEC; ++k) y[k] = pg.a[1] * g2[k] + pg.a[2] * g4[k] + pg.ds2 * us[k];
  store<VEC>(gis + e, y);
  load<VEC>(r.i + e, i);
  load<VEC>(r.is + e, is);
}

// Second pass for a [B, L, d] user: every position writes its four gradients.
template <typename T, typename acc_t, int VEC, bool SOFTMAX>
__device__ __forceinline__ void backward_per_position(const T* grad_out, const Inputs<T>& in,
                                                      const Grads<T>& gr, const Schedule& s,
                                                      int team, const Online<acc_t> (&st)[3],
                                                      const Scales& sc) {
  const int64_t d = in.d;
  const int64_t cols = d / VEC;
  for (int64_t base = s.first; base < s.end; base += s.step) {
    const int64_t p = base + s.slot;
    const bool valid = p < s.end;
    const bool active = valid && in.real(p);
    const Rows<T> r = active ? in.rows(p) : Rows<T>{};
    const T* g = active ? grad_out + p * 4 * d : nullptr;
    acc_t s1, s2, da[3];
    team_scores_and_da<VEC>(r, g, d, cols, s.rank, team, active, s1, s2, da);
    if (!valid) continue;  // after the shuffles: the whole warp took part

    T* gi = gr.item + p * d;
    T* gis = gr.item_sim + p * d;
    T* gu = gr.user + p * d;
    T* gus = gr.user_sim + p * d;
    if (!active) {
      acc_t zero[VEC] = {};
      for (int64_t c = s.rank; c < cols; c += team) {
        store<VEC>(gi + c * VEC, zero);
        store<VEC>(gis + c * VEC, zero);
        store<VEC>(gu + c * VEC, zero);
        store<VEC>(gus + c * VEC, zero);
      }
      continue;
    }
    const PositionGrad<acc_t> pg = position_grad<SOFTMAX>(s1, s2, da, st, sc);
    for (int64_t c = s.rank; c < cols; c += team) {
      const int64_t e = c * VEC;
      acc_t i[VEC], is[VEC], y[VEC];
      item_grads_chunk<VEC>(r, g, gi, gis, d, e, pg, i, is);
#pragma unroll
      for (int k = 0; k < VEC; ++k) y[k] = pg.ds1 * i[k];
      store<VEC>(gu + e, y);
#pragma unroll
      for (int k = 0; k < VEC; ++k) y[k] = pg.ds2 * is[k];
      store<VEC>(gus + e, y);
    }
  }
}

// Second pass for a [B, d] user over the chunks [c0, c1) of row b = blockIdx.x
// (c1 - c0 <= team * CH): grad_item and grad_item_sim of those chunks, and
// grad_user[b] = sum_l ds1[l] * item[b, l] (grad_user_sim likewise with ds2,
// item_sim). Lane `rank` of a team owns the chunks c0 + rank + k * team,
// k < CH, and sums them over the positions its team visits in registers; the
// teams of a warp are then summed by butterflies and the warps in warp order
// through shared memory. The order is fixed, so the result is deterministic.
// Every thread of the block must call it.
template <typename T, typename acc_t, int VEC, bool SOFTMAX, int CH>
__device__ __forceinline__ void backward_user_row(const T* grad_out, const Inputs<T>& in, const Grads<T>& gr,
                                  const Schedule& s, int team, const Online<acc_t> (&st)[3],
                                  const Scales& sc, int64_t c0, int64_t c1) {
  const int64_t d = in.d;
  const int64_t cols = d / VEC;
  acc_t gu[CH][VEC] = {};
  acc_t gus[CH][VEC] = {};
  for (int64_t base = s.first; base < s.end; base += s.step) {
    const int64_t p = base + s.slot;
    const bool valid = p < s.end;
    const bool active = valid && in.real(p);
    const Rows<T> r = active ? in.rows(p) : Rows<T>{};
    const T* g = active ? grad_out + p * 4 * d : nullptr;
    acc_t s1, s2, da[3];
    team_scores_and_da<VEC>(r, g, d, cols, s.rank, team, active, s1, s2, da);
    if (!valid) continue;  // after the shuffles: the whole warp took part

    T* gi = gr.item + p * d;
    T* gis = gr.item_sim + p * d;
    if (!active) {
      acc_t zero[VEC] = {};
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int64_t c = c0 + s.rank + static_cast<int64_t>(k) * team;
        if (c < c1) {
          store<VEC>(gi + c * VEC, zero);
          store<VEC>(gis + c * VEC, zero);
        }
      }
      continue;
    }
    const PositionGrad<acc_t> pg = position_grad<SOFTMAX>(s1, s2, da, st, sc);
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int64_t c = c0 + s.rank + static_cast<int64_t>(k) * team;
      if (c < c1) {
        acc_t i[VEC], is[VEC];
        item_grads_chunk<VEC>(r, g, gi, gis, d, c * VEC, pg, i, is);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          gu[k][v] += pg.ds1 * i[v];
          gus[k][v] += pg.ds2 * is[v];
        }
      }
    }
  }

  // Teams of a warp: lanes of equal rank own the same chunks. Each butterfly
  // step adds the same two values on both partner lanes, so all of them end
  // with the same bits.
  for (int off = team; off < 32; off <<= 1) {
#pragma unroll
    for (int k = 0; k < CH; ++k) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        gu[k][v] += __shfl_xor_sync(kFullMask, gu[k][v], off);
        gus[k][v] += __shfl_xor_sync(kFullMask, gus[k][v], off);
      }
    }
  }

  // Warps, in warp order: the first team of warp w adds its sums to `total`
  // (element j = chunk offset from c0 * VEC + v), then the block writes it out.
  __shared__ acc_t total[2][32 * CH * VEC];
  const bool first_team = (threadIdx.x & 31) < team;
  for (int w = 0; w < kWarps; ++w) {
    if ((threadIdx.x >> 5) == w && first_team) {
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int64_t c = s.rank + static_cast<int64_t>(k) * team;
        if (c0 + c < c1) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const int64_t j = c * VEC + v;
            total[0][j] = w == 0 ? gu[k][v] : total[0][j] + gu[k][v];
            total[1][j] = w == 0 ? gus[k][v] : total[1][j] + gus[k][v];
          }
        }
      }
    }
    __syncthreads();
  }
  const int64_t row = static_cast<int64_t>(blockIdx.x) * d + c0 * VEC;
  for (int64_t j = threadIdx.x; j < (c1 - c0) * VEC; j += kThreads) {
    gr.user[row + j] = static_cast<T>(total[0][j]);
    gr.user_sim[row + j] = static_cast<T>(total[1][j]);
  }
  __syncthreads();  // `total` is reused by the next column pass
}

// CH = 0: [B, L, d] user. Softmax launches one block per row, sigmoid any grid.
// CH > 0: [B, d] user, one block per row. The row's chunks are covered in
// column passes of team * CH chunks (one pass unless d > 32 * CH * VEC); each
// pass recomputes the scores, so a wide row re-reads its inputs once per pass.
template <typename T, typename acc_t, int VEC, bool SOFTMAX, int CH>
__global__ void __launch_bounds__(kThreads, kMinBlocks<acc_t, CH>)
    holistic_attention_backward_kernel(const T* __restrict__ grad_out, const Inputs<T> in, Grads<T> gr,
                        int64_t positions, int team, Scales sc) {
  constexpr bool kUserRow = CH > 0;
  const int64_t cols = in.d / VEC;
  const Schedule s(SOFTMAX || kUserRow, positions, in.L, team);

  Online<acc_t> st[3];
  if constexpr (SOFTMAX) softmax_stats<VEC, true>(in, grad_out, s, team, sc, st);

  if constexpr (kUserRow) {
    const int64_t span = static_cast<int64_t>(team) * CH;
    for (int64_t c0 = 0; c0 < cols; c0 += span) {
      const int64_t c1 = c0 + span < cols ? c0 + span : cols;
      backward_user_row<T, acc_t, VEC, SOFTMAX, CH>(grad_out, in, gr, s, team, st, sc, c0, c1);
    }
  } else {
    backward_per_position<T, acc_t, VEC, SOFTMAX>(grad_out, in, gr, s, team, st, sc);
  }
}

}  // namespace holistic_attention_device
}  // namespace grasp
