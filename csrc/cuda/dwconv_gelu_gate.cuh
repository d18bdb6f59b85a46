// CUDA kernel bodies of dwconv_gelu_gate (the GDFN's depthwise convolution fused with
// gelu(a) * b; schemas, semantics and the CPU kernels in csrc/dwconv_gelu_gate.cpp).
//
// The tiles are grouped_dwconv's (grouped_dwconv.cuh): a block computes one kTileH x kTileW tile
// of one plane, staging its input plus a halo in shared memory (stage_tile, zeros outside the
// image, 128-bit loads when the rows allow), and each thread convolves kRowsPerThread vertically
// adjacent pixels of one column (conv_column_k) and stores them (store_column). Their
// dwconv::Geometry and block_pos decode the block index with C = the planes per image the grid
// runs over (Ch gate channels, or the 2 * Ch channels of x), and k_max = K.
//
// Forward: one block per (image n, gate channel c, tile) stages x[n, c] and x[n, c + Ch] (x is
// read once), convolves both and writes y = gelu(a) * b: the 2 * Ch-channel convolution output
// never goes to memory.
//
// Backward, three kernels:
//   1. dwconv_gelu_gate_bwd_gate_kernel: per (n, c, tile) as the forward, recomputes a and b and
//      writes grad_u[n, c] = grad_y * b * gelu'(a) and grad_u[n, c + Ch] = grad_y * gelu(a) into
//      a [B, 2 * Ch, H, W] buffer in the accumulation type (float32 for half / bfloat16 inputs:
//      the gradient is not rounded to the input dtype on its way).
//   2. dwconv_gelu_gate_bwd_conv_kernel: per (n, channel of 2 * Ch, tile), grouped_dwconv's
//      backward on grad_u: grad_x as the correlation with the flipped kernel, and the tile's
//      partial sums of the weight and bias gradients (one warp per tap, a fixed shuffle tree).
//   3. dwconv_gelu_gate_bwd_weight_kernel: per channel, the partials summed over the images and
//      tiles in a fixed order. No atomics: the same bits on every run.
// Fusing 1 into 2 would need the halo of grad_u, i.e. a and b on a halo, i.e. x on a double halo
// (recomputed by neighbouring blocks); the buffer keeps the tiles grouped_dwconv's.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common.cuh"
#include "grouped_dwconv.cuh"

namespace moce::cuda::gate {

using dwconv::BlockPos;
using dwconv::Geometry;
using dwconv::kRowsPerThread;
using dwconv::kThreads;
using dwconv::kTileW;
using dwconv::TileShape;

// Phi(a), the standard normal CDF = 0.5 * erfc(-a / sqrt(2)): gelu(a) = a * Phi(a) (normcdf
// keeps its relative accuracy in the negative tail, where 1 + erf(a / sqrt(2)) would cancel).
__device__ __forceinline__ float normal_cdf(float a) { return normcdff(a); }
__device__ __forceinline__ double normal_cdf(double a) { return normcdf(a); }

// phi(a) = exp(-a^2 / 2) / sqrt(2 pi), the normal density: gelu'(a) = Phi(a) + a * phi(a).
__device__ __forceinline__ float normal_pdf(float a) { return 0.398942280401432678f * expf(-0.5f * a * a); }
__device__ __forceinline__ double normal_pdf(double a) { return 0.398942280401432678 * exp(-0.5 * a * a); }

// a and b (bias included) at this thread's kRowsPerThread pixels of gate channel p.c, from
// x[n, c] and x[n, c + Ch] staged in tile_a / tile_b. It synchronises the block: every thread
// calls it.
template <typename T, typename acc_t, int VEC, int KC>
__device__ __forceinline__ void gate_inputs(const T* __restrict__ x, const T* __restrict__ weight,
                                            const T* __restrict__ bias, const Geometry& g, const BlockPos& p,
                                            acc_t* __restrict__ tile_a, acc_t* __restrict__ tile_b,
                                            acc_t* __restrict__ taps_a, acc_t* __restrict__ taps_b, int row0,
                                            int col, acc_t (&a)[kRowsPerThread], acc_t (&b)[kRowsPerThread]) {
  const int K = g.k_max;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t ch_a = p.c;
  const int64_t ch_b = p.c + g.C;
  if (tid < K * K) {
    taps_a[tid] = static_cast<acc_t>(weight[ch_a * K * K + tid]);
    taps_b[tid] = static_cast<acc_t>(weight[ch_b * K * K + tid]);
  }
  const int64_t plane = g.H * g.W;
  const T* xa = x + (p.n * 2 * g.C + ch_a) * plane;
  dwconv::stage_tile<T, acc_t, VEC, KC>(tile_a, xa, g.H, g.W, p.h0, p.w0);
  dwconv::stage_tile<T, acc_t, VEC, KC>(tile_b, xa + g.C * plane, g.H, g.W, p.h0, p.w0);
  __syncthreads();
  const acc_t bias_a = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[ch_a]);
  const acc_t bias_b = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[ch_b]);
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    a[q] = bias_a;
    b[q] = bias_b;
  }
  dwconv::conv_column_k<T, KC>(K, tile_a, taps_a, row0, col, a);
  dwconv::conv_column_k<T, KC>(K, tile_b, taps_b, row0, col, b);
}

