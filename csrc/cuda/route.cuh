// CUDA kernel bodies of route (schemas, semantics and the CPU kernels in csrc/route.cpp).
//
// Three launches, no host synchronisation:
//   1. route_images_kernel, one thread per image: softmaxes, noisy logits, top-k (gates,
//      experts). E is small (a handful of experts), so a thread walks its image's row.
//   2. route_rank_kernel, ONE block: walks the slots (s = b * k + j) in chunks of blockDim.x
//      and gives each slot its rank among the earlier slots of the same expert (warp match +
//      per-warp counts in shared memory, a running count per expert across chunks), then the
//      counts and offsets. The ranks are parked in `inverse`.
//   3. route_scatter_kernel, one thread per slot: row = offsets[e] + rank; writes inverse,
//      sorted_slots and sorted_images.
// The order is stable (by image, then choice, inside an expert) by construction, and the same
// on every run. route_bwd_kernel (one thread per image) is the softmax Jacobian restricted to
// the chosen entries.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

#include "../route.h"
#include "common.cuh"

namespace moce::cuda::routing {

constexpr int kRankThreads = 1024;
constexpr int kRankWarps = kRankThreads / kWarpSize;
// Shared memory of route_rank_kernel: kRankWarps * E int32 counts + E int64 running counts.
constexpr int64_t kMaxExperts = 256;

// (max, 1 / sum exp(x - max)) of a row of E float32 values.
__device__ __forceinline__ void softmax_stats(const float* __restrict__ x, int64_t E, float& m, float& inv) {
  m = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) m = fmaxf(m, x[e]);
  float s = 0.0f;
  for (int64_t e = 0; e < E; ++e) s += expf(x[e] - m);
  inv = 1.0f / s;
}

__global__ void route_images_kernel(const float* __restrict__ logits,  // [B, E]
                                    const float* __restrict__ noise,   // [B, E] or nullptr
                                    float* __restrict__ gates,         // [B, k]
                                    int64_t* __restrict__ experts,     // [B, k]
                                    float* __restrict__ probs,         // [B, E]
                                    float* __restrict__ noisy,         // [B, E]
                                    int64_t B, int64_t E, int64_t k) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const float* clean = logits + b * E;
  float* nb = noisy + b * E;
  for (int64_t e = 0; e < E; ++e) nb[e] = noise == nullptr ? clean[e] : clean[e] + noise[b * E + e];
  float m, inv;
  softmax_stats(clean, E, m, inv);
  for (int64_t e = 0; e < E; ++e) probs[b * E + e] = expf(clean[e] - m) * inv;
  // p[e] = expf(nb[e] - m) * inv, recomputed (the same expression, so the same bits) instead of
  // a per-thread array sized by E.
  softmax_stats(nb, E, m, inv);
  int64_t prev = -1;
  float prev_p = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    float best_p = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      const float p = expf(nb[e] - m) * inv;
      if (prev >= 0 && !route_ranks_before(prev_p, prev, p, e)) continue;
      if (best < 0 || route_ranks_before(p, e, best_p, best)) {
        best = e;
        best_p = p;
      }
    }
    experts[b * k + j] = best;
    gates[b * k + j] = best_p;
    prev = best;
    prev_p = best_p;
  }
}

