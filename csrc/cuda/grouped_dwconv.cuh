// CUDA kernel bodies of grouped_dwconv (depthwise "same" convolutions of E experts on rows packed
// by expert; schemas, semantics and the CPU kernels in csrc/grouped_dwconv.cpp).
//
// Layout: x[n, c, h, w] of a contiguous [N, C_max, H, W] tensor; a (row n, channel c) pair is a
// "plane" of H * W pixels. Each block computes one kTileH x kTileW output tile of one plane: it
// finds the plane's expert from the offsets ON THE DEVICE (a scan over E + 1 values: the host
// never reads them), stages the input tile plus a halo of kHaloH rows / kHaloW columns (zero
// outside the image, so the taps need no bounds checks) in shared memory, in the accumulation
// type, with 128-bit loads when the rows allow it, and then each thread computes kRowsPerThread
// vertically adjacent outputs of one column (a warp covers 32 adjacent columns of a row: the
// shared-memory reads are conflict-free and the global stores coalesced).
//
// The backward kernel computes grad_x the same way (the correlation of grad_y with the flipped
// kernel) and, from the same two staged tiles, the tile's partial sums of the weight and bias
// gradients (one warp per tap, a fixed shuffle tree). dwconv_bwd_weight_kernel then adds the
// partials of each (expert, channel) over the expert's rows and tiles in a fixed order: no
// atomics, the same bits on every run.
//
// A row that no expert owns (offsets not rising from 0 to N: never the case for offsets from a
// RoutingPlan) gets NaN outputs and NaN grad_x, never an out-of-bounds access.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace moce::cuda::dwconv {

constexpr int kTileH = 32;
constexpr int kTileW = 32;
constexpr int kRowsPerThread = 4;
constexpr int kThreads = kTileW * (kTileH / kRowsPerThread);  // 256
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxK = 9;
constexpr int kMaxExperts = 64;

// Kernel classes: every kernel is compiled for a largest kernel size KC (3, 7 or kMaxK), and the
// host launches the smallest class that holds the call's largest kernel (kernel_class). A class
// stages a KC / 2-row halo and compiles only the loops of its sizes: fewer registers, more
// blocks per SM. ptxas, sm_90, 256 threads: 32-40 registers for the 3 x 3 class (the trunk's
// depthwise convolutions and the GDFN's: 6-8 blocks per SM), 58-66 for the 7 x 7 class (the
// cross-attention's and the experts' 7 x 7: 3-4), 64-76 for kernels up to 9 x 9 (3). Asking
// ptxas for 4 blocks of the 7 x 7 class (64 registers) spills 8-24 bytes, so it is not asked.
constexpr int kernel_class(int64_t largest) { return largest <= 3 ? 3 : (largest <= 7 ? 7 : kMaxK); }

// Column halo: at least KC / 2, and a multiple of the 16-byte vector width so every staged
// 16-byte chunk is either wholly inside or wholly outside a row whose width is a multiple of it.
template <typename T, int KC>
constexpr int halo_w() {
  constexpr int vec = 16 / static_cast<int>(sizeof(T));
  return (KC / 2 + vec - 1) / vec * vec;
}

template <typename T, int KC>
struct TileShape {
  static_assert(KC % 2 == 1 && KC <= kMaxK, "kernel classes are odd sizes up to kMaxK");
  static constexpr int kHaloH = KC / 2;
  static constexpr int kHaloW = halo_w<T, KC>();
  static constexpr int kRows = kTileH + 2 * kHaloH;
  static constexpr int kCols = kTileW + 2 * kHaloW;
  static constexpr int kSize = kRows * kCols;
};

// The largest of the experts' kernel sizes: the class follows the sizes in use, not the weight's
// K_max window (a 9 x 9 window of 3 x 3 experts takes the 3 x 3 class).
template <typename Sizes>
int64_t largest_kernel(const Sizes& kernel_sizes) {
  int64_t k = 1;
  for (const int64_t ks : kernel_sizes) k = ks > k ? ks : k;
  return k;
}

