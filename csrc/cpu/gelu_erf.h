// The exact (erf) GELU as straight-line float32 code that GCC and Clang vectorise, for the CPU kernels that
// evaluate it inside their own loops (score_topk). float64 calls std::erf.
//
// erf(x), by |x| (sign restored at the end):
//   |x| < 1:       x P(x^2), P of degree 6;
//   1 <= |x| < 4:  1 - exp(-x^2) R(s), s = (|x| - 2.5) / 1.5, R of degree 10 approximating erfcx(x) =
//                  exp(x^2) erfc(x) (relative error 1.5e-7 where erfc <= 0.16), exp(-x^2) = 2^n exp(r) with
//                  |r| <= ln2 / 2 (Cody-Waite reduction) and a degree-6 polynomial for exp(r);
//   |x| >= 4:      the second form at x = 4, which rounds to 1 in float32 (erfc(4) = 1.5e-8).
// The polynomials are least-squares fits with Lawson reweighting (near-minimax) made for this file from
// float64 reference values (relative errors 1.2e-9, 1.5e-7, 1.9e-9). Over h in [-14, 14] the float32 GELU
// 0.5 h (1 + erf(h / sqrt(2))) is within 5 float32 ulps of |h| / 2 of the exact one (ATen's float32 GELU:
// 11.8). Every step is data-independent (both forms computed, an integer-mask select, integer min for the
// clamps), so no branch keeps the vectoriser from AVX2 or SSE, and every lane rounds alike: equal inputs
// give equal outputs wherever they sit in a vector.
#pragma once

#include <cmath>
#include <cstdint>

namespace grasp {
// Internal linkage: every kernel file gets its own copy.
namespace {

#define GRASP_ALWAYS_INLINE inline __attribute__((always_inline))

// min(a, bound) of a non-negative float (NaN gives bound): non-negative floats order as their bit patterns,
// and an integer min is a plain select that no branch is made of.
GRASP_ALWAYS_INLINE float min_nonnegative(float a, float bound) {
  const int32_t ia = __builtin_bit_cast(int32_t, a), ib = __builtin_bit_cast(int32_t, bound);
  return __builtin_bit_cast(float, ia < ib ? ia : ib);
}

// The coefficients, lowest degree first.
constexpr float kErfSmall[] = {1.1283791065216064f,    -0.3761262595653534f,   0.1128358542919159f,
                               -0.026853810995817184f, 0.00518832728266716f,   -0.000801019137725234f,
                               7.853854913264513e-05f};
constexpr float kErfcx[] = {0.21080636978149414f,   -0.11152136325836182f,   0.056110333651304245f,
                            -0.026998288929462433f, 0.012489143759012222f,   -0.005609941203147173f,
                            0.002411345951259136f,  -0.0009180224733427167f, 0.0003846925974357873f,
                            -0.0002443996199872345f, 8.96092169568874e-05f};
constexpr float kExp[] = {1.0f, 1.0f, 0.49999991059303284f, 0.16666419804096222f, 0.04166822507977486f,
                          0.008374815806746483f, 0.0013836845755577087f};

// c[0] + c[1] x + ... + c[N-1] x^(N-1) by Horner's rule (the loop unrolls into N - 1 multiply-adds).
template <int N>
GRASP_ALWAYS_INLINE float polynomial(float x, const float (&c)[N]) {
  float r = c[N - 1];
  for (int i = N - 2; i >= 0; --i) r = r * x + c[i];
  return r;
}

GRASP_ALWAYS_INLINE float erf_approx(float x) {
  const float ax = std::fabs(x);
  // |x| < 1: x P(x^2).
  const float xa = min_nonnegative(ax, 1.0f);
  const float small = xa * polynomial(xa * xa, kErfSmall);
  // 1 <= |x|: 1 - exp(-x^2) R(s) at x clamped to 4, s = (x - 2.5) / 1.5.
  const float xb = min_nonnegative(ax, 4.0f);
  const float erfcx = polynomial(xb * (1.0f / 1.5f) - (2.5f / 1.5f), kErfcx);
  // exp(a), a = -x^2 in [-16, 0]: n = round(a / ln2) read from the low mantissa bits of a + 1.5 * 2^23.
  const float a = -(xb * xb);
  const float shifted = a * 1.4426950408889634f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (a - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 in two parts
  const int32_t two_n = (__builtin_bit_cast(int32_t, shifted) - 0x4B400000 + 127) << 23;  // the bits of 2^n
  const float large = 1.0f - polynomial(r, kExp) * __builtin_bit_cast(float, two_n) * erfcx;
  const int32_t take_small = -static_cast<int32_t>(ax < 1.0f);
  const int32_t bits = (__builtin_bit_cast(int32_t, small) & take_small) |
                       (__builtin_bit_cast(int32_t, large) & ~take_small);
  return std::copysign(__builtin_bit_cast(float, bits), x);
}

GRASP_ALWAYS_INLINE float gelu_erf(float h) { return 0.5f * h * (1.0f + erf_approx(h * 0.70710678118654752f)); }

GRASP_ALWAYS_INLINE double gelu_erf(double h) { return 0.5 * h * (1.0 + std::erf(h * 0.70710678118654752440)); }

#undef GRASP_ALWAYS_INLINE

}  // namespace
}  // namespace grasp
