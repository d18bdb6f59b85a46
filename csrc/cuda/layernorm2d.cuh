// CUDA kernel bodies of layernorm2d (LayerNorm over C of a contiguous [B, C, H, W] tensor).
//
// Layout: pixel p of image b, channel c lives at x[(b * C + c) * N + p], N = H * W. Each thread
// owns VEC adjacent pixels of one image and loops over C, so at every step of the loop the
// threads of a warp read adjacent addresses (coalesced), VEC at a time (128-bit accesses when
// VEC * sizeof(T) == 16). T is float, double, c10::Half or c10::BFloat16; acc_t (float, or
// double for double) holds every sum.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_pipeline.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace moce::cuda {

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

// y = (x - mean) * rstd * w + b over C at this thread's VEC pixels; writes their mean and rstd.
// load(c) gives channel c's Pack (from global memory, or staged in shared memory): the two
// forward kernels share every operation, so they give the same bits.
//
// One pass for the statistics: sums of x - x[c = 0] (the "shifted data" algorithm), which keeps
// the float32 sums free of the cancellation of a plain sum of squares when |mean| >> std.
template <typename T, typename acc_t, int VEC, typename Load>
__device__ __forceinline__ void layernorm2d_fwd_pixels(const Load& load, const acc_t* __restrict__ w,
                                                       const acc_t* __restrict__ b, T* __restrict__ yb,
                                                       acc_t* __restrict__ mean, acc_t* __restrict__ rstd,
                                                       int64_t C, int64_t N, acc_t eps) {
  acc_t shift[VEC];
  acc_t s1[VEC];
  acc_t s2[VEC];
  {
    const Pack<T, VEC> v = load(0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      shift[i] = static_cast<acc_t>(v.val[i]);
      s1[i] = acc_t(0);
      s2[i] = acc_t(0);
    }
  }
  for (int64_t c = 1; c < C; ++c) {
    const Pack<T, VEC> v = load(c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t d = static_cast<acc_t>(v.val[i]) - shift[i];
      s1[i] += d;
      s2[i] += d * d;
    }
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  acc_t mu[VEC];
  acc_t rs[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const acc_t m1 = s1[i] * inv_c;
    acc_t var = s2[i] * inv_c - m1 * m1;
    // Rounding can make var slightly negative; the comparison keeps NaN (NaN < 0 is false).
    var = var < acc_t(0) ? acc_t(0) : var;
    mu[i] = shift[i] + m1;
    rs[i] = rsqrt_acc(var + eps);
    mean[i] = mu[i];
    rstd[i] = rs[i];
  }
  for (int64_t c = 0; c < C; ++c) {
    const Pack<T, VEC> v = load(c);
    const acc_t wc = w[c];
    const acc_t bc = b[c];
    Pack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      out.val[i] = static_cast<T>((static_cast<acc_t>(v.val[i]) - mu[i]) * rs[i] * wc + bc);
    }
    store_pack_wb<T, VEC>(yb + c * N, out);
  }
}

// One thread per VEC adjacent pixels of one image, reading x from global memory twice (the
// statistics, then the output).
template <typename T, typename acc_t, int VEC>
__global__ void layernorm2d_fwd_kernel(const T* __restrict__ x,      // [B, C, N]
                                       const acc_t* __restrict__ w,  // [C]
                                       const acc_t* __restrict__ b,  // [C]
                                       T* __restrict__ y,            // [B, C, N]
                                       acc_t* __restrict__ mean,     // [B, N]
                                       acc_t* __restrict__ rstd,     // [B, N]
                                       int64_t total_packs, int64_t packs_per_image, int64_t C, int64_t N,
                                       acc_t eps) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total_packs) return;
  const int64_t bi = t / packs_per_image;
  const int64_t p = (t - bi * packs_per_image) * VEC;
  const T* xb = x + bi * C * N + p;
  const auto load = [&](int64_t c) { return load_pack<T, VEC>(xb + c * N); };
  layernorm2d_fwd_pixels<T, acc_t, VEC>(load, w, b, y + bi * C * N + p, mean + bi * N + p, rstd + bi * N + p, C,
                                        N, eps);
}

