// CUDA implementation of moce::route_fwd / moce::route_bwd (schemas and the CPU kernels in
// csrc/route.cpp, kernel bodies in route.cuh). No host synchronisation: every size comes from
// the tensors' shapes, every plan value stays on the device. At most routing::kMaxExperts
// experts.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../check.h"
#include "../route.h"
#include "route.cuh"

namespace moce::cuda {

namespace {

constexpr int kThreads = 128;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

unsigned int blocks_for(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  MOCE_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "moce::route: input too large (", items,
             " rows)");
  return static_cast<unsigned int>(blocks);
}

using Plan = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor, at::Tensor>;

Plan route_fwd_cuda(const at::Tensor& logits_in, const std::optional<at::Tensor>& noise_in, int64_t k) {
  route_check_fwd(logits_in, noise_in, k, c10::DeviceType::CUDA);
  MOCE_CHECK(logits_in.size(1) <= routing::kMaxExperts, "moce::route_fwd: the CUDA kernels take at most ",
             routing::kMaxExperts, " experts, got ", logits_in.size(1));
  const c10::cuda::CUDAGuard guard(logits_in.device());
  // Conversions on the device (no synchronisation); no-ops for contiguous float32 inputs.
  const at::Tensor logits = logits_in.to(at::kFloat).contiguous();
  const bool has_noise = noise_in.has_value() && noise_in->defined();
  const at::Tensor noise = has_noise ? noise_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t B = logits.size(0), E = logits.size(1), S = B * k;
  const auto f32 = logits.options();
  const auto i64 = logits.options().dtype(at::kLong);
  at::Tensor gates = at::empty({B, k}, f32);
  at::Tensor experts = at::empty({B, k}, i64);
  at::Tensor probs = at::empty({B, E}, f32);
  at::Tensor noisy = at::empty({B, E}, f32);
  at::Tensor counts = at::empty({E}, i64);
  at::Tensor offsets = at::empty({E + 1}, i64);
  at::Tensor sorted_slots = at::empty({S}, i64);
  at::Tensor sorted_images = at::empty({S}, i64);
  at::Tensor inverse = at::empty({S}, i64);
  const cudaStream_t stream = current_stream();
  if (B > 0) {
    routing::route_images_kernel<<<blocks_for(B), kThreads, 0, stream>>>(
        logits.const_data_ptr<float>(), has_noise ? noise.const_data_ptr<float>() : nullptr,
        gates.mutable_data_ptr<float>(), experts.mutable_data_ptr<int64_t>(), probs.mutable_data_ptr<float>(),
        noisy.mutable_data_ptr<float>(), B, E, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Also for B = 0: it writes the (zero) counts and offsets.
  const size_t shared = static_cast<size_t>(E) * (sizeof(int64_t) + routing::kRankWarps * sizeof(int));
  routing::route_rank_kernel<<<1, routing::kRankThreads, shared, stream>>>(
      experts.const_data_ptr<int64_t>(), inverse.mutable_data_ptr<int64_t>(),
      counts.mutable_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>(), S, E);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (S > 0) {
    routing::route_scatter_kernel<<<blocks_for(S), kThreads, 0, stream>>>(
        experts.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
        inverse.mutable_data_ptr<int64_t>(), sorted_slots.mutable_data_ptr<int64_t>(),
        sorted_images.mutable_data_ptr<int64_t>(), S, E, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gates, experts, probs, noisy, counts, offsets, sorted_slots, sorted_images, inverse};
}

std::tuple<at::Tensor, at::Tensor> route_bwd_cuda(const at::Tensor& noisy_in, const at::Tensor& probs_in,
                                                  const at::Tensor& experts_in,
                                                  const std::optional<at::Tensor>& grad_gates_in,
                                                  const std::optional<at::Tensor>& grad_probs_in,
                                                  const std::optional<at::Tensor>& grad_noisy_in) {
  route_check_bwd(noisy_in, probs_in, experts_in, grad_gates_in, grad_probs_in, grad_noisy_in,
                  c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(noisy_in.device());
  const auto as_f32 = [](const std::optional<at::Tensor>& t) {
    return (t.has_value() && t->defined()) ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor noisy = noisy_in.contiguous();
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor experts = experts_in.contiguous();
  const at::Tensor grad_gates = as_f32(grad_gates_in);
  const at::Tensor grad_probs = as_f32(grad_probs_in);
  const at::Tensor grad_noisy = as_f32(grad_noisy_in);
  const int64_t B = noisy.size(0), E = noisy.size(1), k = experts.size(1);
  at::Tensor grad_wrt_noisy = at::empty({B, E}, noisy.options());
  at::Tensor grad_wrt_logits = at::empty({B, E}, noisy.options());
  if (B == 0 || E == 0) return {grad_wrt_noisy, grad_wrt_logits};
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; };
  routing::route_bwd_kernel<<<blocks_for(B), kThreads, 0, current_stream()>>>(
      noisy.const_data_ptr<float>(), probs.const_data_ptr<float>(), experts.const_data_ptr<int64_t>(),
      ptr(grad_gates), ptr(grad_probs), ptr(grad_noisy), grad_wrt_noisy.mutable_data_ptr<float>(),
      grad_wrt_logits.mutable_data_ptr<float>(), B, E, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_wrt_noisy, grad_wrt_logits};
}

}  // namespace

}  // namespace moce::cuda

TORCH_LIBRARY_IMPL(moce, CUDA, m) {
  m.impl("route_fwd", &moce::cuda::route_fwd_cuda);
  m.impl("route_bwd", &moce::cuda::route_bwd_cuda);
}