// y[n, c] = gelu(a) * b over one tile. Grid: B * Ch * tiles blocks (g.C = Ch).
template <typename T, typename acc_t, int VEC, int KC>
__global__ void __launch_bounds__(kThreads)
    dwconv_gelu_gate_fwd_kernel(const T* __restrict__ x,       // [B, 2 Ch, H, W]
                                const T* __restrict__ weight,  // [2 Ch, K, K]
                                const T* __restrict__ bias,    // [2 Ch] or nullptr
                                T* __restrict__ y,             // [B, Ch, H, W]
                                Geometry g) {
  using Shape = TileShape<T, KC>;
  __shared__ __align__(16) acc_t tile_a[Shape::kSize];
  __shared__ __align__(16) acc_t tile_b[Shape::kSize];
  __shared__ acc_t taps_a[KC * KC];
  __shared__ acc_t taps_b[KC * KC];
  const BlockPos p = dwconv::block_pos(g);  // p.plane = n * Ch + c: y's plane
  const int col = static_cast<int>(threadIdx.x) % kTileW;
  const int row0 = (static_cast<int>(threadIdx.x) / kTileW) * kRowsPerThread;
  acc_t a[kRowsPerThread];
  acc_t b[kRowsPerThread];
  gate_inputs<T, acc_t, VEC, KC>(x, weight, bias, g, p, tile_a, tile_b, taps_a, taps_b, row0, col, a, b);
  acc_t out[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) out[q] = a[q] * normal_cdf(a[q]) * b[q];
  dwconv::store_column<T, acc_t>(y + p.plane * g.H * g.W, g.H, g.W, p.h0 + row0, p.w0 + col, out);
}

// grad_u[n, c] = grad_y * b * gelu'(a), grad_u[n, c + Ch] = grad_y * gelu(a) over one tile.
// Grid: B * Ch * tiles blocks (g.C = Ch).
template <typename T, typename acc_t, int VEC, int KC>
__global__ void __launch_bounds__(kThreads)
    dwconv_gelu_gate_bwd_gate_kernel(const T* __restrict__ grad_y,  // [B, Ch, H, W]
                                     const T* __restrict__ x,       // [B, 2 Ch, H, W]
                                     const T* __restrict__ weight,  // [2 Ch, K, K]
                                     const T* __restrict__ bias,    // [2 Ch] or nullptr
                                     acc_t* __restrict__ grad_u,    // [B, 2 Ch, H, W]
                                     Geometry g) {
  using Shape = TileShape<T, KC>;
  __shared__ __align__(16) acc_t tile_a[Shape::kSize];
  __shared__ __align__(16) acc_t tile_b[Shape::kSize];
  __shared__ acc_t taps_a[KC * KC];
  __shared__ acc_t taps_b[KC * KC];
  const BlockPos p = dwconv::block_pos(g);
  const int col = static_cast<int>(threadIdx.x) % kTileW;
  const int row0 = (static_cast<int>(threadIdx.x) / kTileW) * kRowsPerThread;
  acc_t a[kRowsPerThread];
  acc_t b[kRowsPerThread];
  gate_inputs<T, acc_t, VEC, KC>(x, weight, bias, g, p, tile_a, tile_b, taps_a, taps_b, row0, col, a, b);
  const int64_t plane = g.H * g.W;
  const int64_t h = p.h0 + row0;
  const int64_t w = p.w0 + col;
  const T* gy = grad_y + p.plane * plane;
  acc_t grad_a[kRowsPerThread];
  acc_t grad_b[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const acc_t gq = (w < g.W && h + q < g.H) ? static_cast<acc_t>(gy[(h + q) * g.W + w]) : acc_t(0);
    const acc_t cdf = normal_cdf(a[q]);
    grad_a[q] = gq * b[q] * (cdf + a[q] * normal_pdf(a[q]));
    grad_b[q] = gq * (a[q] * cdf);
  }
  acc_t* ga = grad_u + (p.n * 2 * g.C + p.c) * plane;
  dwconv::store_column<acc_t, acc_t>(ga, g.H, g.W, h, w, grad_a);
  dwconv::store_column<acc_t, acc_t>(ga + g.C * plane, g.H, g.W, h, w, grad_b);
}