// Calls launch(std::integral_constant<int, KC>) with KC = kernel_class(largest), largest the
// call's largest kernel size.
template <typename Launch>
void with_kernel_class(int64_t largest, const Launch& launch) {
  switch (kernel_class(largest)) {
    case 3:
      launch(std::integral_constant<int, 3>{});
      break;
    case 7:
      launch(std::integral_constant<int, 7>{});
      break;
    default:
      launch(std::integral_constant<int, kMaxK>{});
      break;
  }
}

// Per-expert constants, passed by value (no host-to-device copy).
struct ExpertTable {
  int32_t channels[kMaxExperts];
  int32_t kernel_size[kMaxExperts];
};

// The expert owning row n: the e with offsets[e] <= n < offsets[e + 1], or -1 if none.
__device__ __forceinline__ int find_expert(const int64_t* __restrict__ offsets, int num_experts, int64_t n) {
  int64_t lo = offsets[0];
  for (int e = 0; e < num_experts; ++e) {
    const int64_t hi = offsets[e + 1];
    if (lo <= n && n < hi) return e;
    lo = hi;
  }
  return -1;
}

// dst[0 .. N) = v, as 16-byte shared-memory stores where the type allows (float, N % 4 == 0, dst
// 16-byte aligned). Scalar stores of a thread's 8 staged floats hit 4 of the 32 banks across a
// warp (rows of 48 floats, chunks of 8): an 8-way conflict per store, where the 128-bit stores
// conflict 2-way at most.
template <typename acc_t, int N>
__device__ __forceinline__ void store_staged(acc_t* __restrict__ dst, const acc_t (&v)[N]) {
  if constexpr (std::is_same<acc_t, float>::value && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = v[i];
  }
}

// Stage rows [h0 - kHaloH, h0 + kTileH + kHaloH) x columns [w0 - kHaloW, w0 + kTileW + kHaloW)
// (TileShape<T, KC>'s halo) of an H x W plane into s (kRows x kCols, accumulation type, 16-byte
// aligned), zeros outside the plane. With VEC > 1 the caller guarantees W % VEC == 0 and a
// 16-byte aligned plane.
template <typename T, typename acc_t, int VEC, int KC>
__device__ __forceinline__ void stage_tile(acc_t* __restrict__ s, const T* __restrict__ plane, int64_t H,
                                           int64_t W, int64_t h0, int64_t w0) {
  using Shape = TileShape<T, KC>;
  static_assert(Shape::kCols % VEC == 0 && Shape::kHaloW % VEC == 0, "tile columns must hold whole vectors");
  constexpr int kChunks = Shape::kCols / VEC;
  for (int idx = threadIdx.x; idx < Shape::kRows * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks;
    const int chunk = idx - r * kChunks;
    const int64_t gh = h0 - Shape::kHaloH + r;
    const int64_t gw = w0 - Shape::kHaloW + static_cast<int64_t>(chunk) * VEC;
    // 16-byte aligned for float with VEC % 4 == 0: kCols and chunk * VEC are multiples of VEC.
    acc_t* dst = s + r * Shape::kCols + chunk * VEC;
    const bool row_ok = gh >= 0 && gh < H;
    acc_t staged[VEC];
    if (row_ok && gw >= 0 && gw + VEC <= W) {
      const Pack<T, VEC> v = load_pack<T, VEC>(plane + gh * W + gw);
#pragma unroll
      for (int i = 0; i < VEC; ++i) staged[i] = static_cast<acc_t>(v.val[i]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t c = gw + i;
        staged[i] = (row_ok && c >= 0 && c < W) ? static_cast<acc_t>(plane[gh * W + c]) : acc_t(0);
      }
    }
    store_staged(dst, staged);
  }
}

// out[q] = sum_{i, j < K} taps[i * K + j] * s[row0 + q - P + i + kHaloH][col + kHaloW - P + j]
// for the kRowsPerThread outputs (row0 + q, col) of the tile (tile coordinates).
template <int K, typename T, int KC, typename acc_t>
__device__ __forceinline__ void conv_column(const acc_t* __restrict__ s, const acc_t* __restrict__ taps,
                                            int row0, int col, acc_t (&out)[kRowsPerThread]) {
  using Shape = TileShape<T, KC>;
  static_assert(K <= KC, "a kernel class holds the sizes up to its own");
  constexpr int P = K / 2;
  constexpr int kSpan = kRowsPerThread + K - 1;
  const acc_t* base = s + (row0 + Shape::kHaloH - P) * Shape::kCols + col + Shape::kHaloW - P;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    acc_t v[kSpan];
#pragma unroll
    for (int m = 0; m < kSpan; ++m) v[m] = base[m * Shape::kCols + j];
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const acc_t t = taps[i * K + j];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) out[q] += t * v[q + i];
    }
  }
}

