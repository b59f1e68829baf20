// CPU kernels of the projected holistic-attention operator (schemas in ../holistic_attention_projected.cpp).
//
// Forward: one pass over the pairs n (at::parallel_for), SIMD over d and e. Backward, deterministic for any
// thread count: (1) per pair, the gates and the gradients of the two logits' dot products, into a small
// [N, 5] buffer; (2) per item j, over the pairs that read it (a counting sort of item_index), the gradients
// of values[j], item[j] and item_sim[j]; (3) per user r likewise for user[r] and user_sim[r]. No atomics,
// no per-thread copies of the tables, so memory is O(N) whatever the catalogue and core count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cmath>
#include <tuple>
#include <vector>

namespace grasp {
namespace {

constexpr int64_t kGrain = 256;  // pairs per parallel task

struct Sizes {
  int64_t U, M, N, d, e;
};

Sizes check_inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                   const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& user_index,
                   const at::Tensor& item_index) {
  TORCH_CHECK(user.dim() == 2 && item.dim() == 2 && user.size(1) == item.size(1),
              "holistic_attention_projected (cpu): user [U, d] and item [M, d] must share d, got ", user.sizes(), " and ",
              item.sizes());
  TORCH_CHECK(user_sim.sizes() == user.sizes() && item_sim.sizes() == item.sizes(),
              "holistic_attention_projected (cpu): user_sim / item_sim must match user / item");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == item.size(0) && values.size(1) == 3,
              "holistic_attention_projected (cpu): values must be [M, 3, e] with M = ", item.size(0), ", got ", values.sizes());
  TORCH_CHECK(user_index.dim() == 1 && item_index.sizes() == user_index.sizes(),
              "holistic_attention_projected (cpu): user_index and item_index must be 1-d of one length");
  for (const at::Tensor* t : {&user, &user_sim, &item, &item_sim, &values}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == item.scalar_type(),
                "holistic_attention_projected (cpu): inputs must be contiguous CPU tensors of one dtype");
  }
  for (const at::Tensor* t : {&user_index, &item_index}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kLong,
                "holistic_attention_projected (cpu): indices must be contiguous int64 CPU tensors");
  }
  // The kernels index tables with these: a bad one would read or write outside them (O(N), next to the
  // kernels' O(N (d + e)) work).
  const int64_t N = user_index.size(0), U = user.size(0), M = item.size(0);
  const int64_t *ui = user_index.const_data_ptr<int64_t>(), *ii = item_index.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(ui[n] >= 0 && ui[n] < U, "holistic_attention_projected (cpu): user_index[", n, "] = ", ui[n], " is outside 0..", U - 1);
    TORCH_CHECK(ii[n] >= 0 && ii[n] < M, "holistic_attention_projected (cpu): item_index[", n, "] = ", ii[n], " is outside 0..", M - 1);
  }
  return {U, M, N, item.size(1), values.size(2)};
}

// The operator's inputs as raw pointers, with the sizes and the logits' scales
// (s1 -> z_self = s1 c1, s2 -> z_sim = s2 c1, s1 + s2 -> z_glob = (s1 + s2) c2).
template <typename T>
struct Inputs {
  using acc_t = at::opmath_type<T>;
  const T *u, *us, *it, *is, *v;
  const int64_t *ui, *ii;
  Sizes s;
  acc_t c1, c2;

  Inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item, const at::Tensor& item_sim,
         const at::Tensor& values, const at::Tensor& user_index, const at::Tensor& item_index, const Sizes& sizes)
      : u(user.const_data_ptr<T>()),
        us(user_sim.const_data_ptr<T>()),
        it(item.const_data_ptr<T>()),
        is(item_sim.const_data_ptr<T>()),
        v(values.const_data_ptr<T>()),
        ui(user_index.const_data_ptr<int64_t>()),
        ii(item_index.const_data_ptr<int64_t>()),
        s(sizes),
        c1(acc_t(1) / std::sqrt(acc_t(sizes.d))),
        c2(acc_t(1) / std::sqrt(acc_t(2 * sizes.d))) {}

  // The three gates of pair n into g.
  void gates(int64_t n, acc_t* g) const {
    const int64_t r = ui[n], j = ii[n], d = s.d;
    const acc_t s1 = dot<T, acc_t>(u + r * d, it + j * d, d), s2 = dot<T, acc_t>(us + r * d, is + j * d, d);
    g[0] = sigmoid(s1 * c1);
    g[1] = sigmoid(s2 * c1);
    g[2] = sigmoid((s1 + s2) * c2);
  }
};

template <typename scalar_t>
void forward_impl(const Inputs<scalar_t>& in, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t e = in.s.e;
  at::parallel_for(0, in.s.N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      acc_t g[3];
      in.gates(n, g);
      const scalar_t* vj = in.v + in.ii[n] * 3 * e;
      scalar_t* o = out + n * e;
#pragma omp simd
      for (int64_t k = 0; k < e; ++k) {
        o[k] = static_cast<scalar_t>(g[0] * static_cast<acc_t>(vj[k]) + g[1] * static_cast<acc_t>(vj[e + k]) +
                                     g[2] * static_cast<acc_t>(vj[2 * e + k]));
      }
    }
  });
}

// CSR of the pairs grouped by their row in a table of `rows` rows (stable: pairs in increasing n).
void group_by(const int64_t* index, int64_t N, int64_t rows, std::vector<int64_t>& start,
              std::vector<int64_t>& pairs) {
  start.assign(rows + 1, 0);
  for (int64_t n = 0; n < N; ++n) ++start[index[n] + 1];
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  pairs.resize(N);
  for (int64_t n = 0; n < N; ++n) pairs[fill[index[n]]++] = n;
}

