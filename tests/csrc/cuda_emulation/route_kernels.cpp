// The CUDA kernels of route (csrc/cuda/route.cuh) on the CPU, driven as csrc/cuda/route.cu drives
// them. route_rank_kernel takes dynamic shared memory (extern __shared__), which this translation
// unit provides: one array, used by one block at a time.
#define EMU_SHARED_IS_EXTERN
#include "cuda_shim.h"

#include <cstdint>

namespace moce::cuda::routing {
// Holds the rank kernel's E int64 + kRankWarps * E int32 for E up to kMaxExperts.
alignas(16) unsigned char shared_raw[256 * (8 + 32 * 4)];
}  // namespace moce::cuda::routing

// clang-format off: the shim and the shared array come first.
#include "../../../csrc/cuda/route.cuh"
// clang-format on

namespace {

constexpr int kThreads = 128;

unsigned int blocks_for(int64_t items) { return static_cast<unsigned int>((items + kThreads - 1) / kThreads); }

}  // namespace

extern "C" {

// logits, noise (or null) [B, E] float32 -> gates, probs, noisy (float32) and experts, counts,
// offsets, sorted_slots, sorted_images, inverse (int64), as moce::route_fwd. Returns 0, or -1
// when E is past the kernels' limit (the .cu refuses it).
int route_fwd(const float* logits, const float* noise, int64_t B, int64_t E, int64_t k, float* gates,
              int64_t* experts, float* probs, float* noisy, int64_t* counts, int64_t* offsets, int64_t* sorted_slots,
              int64_t* sorted_images, int64_t* inverse) {
  namespace r = moce::cuda::routing;
  if (E > r::kMaxExperts) return -1;
  const int64_t S = B * k;
  if (B > 0) {
    emu::launch(blocks_for(B), kThreads, r::route_images_kernel, logits, noise, gates, experts, probs, noisy, B, E, k);
  }
  emu::launch(1u, static_cast<unsigned int>(r::kRankThreads), r::route_rank_kernel,
              static_cast<const int64_t*>(experts), inverse, counts, offsets, S, E);
  if (S > 0) {
    emu::launch(blocks_for(S), kThreads, r::route_scatter_kernel, static_cast<const int64_t*>(experts),
                static_cast<const int64_t*>(offsets), inverse, sorted_slots, sorted_images, S, E, k);
  }
  return 0;
}

// As moce::route_bwd: grad_wrt_noisy and grad_wrt_logits [B, E] from the saved noisy, probs,
// experts and the incoming gradients (each may be null).
void route_bwd(const float* noisy, const float* probs, const int64_t* experts, const float* grad_gates,
               const float* grad_probs, const float* grad_noisy, int64_t B, int64_t E, int64_t k,
               float* grad_wrt_noisy, float* grad_wrt_logits) {
  if (B == 0 || E == 0) return;
  emu::launch(blocks_for(B), kThreads, moce::cuda::routing::route_bwd_kernel, noisy, probs, experts, grad_gates,
              grad_probs, grad_noisy, grad_wrt_noisy, grad_wrt_logits, B, E, k);
}

}  // extern "C"