// The K x K loop for a runtime K <= KC (odd: the host checks both). A class compiles only the
// loops of its sizes.
template <typename T, int KC, typename acc_t>
__device__ __forceinline__ void conv_column_k(int K, const acc_t* __restrict__ s,
                                              const acc_t* __restrict__ taps, int row0, int col,
                                              acc_t (&out)[kRowsPerThread]) {
  switch (K) {
    case 1:
      conv_column<1, T, KC>(s, taps, row0, col, out);
      break;
    case 3:
      conv_column<3, T, KC>(s, taps, row0, col, out);
      break;
    case 5:
      if constexpr (KC >= 5) conv_column<5, T, KC>(s, taps, row0, col, out);
      break;
    case 7:
      if constexpr (KC >= 7) conv_column<7, T, KC>(s, taps, row0, col, out);
      break;
    default:
      if constexpr (KC >= 9) conv_column<9, T, KC>(s, taps, row0, col, out);
      break;
  }
}

// Write this thread's kRowsPerThread outputs (column w, rows h .. h + kRowsPerThread - 1).
template <typename T, typename acc_t>
__device__ __forceinline__ void store_column(T* __restrict__ plane, int64_t H, int64_t W, int64_t h,
                                             int64_t w, const acc_t (&out)[kRowsPerThread]) {
  if (w >= W) return;
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    if (h + q < H) plane[(h + q) * W + w] = static_cast<T>(out[q]);
  }
}

// Fill this thread's part of a tile with one value (channels past the expert's width: 0; a row
// no expert owns: NaN).
template <typename T, typename acc_t>
__device__ __forceinline__ void fill_column(T* __restrict__ plane, int64_t H, int64_t W, int64_t h, int64_t w,
                                            acc_t value) {
  acc_t out[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) out[q] = value;
  store_column<T, acc_t>(plane, H, W, h, w, out);
}

struct Geometry {
  int64_t N, C, H, W;
  int64_t tiles_w, tiles;  // tiles per plane row, per plane
  int num_experts, k_max;
};

// Decoded block position: plane (n, c) and the tile's origin.
struct BlockPos {
  int64_t plane, n, c, h0, w0;
};

// In 32-bit arithmetic: the host caps the grid at 2^31 - 1 blocks, so the block index and every
// factor of it (planes, tiles) fit, and a 64-bit division costs several times a 32-bit one.
__device__ __forceinline__ BlockPos block_pos(const Geometry& g) {
  const uint32_t blk = blockIdx.x;
  const auto tiles = static_cast<uint32_t>(g.tiles);
  const auto channels = static_cast<uint32_t>(g.C);
  const auto tiles_w = static_cast<uint32_t>(g.tiles_w);
  const uint32_t plane = blk / tiles;
  const uint32_t tile = blk - plane * tiles;
  const uint32_t n = plane / channels;
  const uint32_t th = tile / tiles_w;
  BlockPos p;
  p.plane = plane;
  p.n = n;
  p.c = plane - n * channels;
  p.h0 = static_cast<int64_t>(th) * kTileH;
  p.w0 = static_cast<int64_t>(tile - th * tiles_w) * kTileW;
  return p;
}

