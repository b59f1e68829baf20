// CPU kernels of the holistic-attention operator (schemas in ../holistic_attention.cpp).
//
// One task per batch row b (at::parallel_for, OpenMP), a sequential loop over
// the L positions of the row, and SIMD inner loops over d (omp simd). Every
// dtype accumulates in at::opmath_type (float for half/bfloat16/float, double
// for double). The backward recomputes the gates; softmax rows keep their L
// logits in a small per-row buffer, never a [B, L, d] intermediate.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace grasp {
namespace {

// Row view of one batch row b: pointers to its first position and strides.
template <typename T>
struct Row {
  const T* u;  // user row(s): stride du between positions (0 when broadcast)
  const T* us;
  const T* it;
  const T* is;
  const bool* mask;  // nullptr when there is no mask
  int64_t L, d, du;
  const T* u_at(int64_t l) const { return u + l * du; }
  const T* us_at(int64_t l) const { return us + l * du; }
  const T* it_at(int64_t l) const { return it + l * d; }
  const T* is_at(int64_t l) const { return is + l * d; }
  bool real(int64_t l) const { return mask == nullptr || mask[l]; }
};

// Logits z[l] = (s1/sqrt(d), s2/sqrt(d), (s1+s2)/sqrt(2d)) of one row, into z (3*L).
template <typename T, typename acc_t>
void row_logits(const Row<T>& r, acc_t* z) {
  const acc_t c1 = acc_t(1) / std::sqrt(acc_t(r.d));
  const acc_t c2 = acc_t(1) / std::sqrt(acc_t(2 * r.d));
  for (int64_t l = 0; l < r.L; ++l) {
    const acc_t s1 = dot<T, acc_t>(r.u_at(l), r.it_at(l), r.d);
    const acc_t s2 = dot<T, acc_t>(r.us_at(l), r.is_at(l), r.d);
    z[3 * l + 0] = s1 * c1;
    z[3 * l + 1] = s2 * c1;
    z[3 * l + 2] = (s1 + s2) * c2;
  }
}

// In place: logits -> gates. Sigmoid per position, or softmax over the real
// positions of the row per branch; masked positions (and fully masked rows) get 0.
template <typename T, typename acc_t>
void logits_to_gates(const Row<T>& r, bool softmax, acc_t* z) {
  if (!softmax) {
    for (int64_t l = 0; l < r.L; ++l)
      for (int x = 0; x < 3; ++x) z[3 * l + x] = r.real(l) ? sigmoid(z[3 * l + x]) : acc_t(0);
    return;
  }
  for (int x = 0; x < 3; ++x) {
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t l = 0; l < r.L; ++l)
      if (r.real(l)) mx = std::max(mx, z[3 * l + x]);
    acc_t sum = 0;
    for (int64_t l = 0; l < r.L; ++l) {
      const acc_t e = r.real(l) ? std::exp(z[3 * l + x] - mx) : acc_t(0);
      z[3 * l + x] = e;
      sum += e;
    }
    const acc_t inv = sum > 0 ? acc_t(1) / sum : acc_t(0);
    for (int64_t l = 0; l < r.L; ++l) z[3 * l + x] *= inv;
  }
}

template <typename T>
Row<T> make_row(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                const at::Tensor& item_sim, const c10::optional<at::Tensor>& mask, int64_t b) {
  const int64_t L = item.size(1), d = item.size(2);
  const bool per_pos = user.dim() == 3;
  const int64_t urow = per_pos ? L * d : d;
  return Row<T>{user.const_data_ptr<T>() + b * urow,
                user_sim.const_data_ptr<T>() + b * urow,
                item.const_data_ptr<T>() + b * L * d,
                item_sim.const_data_ptr<T>() + b * L * d,
                mask.has_value() ? mask->const_data_ptr<bool>() + b * L : nullptr,
                L,
                d,
                per_pos ? d : 0};
}