// One block of kRankThreads threads. rank[s] = #{s' < s : experts[s'] == experts[s]}; then
// counts[e] and offsets[0..E]. Dynamic shared memory: kRankWarps * E int32 + E int64.
__global__ void __launch_bounds__(kRankThreads)
    route_rank_kernel(const int64_t* __restrict__ experts,  // [S] (slot order)
                      int64_t* __restrict__ rank,           // [S]
                      int64_t* __restrict__ counts,         // [E]
                      int64_t* __restrict__ offsets,        // [E + 1]
                      int64_t S, int64_t E) {
  extern __shared__ unsigned char shared_raw[];
  int64_t* running = reinterpret_cast<int64_t*>(shared_raw);                    // [E]
  int* warp_counts = reinterpret_cast<int*>(shared_raw + E * sizeof(int64_t));  // [kRankWarps, E]
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  for (int64_t e = tid; e < E; e += kRankThreads) running[e] = 0;
  // Also orders the zeroing before the final reads when there are no slots (S = 0).
  __syncthreads();
  for (int64_t base = 0; base < S; base += kRankThreads) {
    for (int64_t i = tid; i < kRankWarps * E; i += kRankThreads) warp_counts[i] = 0;
    __syncthreads();
    const int64_t s = base + tid;
    int64_t e = s < S ? experts[s] : -1;
    if (e < 0 || e >= E) e = -1;  // never from route_images_kernel; skipped, never indexed
    // Lanes of this warp holding the same expert; this lane's rank among them.
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int in_warp = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && in_warp == 0) warp_counts[warp * E + e] = __popc(peers);
    __syncthreads();
    if (e >= 0) {
      int64_t before = running[e];
      for (int w = 0; w < warp; ++w) before += warp_counts[w * E + e];
      rank[s] = before + in_warp;
    }
    __syncthreads();
    for (int64_t x = tid; x < E; x += kRankThreads) {
      int64_t total = 0;
      for (int w = 0; w < kRankWarps; ++w) total += warp_counts[w * E + x];
      running[x] += total;
    }
    // warp_counts is cleared, and running read, by the next chunk.
    __syncthreads();
  }
  for (int64_t e = tid; e < E; e += kRankThreads) counts[e] = running[e];
  if (tid == 0) {
    int64_t acc = 0;
    offsets[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
      acc += running[e];
      offsets[e + 1] = acc;
    }
  }
}

// inverse[s] holds the slot's rank on entry and its sorted row on exit.
__global__ void route_scatter_kernel(const int64_t* __restrict__ experts,  // [S]
                                     const int64_t* __restrict__ offsets,  // [E + 1]
                                     int64_t* __restrict__ inverse,        // [S]
                                     int64_t* __restrict__ sorted_slots,   // [S]
                                     int64_t* __restrict__ sorted_images,  // [S]
                                     int64_t S, int64_t E, int64_t k) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const int64_t e = experts[s];
  if (e < 0 || e >= E) return;
  const int64_t row = offsets[e] + inverse[s];
  if (row < 0 || row >= S) return;
  inverse[s] = row;
  sorted_slots[row] = s;
  sorted_images[row] = s / k;
}

// One thread per image (see route_bwd in csrc/route.cpp for the formulas).
__global__ void route_bwd_kernel(const float* __restrict__ noisy,       // [B, E]
                                 const float* __restrict__ probs,       // [B, E]
                                 const int64_t* __restrict__ experts,   // [B, k]
                                 const float* __restrict__ grad_gates,  // [B, k] or nullptr
                                 const float* __restrict__ grad_probs,  // [B, E] or nullptr
                                 const float* __restrict__ grad_noisy,  // [B, E] or nullptr
                                 float* __restrict__ grad_wrt_noisy,    // [B, E]
                                 float* __restrict__ grad_wrt_logits,   // [B, E]
                                 int64_t B, int64_t E, int64_t k) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const float* nb = noisy + b * E;
  const int64_t* eb = experts + b * k;
  float m = 0.0f, inv = 0.0f, dot_g = 0.0f;
  if (grad_gates != nullptr) {
    softmax_stats(nb, E, m, inv);
    // sum_e p[e] * G[e] = sum_j grad_gates[j] * p[experts[j]].
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = eb[j];
      if (e >= 0 && e < E) dot_g += grad_gates[b * k + j] * (expf(nb[e] - m) * inv);
    }
  }
  float dot_q = 0.0f;
  if (grad_probs != nullptr) {
    for (int64_t e = 0; e < E; ++e) dot_q += probs[b * E + e] * grad_probs[b * E + e];
  }
  for (int64_t e = 0; e < E; ++e) {
    float gn = 0.0f;
    if (grad_gates != nullptr) {
      float scattered = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        if (eb[j] == e) scattered += grad_gates[b * k + j];
      }
      gn = (expf(nb[e] - m) * inv) * (scattered - dot_g);
    }
    if (grad_noisy != nullptr) gn += grad_noisy[b * E + e];
    grad_wrt_noisy[b * E + e] = gn;
    float gl = gn;
    if (grad_probs != nullptr) gl += probs[b * E + e] * (grad_probs[b * E + e] - dot_q);
    grad_wrt_logits[b * E + e] = gl;
  }
}

}  // namespace moce::cuda::routing
