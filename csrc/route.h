// Host helpers of route shared by the CPU (csrc/route.cpp, which defines them) and CUDA
// (csrc/cuda/route.cu) implementations, so both reject bad arguments alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>

namespace moce {

// The top-k order of route, shared by the CPU and CUDA kernels: by decreasing probability, ties
// to the LOWER expert index, NaN before every number (as torch.topk ranks NaN), so the order is
// total and a NaN row still gives k distinct in-range experts. True when (pa, a) ranks before
// (pb, b).
C10_HOST_DEVICE inline bool route_ranks_before(float pa, int64_t a, float pb, int64_t b) {
  const bool nan_a = pa != pa;
  const bool nan_b = pb != pb;
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && pa != pb) return pa > pb;
  return a < b;
}

// MOCE_CHECK the arguments of moce::route_fwd: logits [B, E] floating with E >= 1; noise (if
// given) floating of the same shape on the same device; 1 <= k <= E.
void route_check_fwd(const at::Tensor& logits, const std::optional<at::Tensor>& noise, int64_t k,
                     c10::DeviceType device_type);

// MOCE_CHECK the arguments of moce::route_bwd: noisy and probs [B, E] float32, experts [B, k]
// int64, the optional gradients floating with the shapes of gates [B, k], probs and noisy.
void route_check_bwd(const at::Tensor& noisy, const at::Tensor& probs, const at::Tensor& experts,
                     const std::optional<at::Tensor>& grad_gates, const std::optional<at::Tensor>& grad_probs,
                     const std::optional<at::Tensor>& grad_noisy, c10::DeviceType device_type);

}  // namespace moce