// grad_x of one tile of plane (n, ch), ch < 2 Ch, and partial[(plane * tiles + tile) *
// taps_stride + t]: the tile's sum of grad_u * x shifted by tap t = i * K + j (t < K * K) and of
// grad_u (t = K * K = taps_stride - 1). Grid: B * 2 Ch * tiles blocks (g.C = 2 Ch).
// grouped_dwconv_bwd_kernel's body, with grad_u in the accumulation type (its own tile shape).
template <typename T, typename acc_t, int VEC, int GRAD_VEC, int KC>
__global__ void __launch_bounds__(kThreads)
    dwconv_gelu_gate_bwd_conv_kernel(const acc_t* __restrict__ grad_u,  // [B, 2 Ch, H, W]
                                     const T* __restrict__ x,           // [B, 2 Ch, H, W]
                                     const T* __restrict__ weight,      // [2 Ch, K, K]
                                     T* __restrict__ grad_x,            // [B, 2 Ch, H, W]
                                     acc_t* __restrict__ partial,       // [B * 2 Ch * tiles, taps_stride]
                                     Geometry g, int taps_stride) {
  using XShape = TileShape<T, KC>;
  using GShape = TileShape<acc_t, KC>;
  __shared__ __align__(16) acc_t tile_x[XShape::kSize];
  __shared__ __align__(16) acc_t tile_g[GShape::kSize];
  __shared__ acc_t flipped[KC * KC];
  const BlockPos p = dwconv::block_pos(g);  // p.plane = n * 2 Ch + ch, p.c = ch
  const int tid = static_cast<int>(threadIdx.x);
  const int col = tid % kTileW;
  const int row0 = (tid / kTileW) * kRowsPerThread;
  const int K = g.k_max;
  const int P = K / 2;
  const int64_t plane = g.H * g.W;
  // grad_x is the "full" correlation of grad_u with the kernel flipped in both axes.
  if (tid < K * K) flipped[K * K - 1 - tid] = static_cast<acc_t>(weight[p.c * K * K + tid]);
  dwconv::stage_tile<T, acc_t, VEC, KC>(tile_x, x + p.plane * plane, g.H, g.W, p.h0, p.w0);
  dwconv::stage_tile<acc_t, acc_t, GRAD_VEC, KC>(tile_g, grad_u + p.plane * plane, g.H, g.W, p.h0, p.w0);
  __syncthreads();

  acc_t out[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) out[q] = acc_t(0);
  dwconv::conv_column_k<acc_t, KC>(K, tile_g, flipped, row0, col, out);
  dwconv::store_column<T, acc_t>(grad_x + p.plane * plane, g.H, g.W, p.h0 + row0, p.w0 + col, out);

  // Weight partials: warp w takes taps w, w + kWarps, ...; lane l sums column l of the tile
  // over its kTileH rows (grad_u is 0 outside the plane, so out-of-plane pixels add nothing).
  acc_t* part = partial + static_cast<int64_t>(blockIdx.x) * taps_stride;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int taps = K * K;
  const acc_t* g_col = tile_g + GShape::kHaloH * GShape::kCols + GShape::kHaloW + lane;
  for (int t = warp; t < taps_stride; t += dwconv::kWarps) {
    acc_t sum = acc_t(0);
    if (t < taps) {
      const int i = t / K;
      const int j = t - i * K;
      const acc_t* x_col = tile_x + (XShape::kHaloH - P + i) * XShape::kCols + XShape::kHaloW - P + j + lane;
#pragma unroll 8
      for (int r = 0; r < dwconv::kTileH; ++r) sum += g_col[r * GShape::kCols] * x_col[r * XShape::kCols];
    } else {
#pragma unroll 8
      for (int r = 0; r < dwconv::kTileH; ++r) sum += g_col[r * GShape::kCols];
    }
    sum = warp_sum(sum);
    if (lane == 0) part[t] = sum;
  }
}

// grad_weight[ch] and grad_bias[ch] (0 without a bias): one block per channel ch < 2 Ch; each
// thread adds one tap's partials over the images and tiles, in that fixed order.
template <typename T, typename acc_t>
__global__ void dwconv_gelu_gate_bwd_weight_kernel(const acc_t* __restrict__ partial,  // [B * 2 Ch * tiles, taps]
                                                   T* __restrict__ grad_w,              // [2 Ch, K, K]
                                                   T* __restrict__ grad_b,              // [2 Ch]
                                                   Geometry g, int taps_stride, bool has_bias) {
  const int64_t ch = blockIdx.x;
  const int taps = taps_stride - 1;
  for (int t = static_cast<int>(threadIdx.x); t < taps_stride; t += blockDim.x) {
    acc_t sum = acc_t(0);
    if (t < taps || has_bias) {
      for (int64_t n = 0; n < g.N; ++n) {
        const acc_t* rows = partial + (n * g.C + ch) * g.tiles * taps_stride + t;
        for (int64_t tile = 0; tile < g.tiles; ++tile) sum += rows[tile * taps_stride];
      }
    }
    if (t < taps) {
      grad_w[ch * taps + t] = static_cast<T>(sum);
    } else {
      grad_b[ch] = static_cast<T>(sum);
    }
  }
}

}  // namespace moce::cuda::gate
