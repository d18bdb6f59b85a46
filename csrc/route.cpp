// route: router logits -> top-k gates per image and the dispatch plan
// (moce_kernels/route/reference.py).
//
// This file holds the schema of the ops (TORCH_LIBRARY_FRAGMENT), the argument checks shared
// with the CUDA kernels (csrc/cuda/route.cu) and the CPU kernels.
//
//   route_fwd(logits, noise?, k) -> (gates, experts, probs, noisy_logits, counts, offsets,
//                                    sorted_slots, sorted_images, inverse)
//     the nine RoutingPlan fields, in that order. logits, noise: [B, E] any float dtype, read in
//     float32. noisy = logits + noise (= logits without noise); probs = softmax(logits);
//     gates [B, k] float32 / experts [B, k] int64: the top-k of softmax(noisy) by decreasing
//     probability, ties to the lower expert index, NaN first (route_ranks_before in route.h).
//     counts [E], offsets [E + 1], sorted_slots / sorted_images / inverse [B * k]: int64; the
//     slots s = b * k + j sorted by expert, stable (by image, then choice).
//   route_bwd(noisy, probs, experts, grad_gates?, grad_probs?, grad_noisy?)
//       -> (grad_wrt_noisy, grad_wrt_logits)      both [B, E] float32
//     p = softmax(noisy), G[b, e] = the gate gradients of the slots of b that chose e:
//       grad_wrt_noisy  = p * (G - sum_e p * G) + grad_noisy   (also the noise's gradient)
//       grad_wrt_logits = grad_wrt_noisy + probs * (grad_probs - sum_e probs * grad_probs)
//     A missing gradient counts as zero.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "check.h"
#include "route.h"

namespace moce {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                  const char* like_name, c10::DeviceType device_type) {
  MOCE_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ",
             c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", t.device());
  MOCE_CHECK(t.device() == like.device(), op, ": ", name, " must be on the device of ", like_name, " (",
             like.device(), "), got ", t.device());
}

void check_matrix(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols,
                  const char* shape_name) {
  MOCE_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  MOCE_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must have shape ",
             shape_name, " = [", rows, ", ", cols, "], got shape ", t.sizes());
}

}  // namespace

void route_check_fwd(const at::Tensor& logits, const std::optional<at::Tensor>& noise, int64_t k,
                     c10::DeviceType device_type) {
  constexpr const char* op = "moce::route_fwd";
  MOCE_CHECK(logits.defined(), op, ": logits is an undefined tensor");
  MOCE_CHECK(logits.dim() == 2, op, ": logits must be a 2-D [B, E] tensor, got shape ", logits.sizes());
  MOCE_CHECK(is_supported_dtype(logits.scalar_type()), op,
             ": logits must be float32, float64, bfloat16 or float16, got ", logits.scalar_type());
  check_device(op, "logits", logits, logits, "logits", device_type);
  const int64_t num_experts = logits.size(1);
  MOCE_CHECK(num_experts >= 1, op, ": logits must have at least one expert column (E >= 1), got shape ",
             logits.sizes());
  MOCE_CHECK(k >= 1 && k <= num_experts, op, ": k must be in 1..E = 1..", num_experts, ", got ", k);
  if (noise.has_value() && noise->defined()) {
    check_matrix(op, "noise", *noise, logits.size(0), num_experts, "[B, E]");
    MOCE_CHECK(is_supported_dtype(noise->scalar_type()), op,
               ": noise must be float32, float64, bfloat16 or float16, got ", noise->scalar_type());
    check_device(op, "noise", *noise, logits, "logits", device_type);
  }
}