void check_inputs(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                  const at::Tensor& item_sim, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(item.dim() == 3, "hae (cpu): item must be [B, L, d], got ", item.sizes());
  TORCH_CHECK(item_sim.sizes() == item.sizes(), "hae (cpu): item_sim must match item ", item.sizes(),
              ", got ", item_sim.sizes());
  TORCH_CHECK(user.dim() == 2 || user.dim() == 3, "hae (cpu): user must be [B, d] or [B, L, d]");
  TORCH_CHECK(user_sim.sizes() == user.sizes(), "hae (cpu): user_sim must match user ", user.sizes());
  TORCH_CHECK(user.size(0) == item.size(0) && user.size(-1) == item.size(2) &&
                  (user.dim() == 2 || user.size(1) == item.size(1)),
              "hae (cpu): user ", user.sizes(), " does not fit item ", item.sizes());
  for (const at::Tensor* t : {&user, &user_sim, &item, &item_sim}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == item.scalar_type(),
                "hae (cpu): inputs must be contiguous CPU tensors of one dtype");
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == item.size(0) && mask->size(1) == item.size(1),
                "hae (cpu): mask must be a contiguous bool [B, L] tensor");
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                  const at::Tensor& item_sim, const c10::optional<at::Tensor>& mask, bool softmax,
                  at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = item.size(0), L = item.size(1), d = item.size(2);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> gates(3 * L);
    for (int64_t b = b0; b < b1; ++b) {
      const Row<scalar_t> r = make_row<scalar_t>(user, user_sim, item, item_sim, mask, b);
      row_logits(r, gates.data());
      logits_to_gates(r, softmax, gates.data());
      for (int64_t l = 0; l < L; ++l) {
        scalar_t* o = out_p + (b * L + l) * 4 * d;
        const scalar_t* i = r.it_at(l);
        const scalar_t* is = r.is_at(l);
        const acc_t a_self = gates[3 * l], a_sim = gates[3 * l + 1], a_glob = gates[3 * l + 2];
        const bool real = r.real(l);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          const acc_t vi = real ? static_cast<acc_t>(i[k]) : acc_t(0);
          const acc_t vs = real ? static_cast<acc_t>(is[k]) : acc_t(0);
          o[k] = static_cast<scalar_t>(a_self * vi);
          o[d + k] = static_cast<scalar_t>(a_sim * vs);
          o[2 * d + k] = static_cast<scalar_t>(a_glob * vi);
          o[3 * d + k] = static_cast<scalar_t>(a_glob * vs);
        }
      }
    }
  });
}

