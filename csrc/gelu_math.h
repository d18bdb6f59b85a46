// The GELU pieces of the CPU kernels (csrc/dwconv_gelu_gate.cpp): the normal CDF and density
// in float without library calls or branches, so that the loops over a plane vectorise.
//
// Plain C++17 without torch headers: torch 2.11 builds extensions as C++17 and torch 2.14 as
// C++20, so nothing here (or in any csrc file) may need C++20; tests/csrc compiles this header
// with -std=c++17 on its own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace moce {
namespace gelu_math {

// std::bit_cast (C++20) for C++17: the bits of `from` as a `To`; compilers turn the memcpy into
// a register move, so the loops that use it still vectorise.
template <typename To, typename From>
__attribute__((always_inline)) inline To bit_cast17(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast17 needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// --- the GELU pieces ---------------------------------------------------------------------------
//
// float: no library calls and no branches, so the loops over a plane vectorise (a call of
// glibc's erff alone costs ~8 ns, about three times the whole vectorised forward per output
// pixel). Checked against double over [-20, 20]: gelu and gelu' within 2.1e-7 (absolute), Phi
// within 3.6e-6 (relative) for a > -6. double: the C library.

// e^x for float x <= 0 (a tiny positive x is fine too): Cody-Waite reduction x = n ln 2 + r,
// |r| <= ln 2 / 2, Cephes' expf polynomial (relative error ~1e-7), 2^n from the exponent bits.
// x is clamped to >= -87 so that 2^n stays a normal number (the callers need no results below
// ~1.6e-38), on its bits: for x <= 0 a larger magnitude is a larger unsigned pattern. A float
// clamp (std::max) gets turned into branches that keep the loops scalar.
__attribute__((always_inline)) inline float exp_approx(float x) {
  x = bit_cast17<float>(std::min(bit_cast17<uint32_t>(x), bit_cast17<uint32_t>(-87.0f)));
  // Adding 1.5 * 2^23 rounds x / ln 2 to an integer, which lands in the low mantissa bits.
  constexpr float kShift = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + kShift;
  const float n = shifted - kShift;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const uint32_t n_bits = bit_cast17<uint32_t>(shifted) - bit_cast17<uint32_t>(kShift);
  return p * bit_cast17<float>((n_bits + 127u) << 23);
}

// Phi(a) = 0.5 * erfc(-a / sqrt(2)), so gelu(a) = a * Phi(a). float: erfc(z), z >= 0, by
// Numerical Recipes' Chebyshev fit (erfcc: relative error < 1.2e-7 for every z), and Phi from
// it on either side of 0: Phi keeps its relative accuracy in the negative tail, where
// 1 + erf(a / sqrt(2)) would cancel.
__attribute__((always_inline)) inline float normal_cdf(float a) {
  const float z = std::fabs(a) * 0.707106781186547524f;
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float half_erfc = 0.5f * t * exp_approx(p - z * z);
  const float upper = 1.0f - half_erfc;
  // half_erfc where a's sign bit is set, else upper, as a bit select: with FP traps enabled
  // (GCC's default) a ?: of floats is not if-converted and the loop would stay scalar.
  const uint32_t negative = 0u - (bit_cast17<uint32_t>(a) >> 31);
  return bit_cast17<float>((bit_cast17<uint32_t>(half_erfc) & negative) |
                              (bit_cast17<uint32_t>(upper) & ~negative));
}

inline double normal_cdf(double a) { return 0.5 * std::erfc(-a * 0.707106781186547524); }

// phi(a) = exp(-a^2 / 2) / sqrt(2 pi).
__attribute__((always_inline)) inline float normal_pdf(float a) {
  return 0.398942280401432678f * exp_approx(-0.5f * a * a);
}

inline double normal_pdf(double a) { return 0.398942280401432678 * std::exp(-0.5 * a * a); }

}  // namespace gelu_math
}  // namespace moce
