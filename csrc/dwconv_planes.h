// Depthwise-convolution plane loops shared by the CPU kernels of grouped_dwconv and
// dwconv_gelu_gate: zero-padded accumulation-type planes, K-specialised convolution and
// weight-gradient bodies, and the ISA clone attribute of the functions that call them.
#pragma once

#include <algorithm>
#include <cstdint>

#include "check.h"

namespace moce::dwconv_planes {

// A plane of the input, in the accumulation type, with a zero border of P = K / 2 on every side:
// [H + 2P, W + 2P], so the convolution loops need no bounds checks.
template <typename scalar_t, typename acc_t>
void pad_plane(const scalar_t* src, acc_t* dst, int64_t H, int64_t W, int64_t P) {
  const int64_t PW = W + 2 * P;
  std::fill_n(dst, P * PW, acc_t(0));
  for (int64_t h = 0; h < H; ++h) {
    acc_t* row = dst + (h + P) * PW;
    std::fill_n(row, P, acc_t(0));
    const scalar_t* s = src + h * W;
    for (int64_t w = 0; w < W; ++w) row[P + w] = static_cast<acc_t>(s[w]);
    std::fill_n(row + P + W, P, acc_t(0));
  }
  std::fill_n(dst + (H + P) * PW, P * PW, acc_t(0));
}

// The hot loops work on accumulation-type planes only (float or double), so they can be
// compiled twice: for AVX2 + FMA and for the baseline ISA, picked at load time (GCC function
// multiversioning; the extension is built without -march flags). Every call of one process runs
// the same clone: the results do not depend on the thread count.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define MOCE_ISA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MOCE_ISA_CLONES
#endif

// out[h, w] = bias + sum_{i, j < K} taps[i * K + j] * padded[h + i, w + j] over an H x W plane.
template <int K, typename acc_t>
__attribute__((always_inline)) inline void conv_plane_k(const acc_t* padded, const acc_t* taps, acc_t bias,
                                                        acc_t* out, int64_t H, int64_t W) {
  const int64_t PW = W + K - 1;
  for (int64_t h = 0; h < H; ++h) {
    acc_t* o = out + h * W;
    std::fill_n(o, W, bias);
    for (int i = 0; i < K; ++i) {
      const acc_t* src = padded + (h + i) * PW;
      acc_t t[K];
      for (int j = 0; j < K; ++j) t[j] = taps[i * K + j];
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) {
        acc_t s = o[w];
        for (int j = 0; j < K; ++j) s += t[j] * src[w + j];
        o[w] = s;
      }
    }
  }
}

// partial[i * K + j] = sum_{h, w} grad[h, w] * padded_x[h + i, w + j]; partial[K * K] = sum grad.
// grad is the centre of a padded plane (row stride W + K - 1).
template <int K, typename acc_t>
__attribute__((always_inline)) inline void weight_grad_plane_k(const acc_t* padded_x,
                                                               const acc_t* padded_grad, acc_t* partial,
                                                               int64_t H, int64_t W) {
  constexpr int P = K / 2;
  const int64_t PW = W + K - 1;
  acc_t sums[K * K + 1] = {};
  for (int64_t h = 0; h < H; ++h) {
    const acc_t* g = padded_grad + (h + P) * PW + P;
    acc_t row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t w = 0; w < W; ++w) row_sum += g[w];
    sums[K * K] += row_sum;
    for (int i = 0; i < K; ++i) {
      const acc_t* src = padded_x + (h + i) * PW;
      for (int j = 0; j < K; ++j) {
        acc_t d = 0;
#pragma omp simd reduction(+ : d)
        for (int64_t w = 0; w < W; ++w) d += g[w] * src[w + j];
        sums[i * K + j] += d;
      }
    }
  }
  std::copy_n(sums, K * K + 1, partial);
}

// The kernel size picks a K-specialised body (unrolled taps, vectorised pixel loops); always
// inlined, so the bodies are compiled for the ISA of the clone that calls them.
template <typename acc_t>
__attribute__((always_inline)) inline void conv_plane_any(int64_t K, const acc_t* padded, const acc_t* taps,
                                                          acc_t bias, acc_t* out, int64_t H, int64_t W) {
  switch (K) {
    case 1:
      return conv_plane_k<1>(padded, taps, bias, out, H, W);
    case 3:
      return conv_plane_k<3>(padded, taps, bias, out, H, W);
    case 5:
      return conv_plane_k<5>(padded, taps, bias, out, H, W);
    case 7:
      return conv_plane_k<7>(padded, taps, bias, out, H, W);
    case 9:
      return conv_plane_k<9>(padded, taps, bias, out, H, W);
    default:
      MOCE_CHECK(false, "moce: unsupported depthwise kernel size ", K);
  }
}

template <typename acc_t>
__attribute__((always_inline)) inline void weight_grad_plane_any(int64_t K, const acc_t* padded_x,
                                                                 const acc_t* padded_grad, acc_t* partial,
                                                                 int64_t H, int64_t W) {
  switch (K) {
    case 1:
      return weight_grad_plane_k<1>(padded_x, padded_grad, partial, H, W);
    case 3:
      return weight_grad_plane_k<3>(padded_x, padded_grad, partial, H, W);
    case 5:
      return weight_grad_plane_k<5>(padded_x, padded_grad, partial, H, W);
    case 7:
      return weight_grad_plane_k<7>(padded_x, padded_grad, partial, H, W);
    case 9:
      return weight_grad_plane_k<9>(padded_x, padded_grad, partial, H, W);
    default:
      MOCE_CHECK(false, "moce: unsupported depthwise kernel size ", K);
  }
}

}  // namespace moce::dwconv_planes