void route_check_bwd(const at::Tensor& noisy, const at::Tensor& probs, const at::Tensor& experts,
                     const std::optional<at::Tensor>& grad_gates, const std::optional<at::Tensor>& grad_probs,
                     const std::optional<at::Tensor>& grad_noisy, c10::DeviceType device_type) {
  constexpr const char* op = "moce::route_bwd";
  MOCE_CHECK(noisy.defined(), op, ": noisy is an undefined tensor");
  MOCE_CHECK(noisy.dim() == 2, op, ": noisy must be a 2-D [B, E] tensor, got shape ", noisy.sizes());
  const int64_t batch = noisy.size(0), num_experts = noisy.size(1);
  MOCE_CHECK(noisy.scalar_type() == at::kFloat, op, ": noisy must be float32, got ", noisy.scalar_type());
  check_device(op, "noisy", noisy, noisy, "noisy", device_type);
  check_matrix(op, "probs", probs, batch, num_experts, "[B, E]");
  MOCE_CHECK(probs.scalar_type() == at::kFloat, op, ": probs must be float32, got ", probs.scalar_type());
  check_device(op, "probs", probs, noisy, "noisy", device_type);
  MOCE_CHECK(experts.defined(), op, ": experts is an undefined tensor");
  MOCE_CHECK(experts.dim() == 2 && experts.size(0) == batch, op,
             ": experts must have shape [B, k] with B = ", batch, ", got shape ", experts.sizes());
  MOCE_CHECK(experts.scalar_type() == at::kLong, op, ": experts must be int64, got ", experts.scalar_type());
  check_device(op, "experts", experts, noisy, "noisy", device_type);
  const int64_t k = experts.size(1);
  const auto check_grad = [&](const char* name, const std::optional<at::Tensor>& g, int64_t cols,
                              const char* shape_name) {
    if (!g.has_value() || !g->defined()) return;
    check_matrix(op, name, *g, batch, cols, shape_name);
    MOCE_CHECK(is_supported_dtype(g->scalar_type()), op, ": ", name,
               " must be float32, float64, bfloat16 or float16, got ", g->scalar_type());
    check_device(op, name, *g, noisy, "noisy", device_type);
  };
  check_grad("grad_gates", grad_gates, k, "[B, k]");
  check_grad("grad_probs", grad_probs, num_experts, "[B, E]");
  check_grad("grad_noisy", grad_noisy, num_experts, "[B, E]");
}

namespace {

// Row softmax of E float32 values: (max, 1 / sum of exp(x - max)); NaN in, NaN out.
void softmax_stats(const float* x, int64_t E, float& max_out, float& inv_sum) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) m = std::max(m, x[e]);
  float s = 0.0f;
  for (int64_t e = 0; e < E; ++e) s += std::exp(x[e] - m);
  max_out = m;
  inv_sum = 1.0f / s;
}

using Plan = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor, at::Tensor>;

Plan route_fwd_cpu(const at::Tensor& logits_in, const std::optional<at::Tensor>& noise_in, int64_t k) {
  route_check_fwd(logits_in, noise_in, k, c10::DeviceType::CPU);
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

  const float* lg = logits.const_data_ptr<float>();
  const float* nz = has_noise ? noise.const_data_ptr<float>() : nullptr;
  float* g = gates.mutable_data_ptr<float>();
  int64_t* ex = experts.mutable_data_ptr<int64_t>();
  float* pr = probs.mutable_data_ptr<float>();
  float* ny = noisy.mutable_data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
    std::vector<float> p(E);
    for (int64_t b = begin; b < end; ++b) {
      const float* clean = lg + b * E;
      float* nb = ny + b * E;
      for (int64_t e = 0; e < E; ++e) nb[e] = nz == nullptr ? clean[e] : clean[e] + nz[b * E + e];
      float m, inv;
      softmax_stats(clean, E, m, inv);
      for (int64_t e = 0; e < E; ++e) pr[b * E + e] = std::exp(clean[e] - m) * inv;
      softmax_stats(nb, E, m, inv);
      for (int64_t e = 0; e < E; ++e) p[e] = std::exp(nb[e] - m) * inv;
      // The j-th choice: the best expert ranked after choice j - 1 (a total order, so the k
      // choices are distinct without a "taken" mask).
      int64_t prev = -1;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          if (prev >= 0 && !route_ranks_before(p[prev], prev, p[e], e)) continue;
          if (best < 0 || route_ranks_before(p[e], e, p[best], best)) best = e;
        }
        ex[b * k + j] = best;
        g[b * k + j] = p[best];
        prev = best;
      }
    }
  });

  // The plan: a counting sort of the slots by expert (stable), serial (S = B * k is small).
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  std::fill_n(cnt, E, int64_t(0));
  for (int64_t s = 0; s < S; ++s) ++cnt[ex[s]];
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + cnt[e];
  std::vector<int64_t> next(off, off + E);
  int64_t* slots = sorted_slots.mutable_data_ptr<int64_t>();
  int64_t* images = sorted_images.mutable_data_ptr<int64_t>();
  int64_t* inv = inverse.mutable_data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t row = next[ex[s]]++;
    slots[row] = s;
    images[row] = s / k;
    inv[s] = row;
  }
  return {gates, experts, probs, noisy, counts, offsets, sorted_slots, sorted_images, inverse};
}