template <typename T, typename acc_t, int VEC, int KC>
__global__ void __launch_bounds__(kThreads)
    grouped_dwconv_fwd_kernel(const T* __restrict__ x,               // [N, C, H, W]
                              const T* __restrict__ weight,          // [E, C, K_max, K_max]
                              const T* __restrict__ bias,            // [E, C] or nullptr
                              const int64_t* __restrict__ offsets,   // [E + 1]
                              ExpertTable table, T* __restrict__ y,  // [N, C, H, W]
                              Geometry g) {
  __shared__ __align__(16) acc_t tile[TileShape<T, KC>::kSize];
  __shared__ acc_t taps[KC * KC];
  const BlockPos p = block_pos(g);
  const int col = static_cast<int>(threadIdx.x) % kTileW;
  const int row0 = (static_cast<int>(threadIdx.x) / kTileW) * kRowsPerThread;
  T* out_plane = y + p.plane * g.H * g.W;
  // Block-uniform branches, taken before any barrier.
  const int e = find_expert(offsets, g.num_experts, p.n);
  if (e < 0 || p.c >= table.channels[e]) {
    fill_column<T, acc_t>(out_plane, g.H, g.W, p.h0 + row0, p.w0 + col,
                          e < 0 ? quiet_nan<acc_t>() : acc_t(0));
    return;
  }
  const int K = table.kernel_size[e];
  const int lo = (g.k_max - K) / 2;
  const T* wk = weight + (static_cast<int64_t>(e) * g.C + p.c) * g.k_max * g.k_max;
  if (static_cast<int>(threadIdx.x) < K * K) {
    const int i = static_cast<int>(threadIdx.x) / K;
    const int j = static_cast<int>(threadIdx.x) - i * K;
    taps[threadIdx.x] = static_cast<acc_t>(wk[(lo + i) * g.k_max + lo + j]);
  }
  stage_tile<T, acc_t, VEC, KC>(tile, x + p.plane * g.H * g.W, g.H, g.W, p.h0, p.w0);
  __syncthreads();
  const acc_t b = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[static_cast<int64_t>(e) * g.C + p.c]);
  acc_t out[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) out[q] = b;
  conv_column_k<T, KC>(K, tile, taps, row0, col, out);
  store_column<T, acc_t>(out_plane, g.H, g.W, p.h0 + row0, p.w0 + col, out);
}

// grad_x of the tile, and partial[(plane * tiles + tile) * taps_stride + t]: the tile's sum of
// grad_y * x shifted by tap t = i * K + j (t < K * K), of grad_y (t = K * K), 0 beyond.
template <typename T, typename acc_t, int VEC, int KC>
__global__ void __launch_bounds__(kThreads)
    grouped_dwconv_bwd_kernel(const T* __restrict__ grad_y,         // [N, C, H, W]
                              const T* __restrict__ x,              // [N, C, H, W]
                              const T* __restrict__ weight,         // [E, C, K_max, K_max]
                              const int64_t* __restrict__ offsets,  // [E + 1]
                              ExpertTable table,
                              T* __restrict__ grad_x,       // [N, C, H, W]
                              acc_t* __restrict__ partial,  // [N * C * tiles, taps_stride]
                              Geometry g, int taps_stride) {
  using Shape = TileShape<T, KC>;
  __shared__ __align__(16) acc_t tile_x[Shape::kSize];
  __shared__ __align__(16) acc_t tile_g[Shape::kSize];
  __shared__ acc_t flipped[KC * KC];
  const BlockPos p = block_pos(g);
  const int tid = static_cast<int>(threadIdx.x);
  const int col = tid % kTileW;
  const int row0 = (tid / kTileW) * kRowsPerThread;
  T* gx_plane = grad_x + p.plane * g.H * g.W;
  acc_t* part = partial + static_cast<int64_t>(blockIdx.x) * taps_stride;
  const int e = find_expert(offsets, g.num_experts, p.n);
  if (e < 0 || p.c >= table.channels[e]) {
    fill_column<T, acc_t>(gx_plane, g.H, g.W, p.h0 + row0, p.w0 + col, e < 0 ? quiet_nan<acc_t>() : acc_t(0));
    for (int t = tid; t < taps_stride; t += kThreads) part[t] = acc_t(0);
    return;
  }
  const int K = table.kernel_size[e];
  const int P = K / 2;
  const int lo = (g.k_max - K) / 2;
  const T* wk = weight + (static_cast<int64_t>(e) * g.C + p.c) * g.k_max * g.k_max;
  if (tid < K * K) {
    const int i = tid / K;
    const int j = tid - i * K;
    flipped[(K - 1 - i) * K + (K - 1 - j)] = static_cast<acc_t>(wk[(lo + i) * g.k_max + lo + j]);
  }
  stage_tile<T, acc_t, VEC, KC>(tile_x, x + p.plane * g.H * g.W, g.H, g.W, p.h0, p.w0);
  stage_tile<T, acc_t, VEC, KC>(tile_g, grad_y + p.plane * g.H * g.W, g.H, g.W, p.h0, p.w0);
  __syncthreads();

  // grad_x[a, b] = sum_{i, j} w[i, j] * grad_y[a + P - i, b + P - j]: the forward's loop on
  // grad_y with the flipped kernel.
  acc_t out[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) out[q] = acc_t(0);
  conv_column_k<T, KC>(K, tile_g, flipped, row0, col, out);
  store_column<T, acc_t>(gx_plane, g.H, g.W, p.h0 + row0, p.w0 + col, out);

  // Weight partials: warp w takes taps w, w + kWarps, ...; lane l sums column l of the tile
  // over its kTileH rows (grad_y is 0 outside the plane, so out-of-plane pixels add nothing).
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int taps = K * K;
  const acc_t* g_col = tile_g + Shape::kHaloH * Shape::kCols + Shape::kHaloW + lane;
  for (int t = warp; t < taps_stride; t += kWarps) {
    acc_t sum = acc_t(0);
    if (t < taps) {
      const int i = t / K;
      const int j = t - i * K;
      const acc_t* x_col = tile_x + (Shape::kHaloH - P + i) * Shape::kCols + Shape::kHaloW - P + j + lane;
#pragma unroll 8
      for (int r = 0; r < kTileH; ++r) sum += g_col[r * Shape::kCols] * x_col[r * Shape::kCols];
    } else if (t == taps) {
#pragma unroll 8
      for (int r = 0; r < kTileH; ++r) sum += g_col[r * Shape::kCols];
    }
    sum = warp_sum(sum);
    if (lane == 0) part[t] = sum;
  }
}