at::Tensor holistic_attention_forward_cpu(const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
                           const at::Tensor& item_sim, const c10::optional<at::Tensor>& mask, bool softmax) {
  check_inputs(user, user_sim, item, item_sim, mask);
  const int64_t B = item.size(0), L = item.size(1), d = item.size(2);
  at::Tensor out = at::empty({B, L, 4 * d}, item.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item.scalar_type(), "holistic_attention_forward_cpu", [&] {
    forward_impl<scalar_t>(user, user_sim, item, item_sim, mask, softmax, out);
  });
  return out;
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& user, const at::Tensor& user_sim,
                   const at::Tensor& item, const at::Tensor& item_sim, const c10::optional<at::Tensor>& mask,
                   bool softmax, at::Tensor& g_user, at::Tensor& g_user_sim, at::Tensor& g_item,
                   at::Tensor& g_item_sim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = item.size(0), L = item.size(1), d = item.size(2);
  const bool per_pos = user.dim() == 3;
  const acc_t c1 = acc_t(1) / std::sqrt(acc_t(d));
  const acc_t c2 = acc_t(1) / std::sqrt(acc_t(2 * d));
  const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gu_p = g_user.data_ptr<scalar_t>();
  scalar_t* gus_p = g_user_sim.data_ptr<scalar_t>();
  scalar_t* gi_p = g_item.data_ptr<scalar_t>();
  scalar_t* gis_p = g_item_sim.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> gates(3 * L), dgate(3 * L), acc_u(per_pos ? 0 : d), acc_us(per_pos ? 0 : d);
    for (int64_t b = b0; b < b1; ++b) {
      const Row<scalar_t> r = make_row<scalar_t>(user, user_sim, item, item_sim, mask, b);
      row_logits(r, gates.data());
      logits_to_gates(r, softmax, gates.data());
      // Pass 1: upstream gradient of each gate, da = <g_branch, value> (0 at masked positions,
      // whose values are never read: padding may hold anything, NaN included).
      for (int64_t l = 0; l < L; ++l) {
        if (!r.real(l)) {
          dgate[3 * l] = dgate[3 * l + 1] = dgate[3 * l + 2] = acc_t(0);
          continue;
        }
        const scalar_t* g = g_p + (b * L + l) * 4 * d;
        dgate[3 * l + 0] = dot<scalar_t, acc_t>(g, r.it_at(l), d);
        dgate[3 * l + 1] = dot<scalar_t, acc_t>(g + d, r.is_at(l), d);
        dgate[3 * l + 2] =
            dot<scalar_t, acc_t>(g + 2 * d, r.it_at(l), d) + dot<scalar_t, acc_t>(g + 3 * d, r.is_at(l), d);
      }
      // Gate gradient -> logit gradient, in place in dgate.
      if (softmax) {
        for (int x = 0; x < 3; ++x) {
          acc_t dot_ad = 0;
          for (int64_t l = 0; l < L; ++l) dot_ad += gates[3 * l + x] * dgate[3 * l + x];
          for (int64_t l = 0; l < L; ++l) dgate[3 * l + x] = gates[3 * l + x] * (dgate[3 * l + x] - dot_ad);
        }
      } else {
        for (int64_t l = 0; l < 3 * L; ++l) dgate[l] *= gates[l] * (acc_t(1) - gates[l]);
      }
      if (!per_pos) {
        std::fill(acc_u.begin(), acc_u.end(), acc_t(0));
        std::fill(acc_us.begin(), acc_us.end(), acc_t(0));
      }
      // Pass 2: gradients of the values and, through s1/s2, of the users.
      for (int64_t l = 0; l < L; ++l) {
        const int64_t off = (b * L + l) * d;
        const scalar_t* g = g_p + off * 4;
        const scalar_t* i = r.it_at(l);
        const scalar_t* is = r.is_at(l);
        const scalar_t* u = r.u_at(l);
        const scalar_t* us = r.us_at(l);
        scalar_t* gi = gi_p + off;
        scalar_t* gis = gis_p + off;
        if (!r.real(l)) {  // masked: exact zero gradients, nothing read
          std::fill(gi, gi + d, scalar_t(0));
          std::fill(gis, gis + d, scalar_t(0));
          if (per_pos) {
            std::fill(gu_p + off, gu_p + off + d, scalar_t(0));
            std::fill(gus_p + off, gus_p + off + d, scalar_t(0));
          }
          continue;
        }
        const acc_t a_self = gates[3 * l], a_sim = gates[3 * l + 1], a_glob = gates[3 * l + 2];
        const acc_t ds1 = dgate[3 * l] * c1 + dgate[3 * l + 2] * c2;
        const acc_t ds2 = dgate[3 * l + 1] * c1 + dgate[3 * l + 2] * c2;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          const acc_t g1 = g[k], g2 = g[d + k], g3 = g[2 * d + k], g4 = g[3 * d + k];
          gi[k] = static_cast<scalar_t>(a_self * g1 + a_glob * g3 + ds1 * static_cast<acc_t>(u[k]));
          gis[k] = static_cast<scalar_t>(a_sim * g2 + a_glob * g4 + ds2 * static_cast<acc_t>(us[k]));
        }
        if (per_pos) {
          scalar_t* gu = gu_p + off;
          scalar_t* gus = gus_p + off;
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            gu[k] = static_cast<scalar_t>(ds1 * static_cast<acc_t>(i[k]));
            gus[k] = static_cast<scalar_t>(ds2 * static_cast<acc_t>(is[k]));
          }
        } else {
          acc_t* au = acc_u.data();
          acc_t* aus = acc_us.data();
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            au[k] += ds1 * static_cast<acc_t>(i[k]);
            aus[k] += ds2 * static_cast<acc_t>(is[k]);
          }
        }
      }
      if (!per_pos) {
        for (int64_t k = 0; k < d; ++k) {
          gu_p[b * d + k] = static_cast<scalar_t>(acc_u[k]);
          gus_p[b * d + k] = static_cast<scalar_t>(acc_us[k]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> holistic_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& user, const at::Tensor& user_sim, const at::Tensor& item,
    const at::Tensor& item_sim, const c10::optional<at::Tensor>& mask, bool softmax) {
  check_inputs(user, user_sim, item, item_sim, mask);
  const int64_t B = item.size(0), L = item.size(1), d = item.size(2);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, L, 4 * d}) && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == item.scalar_type(),
              "hae (cpu): grad_out must be a contiguous [B, L, 4d] tensor of the inputs' dtype");
  at::Tensor g_user = at::empty_like(user), g_user_sim = at::empty_like(user_sim);
  at::Tensor g_item = at::empty_like(item), g_item_sim = at::empty_like(item_sim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item.scalar_type(), "holistic_attention_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_out, user, user_sim, item, item_sim, mask, softmax, g_user, g_user_sim,
                            g_item, g_item_sim);
  });
  return {g_user, g_user_sim, g_item, g_item_sim};
}

}  // namespace

TORCH_LIBRARY_IMPL(grasp, CPU, m) {
  m.impl("holistic_attention_forward", &holistic_attention_forward_cpu);
  m.impl("holistic_attention_backward", &holistic_attention_backward_cpu);
}

}  // namespace grasp