// Host side (the .cu launcher and tests/csrc/cuda_emulation): which staged kernel, if any.
// Calls launch(std::integral_constant<int, MAX_C>) with the smallest of the staged forward's
// widths (32, 64, 96 channels: 16, 32, 48 KB of shared memory per warp) that holds C, and returns
// true; false (nothing launched) past 96 channels.
template <typename Launch>
bool with_staged_width(int64_t C, const Launch& launch) {
  if (C <= 32) {
    launch(std::integral_constant<int, 32>{});
  } else if (C <= 64) {
    launch(std::integral_constant<int, 64>{});
  } else if (C <= 96) {
    launch(std::integral_constant<int, 96>{});
  } else {
    return false;
  }
  return true;
}

// The same for the staged backward, which stages x and grad_y: 32 or 48 channels (32 or 48 KB).
template <typename Launch>
bool with_staged_bwd_width(int64_t C, const Launch& launch) {
  if (C <= 32) {
    launch(std::integral_constant<int, 32>{});
  } else if (C <= 48) {
    launch(std::integral_constant<int, 48>{});
  } else {
    return false;
  }
  return true;
}

// The staged forward: one warp per block, a thread's C packs copied into shared memory with
// cp.async first (all of them in flight at once, no registers held), then the statistics and
// the output from there. x is read from global memory once, where layernorm2d_fwd_kernel reads
// it twice: between its two reads every resident thread streams its own C packs, more than the
// L2 holds at full resolution, so the second read comes from DRAM again (3 of the tensor's sizes
// moved instead of 2). For C <= MAX_C (static shared memory: MAX_C * 32 * 16 bytes, 48 KB at
// most) and the 16-byte path. Same bits as layernorm2d_fwd_kernel.
constexpr int kStagedThreads = kWarpSize;

template <typename T, typename acc_t, int VEC, int MAX_C>
__global__ void __launch_bounds__(kStagedThreads)
    layernorm2d_fwd_staged_kernel(const T* __restrict__ x,      // [B, C, N]
                                  const acc_t* __restrict__ w,  // [C]
                                  const acc_t* __restrict__ b,  // [C]
                                  T* __restrict__ y,            // [B, C, N]
                                  acc_t* __restrict__ mean,     // [B, N]
                                  acc_t* __restrict__ rstd,     // [B, N]
                                  int64_t total_packs, int64_t packs_per_image, int64_t C, int64_t N,
                                  acc_t eps) {
  static_assert(sizeof(Pack<T, VEC>) == 16, "the staged forward copies 16-byte packs");
  // Channel c of thread j at staged[c * kStagedThreads + j]: a warp's copies of one channel are
  // 512 contiguous bytes (no bank conflicts).
  __shared__ Pack<T, VEC> staged[MAX_C * kStagedThreads];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kStagedThreads + threadIdx.x;
  // Per thread: no barrier or warp primitive follows (each thread reads only its own packs).
  if (t >= total_packs) return;
  const int64_t bi = t / packs_per_image;
  const int64_t p = (t - bi * packs_per_image) * VEC;
  const T* xb = x + bi * C * N + p;
  Pack<T, VEC>* mine = staged + threadIdx.x;
  for (int64_t c = 0; c < C; ++c) {
    __pipeline_memcpy_async(mine + c * kStagedThreads, xb + c * N, sizeof(Pack<T, VEC>));
  }
  __pipeline_commit();
  __pipeline_wait_prior(0);
  const auto load = [&](int64_t c) { return mine[c * kStagedThreads]; };
  layernorm2d_fwd_pixels<T, acc_t, VEC>(load, w, b, y + bi * C * N + p, mean + bi * N + p, rstd + bi * N + p, C,
                                        N, eps);
}