// grad_weight[e, c] (the whole K_max x K_max window) and grad_bias[e, c]: one block per
// (expert, channel); each thread adds one tap's partials over the expert's rows (offsets read on
// the device, clamped to 0..N) and the tiles, in that fixed order. 0 outside the expert's
// window and channels.
template <typename T, typename acc_t>
__global__ void dwconv_bwd_weight_kernel(const acc_t* __restrict__ partial,    // [N * C * tiles, taps_stride]
                                         const int64_t* __restrict__ offsets,  // [E + 1]
                                         ExpertTable table,
                                         T* __restrict__ grad_w,  // [E, C, K_max, K_max]
                                         T* __restrict__ grad_b,  // [E, C]
                                         Geometry g, int taps_stride) {
  const int64_t ec = blockIdx.x;
  const int e = static_cast<int>(ec / g.C);
  const int64_t c = ec - static_cast<int64_t>(e) * g.C;
  const int K = table.kernel_size[e];
  const int lo = (g.k_max - K) / 2;
  const bool active = c < table.channels[e];
  int64_t r0 = offsets[e];
  int64_t r1 = offsets[e + 1];
  r0 = r0 < 0 ? 0 : (r0 > g.N ? g.N : r0);
  r1 = r1 < r0 ? r0 : (r1 > g.N ? g.N : r1);
  const int window = g.k_max * g.k_max;
  for (int pos = static_cast<int>(threadIdx.x); pos <= window; pos += blockDim.x) {
    int t = K * K;  // pos == window: the bias
    bool inside = active;
    if (pos < window) {
      const int i = pos / g.k_max - lo;
      const int j = pos % g.k_max - lo;
      inside = active && i >= 0 && i < K && j >= 0 && j < K;
      t = i * K + j;
    }
    acc_t sum = acc_t(0);
    if (inside) {
      for (int64_t n = r0; n < r1; ++n) {
        const acc_t* rows = partial + (n * g.C + c) * g.tiles * taps_stride + t;
        for (int64_t tile = 0; tile < g.tiles; ++tile) sum += rows[tile * taps_stride];
      }
    }
    if (pos < window) {
      grad_w[ec * window + pos] = static_cast<T>(sum);
    } else {
      grad_b[ec] = static_cast<T>(sum);
    }
  }
}

}  // namespace moce::cuda::dwconv
