// CUDA kernel bodies of combine (expert outputs back to image order, gate-weighted; schemas,
// semantics and the CPU kernels in csrc/combine.cpp). Row layout as in dispatch.cuh; the vector
// and warp helpers are common.cuh's.
//
// The gate gradient is a dot product over a whole row per slot: combine_gate_partial_kernel
// sums fixed chunks of kGateChunk features per block (a fixed shuffle tree), and
// combine_gate_reduce_kernel adds each slot's chunk sums in chunk order: no atomics, the same
// bits on every run. Out-of-range indices give NaN, never an out-of-bounds access.
#pragma once

#include "common.cuh"
#include "dispatch.cuh"

namespace moce::cuda::rows {

constexpr int kGateThreads = 256;
// Features per block of the gate-gradient partial sums: 16 vectors per thread.
constexpr int64_t kGateChunkPacks = 16 * kGateThreads;

// out[b, :] = sum_{j < k} gates[b, j] * y[inverse[b * k + j], :] in the order j = 0..k-1.
template <typename T, typename acc_t, int VEC>
__global__ void combine_fwd_kernel(const T* __restrict__ y,              // [S, F]
                                   const acc_t* __restrict__ gates,      // [B, k]
                                   const int64_t* __restrict__ inverse,  // [S]
                                   T* __restrict__ out,                  // [B, F]
                                   int64_t batch, int64_t k, int64_t features) {
  const int64_t slots = batch * k;
  const int64_t packs = features / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += step) {
      acc_t acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
      bool ok = true;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = inverse[b * k + j];
        if (row < 0 || row >= slots) {
          ok = false;
          continue;
        }
        const acc_t g = gates[b * k + j];
        const Pack<T, VEC> yv = load_pack<T, VEC>(y + row * features + p * VEC);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += g * static_cast<acc_t>(yv.val[v]);
      }
      Pack<T, VEC> o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) o.val[v] = static_cast<T>(ok ? acc[v] : quiet_nan<acc_t>());
      store_pack<T, VEC>(out + b * features + p * VEC, o);
    }
  }
}

// grad_y[i, :] = gates[s] * grad_out[s / k, :] with s = sorted_slots[i].
template <typename T, typename acc_t, int VEC>
__global__ void combine_bwd_y_kernel(const T* __restrict__ grad_out,            // [B, F]
                                     const acc_t* __restrict__ gates,           // [S] (= [B, k])
                                     const int64_t* __restrict__ sorted_slots,  // [S]
                                     T* __restrict__ grad_y,                    // [S, F]
                                     int64_t slots, int64_t k, int64_t features) {
  const int64_t packs = features / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < slots; i += gridDim.y) {
    const int64_t s = sorted_slots[i];
    const bool ok = s >= 0 && s < slots;
    const acc_t g = ok ? gates[s] : quiet_nan<acc_t>();
    const T* src = grad_out + (ok ? s / k : 0) * features;
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += step) {
      Pack<T, VEC> o;
      if (ok) {
        const Pack<T, VEC> gv = load_pack<T, VEC>(src + p * VEC);
#pragma unroll
        for (int v = 0; v < VEC; ++v) o.val[v] = static_cast<T>(g * static_cast<acc_t>(gv.val[v]));
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) o.val[v] = static_cast<T>(g);
      }
      store_pack<T, VEC>(grad_y + i * features + p * VEC, o);
    }
  }
}

// partial[s, chunk] = sum over the chunk's features f of y[inverse[s], f] * grad_out[s / k, f]
// (blockIdx.x: the chunk; blockIdx.y strides over the slots).
template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kGateThreads)
    combine_gate_partial_kernel(const T* __restrict__ grad_out,       // [B, F]
                                const T* __restrict__ y,              // [S, F]
                                const int64_t* __restrict__ inverse,  // [S]
                                acc_t* __restrict__ partial,          // [S, chunks]
                                int64_t slots, int64_t k, int64_t features, int64_t chunks) {
  __shared__ acc_t warp_sums[kGateThreads / kWarpSize];
  const int64_t packs = features / VEC;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t chunk = blockIdx.x;
  const int64_t p_begin = chunk * kGateChunkPacks;
  const int64_t p_end = p_begin + kGateChunkPacks < packs ? p_begin + kGateChunkPacks : packs;
  for (int64_t s = blockIdx.y; s < slots; s += gridDim.y) {
    const int64_t row = inverse[s];
    const bool ok = row >= 0 && row < slots;  // block-uniform
    acc_t sum = acc_t(0);
    if (ok) {
      const T* yr = y + row * features;
      const T* go = grad_out + (s / k) * features;
      for (int64_t p = p_begin + threadIdx.x; p < p_end; p += kGateThreads) {
        const Pack<T, VEC> a = load_pack<T, VEC>(yr + p * VEC);
        const Pack<T, VEC> g = load_pack<T, VEC>(go + p * VEC);
#pragma unroll
        for (int v = 0; v < VEC; ++v) sum += static_cast<acc_t>(a.val[v]) * static_cast<acc_t>(g.val[v]);
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) warp_sums[warp] = sum;
    __syncthreads();
    if (warp == 0) {
      sum = lane < kGateThreads / kWarpSize ? warp_sums[lane] : acc_t(0);
      sum = warp_sum(sum);
      if (lane == 0) partial[s * chunks + chunk] = ok ? sum : quiet_nan<acc_t>();
    }
    // warp_sums is rewritten by the next slot's iteration.
    __syncthreads();
  }
}

// grad_gates[s] = sum of partial[s, :] in chunk order (one warp per slot, a fixed tree).
template <typename G, typename acc_t>
__global__ void combine_gate_reduce_kernel(const acc_t* __restrict__ partial,  // [S, chunks]
                                           G* __restrict__ grad_gates,         // [S]
                                           int64_t slots, int64_t chunks) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (s >= slots) return;  // whole warps leave together
  acc_t sum = acc_t(0);
  for (int64_t c = lane; c < chunks; c += kWarpSize) sum += partial[s * chunks + c];
  sum = warp_sum(sum);
  if (lane == 0) grad_gates[s] = static_cast<G>(sum);
}

}  // namespace moce::cuda::rows