// grad_x = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)), g = grad_y * w, at this thread's
// VEC pixels (when `active`; an idle lane of the last warp contributes zeros). Also the warp's
// partial sums of grad_weight (grad_y * xhat) and grad_bias (grad_y) of every channel:
// partial_w[c * num_warps + warp]; layernorm2d_bwd_weight_kernel adds them up in a fixed order,
// so grad_weight and grad_bias are deterministic (no atomics). load_x(c) / load_dy(c) give
// channel c's Packs (global or staged memory): both backward kernels give the same bits.
// Every lane of the warp calls it (warp sums).
template <typename T, typename acc_t, int VEC, typename LoadX, typename LoadDy>
__device__ __forceinline__ void layernorm2d_bwd_pixels(const LoadX& load_x, const LoadDy& load_dy, bool active,
                                                       const acc_t* __restrict__ w,
                                                       const acc_t* __restrict__ mean,  // this thread's VEC
                                                       const acc_t* __restrict__ rstd,  // this thread's VEC
                                                       T* __restrict__ dxb, acc_t* __restrict__ partial_w,
                                                       acc_t* __restrict__ partial_b, int64_t C, int64_t N,
                                                       int64_t warp, int lane, int64_t num_warps) {
  acc_t mu[VEC];
  acc_t rs[VEC];
  acc_t sum_g[VEC];
  acc_t sum_gx[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    mu[i] = acc_t(0);
    rs[i] = acc_t(0);
    sum_g[i] = acc_t(0);
    sum_gx[i] = acc_t(0);
  }
  if (active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      mu[i] = mean[i];
      rs[i] = rstd[i];
    }
    for (int64_t c = 0; c < C; ++c) {
      const Pack<T, VEC> xv = load_x(c);
      const Pack<T, VEC> dyv = load_dy(c);
      const acc_t wc = w[c];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t xhat = (static_cast<acc_t>(xv.val[i]) - mu[i]) * rs[i];
        const acc_t g = static_cast<acc_t>(dyv.val[i]) * wc;
        sum_g[i] += g;
        sum_gx[i] += g * xhat;
      }
    }
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sum_g[i] *= inv_c;
    sum_gx[i] *= inv_c;
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t gw = acc_t(0);
    acc_t gb = acc_t(0);
    if (active) {
      const Pack<T, VEC> xv = load_x(c);
      const Pack<T, VEC> dyv = load_dy(c);
      const acc_t wc = w[c];
      Pack<T, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t xhat = (static_cast<acc_t>(xv.val[i]) - mu[i]) * rs[i];
        const acc_t dyi = static_cast<acc_t>(dyv.val[i]);
        out.val[i] = static_cast<T>(rs[i] * (dyi * wc - sum_g[i] - xhat * sum_gx[i]));
        gw += dyi * xhat;
        gb += dyi;
      }
      store_pack_wb<T, VEC>(dxb + c * N, out);
    }
    gw = warp_sum_lane0(gw);
    gb = warp_sum_lane0(gb);
    if (lane == 0) {
      partial_w[c * num_warps + warp] = gw;
      partial_b[c * num_warps + warp] = gb;
    }
  }
}

// One thread per VEC adjacent pixels of one image, reading x and grad_y from global memory twice.
template <typename T, typename acc_t, int VEC>
__global__ void layernorm2d_bwd_kernel(const T* __restrict__ dy,        // [B, C, N]
                                       const T* __restrict__ x,         // [B, C, N]
                                       const acc_t* __restrict__ w,     // [C]
                                       const acc_t* __restrict__ mean,  // [B, N]
                                       const acc_t* __restrict__ rstd,  // [B, N]
                                       T* __restrict__ dx,              // [B, C, N]
                                       acc_t* __restrict__ partial_w,   // [C, num_warps]
                                       acc_t* __restrict__ partial_b,   // [C, num_warps]
                                       int64_t total_packs, int64_t packs_per_image, int64_t C, int64_t N,
                                       int64_t num_warps) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t warp = t / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  // Whole warps past the end leave (warp-uniform, so the shuffles below see all 32 lanes);
  // idle lanes of the last warp stay and contribute zeros.
  if (warp * kWarpSize >= total_packs) return;
  const bool active = t < total_packs;
  const int64_t bi = active ? t / packs_per_image : 0;
  const int64_t p = active ? (t - bi * packs_per_image) * VEC : 0;
  const int64_t offset = bi * C * N + p;
  const auto load_x = [&](int64_t c) { return load_pack<T, VEC>(x + offset + c * N); };
  const auto load_dy = [&](int64_t c) { return load_pack<T, VEC>(dy + offset + c * N); };
  layernorm2d_bwd_pixels<T, acc_t, VEC>(load_x, load_dy, active, w, mean + bi * N + p, rstd + bi * N + p,
                                        dx + offset, partial_w, partial_b, C, N, warp, lane, num_warps);
}