std::tuple<at::Tensor, at::Tensor> route_bwd_cpu(const at::Tensor& noisy_in, const at::Tensor& probs_in,
                                                 const at::Tensor& experts_in,
                                                 const std::optional<at::Tensor>& grad_gates_in,
                                                 const std::optional<at::Tensor>& grad_probs_in,
                                                 const std::optional<at::Tensor>& grad_noisy_in) {
  route_check_bwd(noisy_in, probs_in, experts_in, grad_gates_in, grad_probs_in, grad_noisy_in,
                  c10::DeviceType::CPU);
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
  const float* ny = noisy.const_data_ptr<float>();
  const float* pr = probs.const_data_ptr<float>();
  const int64_t* ex = experts.const_data_ptr<int64_t>();
  const float* gg = grad_gates.defined() ? grad_gates.const_data_ptr<float>() : nullptr;
  const float* gp = grad_probs.defined() ? grad_probs.const_data_ptr<float>() : nullptr;
  const float* gn = grad_noisy.defined() ? grad_noisy.const_data_ptr<float>() : nullptr;
  float* out_n = grad_wrt_noisy.mutable_data_ptr<float>();
  float* out_l = grad_wrt_logits.mutable_data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / E), [&](int64_t begin, int64_t end) {
    std::vector<float> p(E);
    std::vector<float> scattered(E);
    for (int64_t b = begin; b < end; ++b) {
      float* on = out_n + b * E;
      float* ol = out_l + b * E;
      std::fill_n(on, E, 0.0f);
      if (gg != nullptr) {
        float m, inv;
        softmax_stats(ny + b * E, E, m, inv);
        for (int64_t e = 0; e < E; ++e) p[e] = std::exp(ny[b * E + e] - m) * inv;
        std::fill(scattered.begin(), scattered.end(), 0.0f);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t e = ex[b * k + j];
          // An expert index out of range (never from route_fwd) contributes nothing.
          if (e >= 0 && e < E) scattered[e] += gg[b * k + j];
        }
        float dot = 0.0f;
        for (int64_t e = 0; e < E; ++e) dot += p[e] * scattered[e];
        for (int64_t e = 0; e < E; ++e) on[e] = p[e] * (scattered[e] - dot);
      }
      if (gn != nullptr) {
        for (int64_t e = 0; e < E; ++e) on[e] += gn[b * E + e];
      }
      std::copy_n(on, E, ol);
      if (gp != nullptr) {
        const float* q = pr + b * E;
        const float* gq = gp + b * E;
        float dot = 0.0f;
        for (int64_t e = 0; e < E; ++e) dot += q[e] * gq[e];
        for (int64_t e = 0; e < E; ++e) ol[e] += q[e] * (gq[e] - dot);
      }
    }
  });
  return {grad_wrt_noisy, grad_wrt_logits};
}

}  // namespace

}  // namespace moce

TORCH_LIBRARY_FRAGMENT(moce, m) {
  m.def(
      "route_fwd(Tensor logits, Tensor? noise, int k) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "route_bwd(Tensor noisy, Tensor probs, Tensor experts, Tensor? grad_gates, Tensor? grad_probs, "
      "Tensor? grad_noisy) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moce, CPU, m) {
  m.impl("route_fwd", &moce::route_fwd_cpu);
  m.impl("route_bwd", &moce::route_bwd_cpu);
}