template <typename scalar_t>
void backward_impl(const scalar_t* go, const Inputs<scalar_t>& in, scalar_t* gu, scalar_t* gus, scalar_t* gi,
                   scalar_t* gis, scalar_t* gv) {
  using acc_t = at::opmath_type<scalar_t>;
  const Sizes& s = in.s;
  const int64_t d = s.d, e = s.e;
  const acc_t c1 = in.c1, c2 = in.c2;
  const scalar_t *u = in.u, *us = in.us, *it = in.it, *is = in.is;
  const int64_t *ui = in.ui, *ii = in.ii;
  // (1) per pair: gates g0..g2 and the logit-side gradients ds1, ds2.
  std::vector<acc_t> pair(5 * s.N);
  at::parallel_for(0, s.N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      acc_t* p = pair.data() + 5 * n;
      in.gates(n, p);
      const scalar_t* vj = in.v + ii[n] * 3 * e;
      const scalar_t* g = go + n * e;
      acc_t dz[3];
      for (int x = 0; x < 3; ++x) dz[x] = dot<scalar_t, acc_t>(g, vj + x * e, e) * p[x] * (acc_t(1) - p[x]);
      p[3] = dz[0] * c1 + dz[2] * c2;
      p[4] = dz[1] * c1 + dz[2] * c2;
    }
  });
  std::vector<int64_t> start, pairs;
  // (2) per item j: values[j, x] += g_x go[n]; item[j] += ds1 u[r]; item_sim[j] += ds2 us[r].
  group_by(ii, s.N, s.M, start, pairs);
  at::parallel_for(0, s.M, 16, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> acc(2 * d + 3 * e);
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t *ai = acc.data(), *ais = ai + d, *av = ais + d;
      for (int64_t q = start[j]; q < start[j + 1]; ++q) {
        const int64_t n = pairs[q], r = ui[n];
        const acc_t* p = pair.data() + 5 * n;
        const scalar_t* g = go + n * e;
        const scalar_t *ur = u + r * d, *usr = us + r * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          ai[k] += p[3] * static_cast<acc_t>(ur[k]);
          ais[k] += p[4] * static_cast<acc_t>(usr[k]);
        }
#pragma omp simd
        for (int64_t k = 0; k < e; ++k) {
          const acc_t gk = static_cast<acc_t>(g[k]);
          av[k] += p[0] * gk;
          av[e + k] += p[1] * gk;
          av[2 * e + k] += p[2] * gk;
        }
      }
      for (int64_t k = 0; k < d; ++k) {
        gi[j * d + k] = static_cast<scalar_t>(ai[k]);
        gis[j * d + k] = static_cast<scalar_t>(ais[k]);
      }
      for (int64_t k = 0; k < 3 * e; ++k) gv[j * 3 * e + k] = static_cast<scalar_t>(av[k]);
    }
  });
  // (3) per user r: user[r] += ds1 item[j]; user_sim[r] += ds2 item_sim[j].
  group_by(ui, s.N, s.U, start, pairs);
  at::parallel_for(0, s.U, 16, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(2 * d);
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t *au = acc.data(), *aus = au + d;
      for (int64_t q = start[r]; q < start[r + 1]; ++q) {
        const int64_t n = pairs[q], j = ii[n];
        const acc_t* p = pair.data() + 5 * n;
        const scalar_t *ij = it + j * d, *isj = is + j * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          au[k] += p[3] * static_cast<acc_t>(ij[k]);
          aus[k] += p[4] * static_cast<acc_t>(isj[k]);
        }
      }
      for (int64_t k = 0; k < d; ++k) {
        gu[r * d + k] = static_cast<scalar_t>(au[k]);
        gus[r * d + k] = static_cast<scalar_t>(aus[k]);
      }
    }
  });
}

at::Tensor holistic_attention_projected_forward_cpu(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                                  const at::Tensor& item_sim, const at::Tensor& values,
                                  const at::Tensor& user_index, const at::Tensor& item_index) {
  const Sizes s = check_inputs(user, user_sim, item, item_sim, values, user_index, item_index);
  at::Tensor out = at::empty({s.N, s.e}, item.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item.scalar_type(), "holistic_attention_projected_forward_cpu", [&] {
    forward_impl<scalar_t>(Inputs<scalar_t>(user, user_sim, item, item_sim, values, user_index, item_index, s),
                           out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> holistic_attention_projected_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
    const at::Tensor& item_sim, const at::Tensor& values, const at::Tensor& user_index,
    const at::Tensor& item_index) {
  const Sizes s = check_inputs(user, user_sim, item, item_sim, values, user_index, item_index);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({s.N, s.e}) && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == item.scalar_type(),
              "holistic_attention_projected (cpu): grad_out must be a contiguous [N, e] tensor of the inputs' dtype");
  at::Tensor gu = at::empty_like(user), gus = at::empty_like(user_sim);
  at::Tensor gi = at::empty_like(item), gis = at::empty_like(item_sim), gv = at::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item.scalar_type(), "holistic_attention_projected_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(),
                            Inputs<scalar_t>(user, user_sim, item, item_sim, values, user_index, item_index, s),
                            gu.data_ptr<scalar_t>(), gus.data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(),
                            gis.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>());
  });
  return {gu, gus, gi, gis, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(grasp, CPU, m) {
  m.impl("holistic_attention_projected_forward", &holistic_attention_projected_forward_cpu);
  m.impl("holistic_attention_projected_backward", &holistic_attention_projected_backward_cpu);
}

}  // namespace grasp