// The staged backward: one warp per block (so the partial sums are laid out as above), each
// thread's C packs of x and of grad_y copied into shared memory with cp.async first, then both
// sweeps from there: x and grad_y read from global memory once instead of twice. For C <= MAX_C
// (2 * MAX_C * 32 * 16 bytes of static shared memory, 48 KB at most) and the 16-byte path. Same
// bits as layernorm2d_bwd_kernel.
template <typename T, typename acc_t, int VEC, int MAX_C>
__global__ void __launch_bounds__(kStagedThreads)
    layernorm2d_bwd_staged_kernel(const T* __restrict__ dy,        // [B, C, N]
                                  const T* __restrict__ x,         // [B, C, N]
                                  const acc_t* __restrict__ w,     // [C]
                                  const acc_t* __restrict__ mean,  // [B, N]
                                  const acc_t* __restrict__ rstd,  // [B, N]
                                  T* __restrict__ dx,              // [B, C, N]
                                  acc_t* __restrict__ partial_w,   // [C, num_warps]
                                  acc_t* __restrict__ partial_b,   // [C, num_warps]
                                  int64_t total_packs, int64_t packs_per_image, int64_t C, int64_t N,
                                  int64_t num_warps) {
  static_assert(sizeof(Pack<T, VEC>) == 16, "the staged backward copies 16-byte packs");
  __shared__ Pack<T, VEC> staged_x[MAX_C * kStagedThreads];
  __shared__ Pack<T, VEC> staged_dy[MAX_C * kStagedThreads];
  const int64_t warp = blockIdx.x;
  const int lane = static_cast<int>(threadIdx.x);
  const int64_t t = warp * kStagedThreads + lane;
  const bool active = t < total_packs;  // the grid holds no warp past the end
  const int64_t bi = active ? t / packs_per_image : 0;
  const int64_t p = active ? (t - bi * packs_per_image) * VEC : 0;
  const int64_t offset = bi * C * N + p;
  Pack<T, VEC>* mine_x = staged_x + lane;
  Pack<T, VEC>* mine_dy = staged_dy + lane;
  if (active) {
    for (int64_t c = 0; c < C; ++c) {
      __pipeline_memcpy_async(mine_x + c * kStagedThreads, x + offset + c * N, sizeof(Pack<T, VEC>));
      __pipeline_memcpy_async(mine_dy + c * kStagedThreads, dy + offset + c * N, sizeof(Pack<T, VEC>));
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
  }
  const auto load_x = [&](int64_t c) { return mine_x[c * kStagedThreads]; };
  const auto load_dy = [&](int64_t c) { return mine_dy[c * kStagedThreads]; };
  layernorm2d_bwd_pixels<T, acc_t, VEC>(load_x, load_dy, active, w, mean + bi * N + p, rstd + bi * N + p,
                                        dx + offset, partial_w, partial_b, C, N, warp, lane, num_warps);
}

// grad_weight[c] and grad_bias[c]: one block per channel sums that channel's num_warps partials,
// each thread a fixed strided subset, then a fixed tree over the block.
template <typename acc_t, int THREADS>
__global__ void layernorm2d_bwd_weight_kernel(const acc_t* __restrict__ partial_w,  // [C, num_warps]
                                              const acc_t* __restrict__ partial_b,  // [C, num_warps]
                                              acc_t* __restrict__ grad_w,           // [C]
                                              acc_t* __restrict__ grad_b,           // [C]
                                              int64_t num_warps) {
  static_assert(THREADS % kWarpSize == 0 && THREADS <= kWarpSize * kWarpSize, "bad block size");
  constexpr int kWarps = THREADS / kWarpSize;
  __shared__ acc_t shared_w[kWarps];
  __shared__ acc_t shared_b[kWarps];
  const int64_t c = blockIdx.x;
  const acc_t* pw = partial_w + c * num_warps;
  const acc_t* pb = partial_b + c * num_warps;
  acc_t sw = acc_t(0);
  acc_t sb = acc_t(0);
  for (int64_t i = threadIdx.x; i < num_warps; i += THREADS) {
    sw += pw[i];
    sb += pb[i];
  }
  sw = warp_sum_lane0(sw);
  sb = warp_sum_lane0(sb);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (lane == 0) {
    shared_w[warp] = sw;
    shared_b[warp] = sb;
  }
  __syncthreads();
  if (warp == 0) {
    sw = lane < kWarps ? shared_w[lane] : acc_t(0);
    sb = lane < kWarps ? shared_b[lane] : acc_t(0);
    sw = warp_sum_lane0(sw);
    sb = warp_sum_lane0(sb);
    if (lane == 0) {
      grad_w[c] = sw;
      grad_b[c] = sb;
    }
  }
}

}  // namespace moce::cuda
