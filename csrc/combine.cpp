// combine: expert outputs back to image order, weighted by the gates, summed over the k choices
// (moce_kernels/combine/reference.py).
//
// This file holds the schema of the ops (TORCH_LIBRARY_FRAGMENT), the argument checks shared
// with the CUDA kernels (csrc/cuda/combine.cu) and the CPU kernels.
//
//   combine_fwd(y, gates, inverse, sorted_slots) -> out
//     y: [S, ...] floating (expert order); gates: [B, k] floating, S = B * k; inverse,
//     sorted_slots: [S] int64. out: [B, ...] in y's dtype,
//       out[b] = sum_{j < k} gates[b, j] * y[inverse[b * k + j]]   (j = 0..k-1, in that order).
//     sorted_slots is not read by the forward: it is an argument so the autograd formula
//     (moce_kernels/combine/compiled.py) can save it.
//   combine_bwd(grad_out, y, gates, inverse, sorted_slots) -> (grad_y, grad_gates)
//     grad_y[i] = gates[s] * grad_out[s / k] with s = sorted_slots[i] (a gather: no atomics), in
//     y's dtype; grad_gates[b, j] = sum_f y[inverse[b * k + j], f] * grad_out[b, f], in gates'
//     dtype.
//
// Products and sums in float32 (float64 when y or gates is float64). The CPU ops check every
// index before use; the CUDA ops cannot without a synchronisation, so an element that needs an
// out-of-range index comes out NaN instead of reading out of bounds.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "check.h"
#include "combine.h"

namespace moce {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  MOCE_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  MOCE_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name,
             " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& y,
                  c10::DeviceType device_type) {
  MOCE_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ",
             c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", t.device());
  MOCE_CHECK(t.device() == y.device(), op, ": ", name, " must be on the device of y (", y.device(),
             "), got ", t.device());
}

void check_index(const char* op, const char* name, const at::Tensor& t, int64_t slots, const at::Tensor& y,
                 c10::DeviceType device_type) {
  MOCE_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  MOCE_CHECK(t.dim() == 1 && t.size(0) == slots, op, ": ", name, " must have shape [S] = [", slots,
             "] (S = y.size(0)), got shape ", t.sizes());
  MOCE_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  check_device(op, name, t, y, device_type);
}

void check_common(const char* op, const at::Tensor& y, const at::Tensor& gates, const at::Tensor& inverse,
                  const at::Tensor& sorted_slots, c10::DeviceType device_type) {
  check_float(op, "y", y);
  MOCE_CHECK(y.dim() >= 1, op, ": y must be a [S, ...] tensor (at least 1-D), got a 0-D tensor");
  check_device(op, "y", y, y, device_type);
  check_float(op, "gates", gates);
  MOCE_CHECK(gates.dim() == 2 && gates.size(0) * gates.size(1) == y.size(0), op,
             ": gates must have shape [B, k] with B * k = S = ", y.size(0), " (y.size(0)), got shape ",
             gates.sizes());
  MOCE_CHECK(gates.size(1) >= 1, op, ": gates must have at least one column (k >= 1), got shape ",
             gates.sizes());
  check_device(op, "gates", gates, y, device_type);
  check_index(op, "inverse", inverse, y.size(0), y, device_type);
  check_index(op, "sorted_slots", sorted_slots, y.size(0), y, device_type);
}

}  // namespace

at::ScalarType combine_acc_dtype(at::ScalarType y_dtype, at::ScalarType gates_dtype) {
  return (y_dtype == at::kDouble || gates_dtype == at::kDouble) ? at::kDouble : at::kFloat;
}

void combine_check_fwd(const at::Tensor& y, const at::Tensor& gates, const at::Tensor& inverse,
                       const at::Tensor& sorted_slots, c10::DeviceType device_type) {
  check_common("moce::combine_fwd", y, gates, inverse, sorted_slots, device_type);
}

void combine_check_bwd(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& gates,
                       const at::Tensor& inverse, const at::Tensor& sorted_slots,
                       c10::DeviceType device_type) {
  constexpr const char* op = "moce::combine_bwd";
  check_common(op, y, gates, inverse, sorted_slots, device_type);
  MOCE_CHECK(grad_out.defined(), op, ": grad_out is an undefined tensor");
  std::vector<int64_t> shape(y.sizes().begin(), y.sizes().end());
  shape[0] = gates.size(0);
  MOCE_CHECK(grad_out.sizes() == at::IntArrayRef(shape), op, ": grad_out must have shape ",
             at::IntArrayRef(shape), " ([B, ...] with y's feature shape), got ", grad_out.sizes());
  MOCE_CHECK(grad_out.scalar_type() == y.scalar_type(), op, ": grad_out must have the dtype of y (",
             y.scalar_type(), "), got ", grad_out.scalar_type());
  check_device(op, "grad_out", grad_out, y, device_type);
}

namespace {

void check_index_values(const char* op, const char* name, const at::Tensor& index, int64_t bound) {
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    MOCE_CHECK(idx[i] >= 0 && idx[i] < bound, op, ": ", name, "[", i, "] = ", idx[i],
               " is out of range [0, ", bound, ")");
  }
}

int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Calls f(acc_t{}) with acc_t = double or float, as combine_acc_dtype says.
template <typename F>
void with_acc_type(at::ScalarType acc_dtype, F&& f) {
  if (acc_dtype == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

constexpr int64_t kFeatureBlock = 1024;

template <typename scalar_t, typename acc_t>
void combine_fwd_cpu_kernel(const scalar_t* y, const acc_t* gates, const int64_t* inverse, scalar_t* out,
                            int64_t batch, int64_t k, int64_t features) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, k * features));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    acc_t acc[kFeatureBlock];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t f0 = 0; f0 < features; f0 += kFeatureBlock) {
        const int64_t F = std::min(kFeatureBlock, features - f0);
        std::fill_n(acc, F, acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const acc_t g = gates[b * k + j];
          const scalar_t* row = y + inverse[b * k + j] * features + f0;
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) acc[f] += g * static_cast<acc_t>(row[f]);
        }
        scalar_t* o = out + b * features + f0;
        for (int64_t f = 0; f < F; ++f) o[f] = static_cast<scalar_t>(acc[f]);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void combine_bwd_cpu_kernel(const scalar_t* grad_out, const scalar_t* y, const acc_t* gates,
                            const int64_t* inverse, const int64_t* sorted_slots, scalar_t* grad_y,
                            acc_t* grad_gates, int64_t slots, int64_t k, int64_t features) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, features));
  // grad_y: sorted row i takes slot s = sorted_slots[i], image s / k, weight gates[s].
  at::parallel_for(0, slots, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = sorted_slots[i];
      const acc_t g = gates[s];
      const scalar_t* src = grad_out + (s / k) * features;
      scalar_t* dst = grad_y + i * features;
#pragma omp simd
      for (int64_t f = 0; f < features; ++f) dst[f] = static_cast<scalar_t>(g * static_cast<acc_t>(src[f]));
    }
  });
  // grad_gates: one dot product per slot, each by one thread (the same bits for any thread count).
  at::parallel_for(0, slots, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const scalar_t* row = y + inverse[s] * features;
      const scalar_t* go = grad_out + (s / k) * features;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t f = 0; f < features; ++f) dot += static_cast<acc_t>(row[f]) * static_cast<acc_t>(go[f]);
      grad_gates[s] = dot;
    }
  });
}

at::Tensor combine_fwd_cpu(const at::Tensor& y_in, const at::Tensor& gates_in, const at::Tensor& inverse_in,
                           const at::Tensor& sorted_slots) {
  constexpr const char* op = "moce::combine_fwd";
  combine_check_fwd(y_in, gates_in, inverse_in, sorted_slots, c10::DeviceType::CPU);
  const at::Tensor y = y_in.contiguous();
  const at::Tensor inverse = inverse_in.contiguous();
  const int64_t batch = gates_in.size(0), k = gates_in.size(1), slots = y.size(0);
  std::vector<int64_t> shape(y.sizes().begin(), y.sizes().end());
  shape[0] = batch;
  at::Tensor out = at::empty(shape, y.options());
  check_index_values(op, "inverse", inverse, slots);
  if (out.numel() == 0) return out;
  const auto acc_dtype = combine_acc_dtype(y.scalar_type(), gates_in.scalar_type());
  const at::Tensor gates = gates_in.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_fwd_cpu", [&] {
    with_acc_type(acc_dtype, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      combine_fwd_cpu_kernel<scalar_t, acc_t>(y.const_data_ptr<scalar_t>(), gates.const_data_ptr<acc_t>(),
                                              inverse.const_data_ptr<int64_t>(),
                                              out.mutable_data_ptr<scalar_t>(), batch, k, row_numel(y));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                                   const at::Tensor& gates_in, const at::Tensor& inverse_in,
                                                   const at::Tensor& sorted_slots_in) {
  constexpr const char* op = "moce::combine_bwd";
  combine_check_bwd(grad_out_in, y_in, gates_in, inverse_in, sorted_slots_in, c10::DeviceType::CPU);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor inverse = inverse_in.contiguous();
  const at::Tensor sorted_slots = sorted_slots_in.contiguous();
  const int64_t k = gates_in.size(1), slots = y.size(0);
  at::Tensor grad_y = at::empty(y.sizes(), y.options());
  check_index_values(op, "inverse", inverse, slots);
  check_index_values(op, "sorted_slots", sorted_slots, slots);
  const auto acc_dtype = combine_acc_dtype(y.scalar_type(), gates_in.scalar_type());
  if (y.numel() == 0) return {grad_y, at::zeros(gates_in.sizes(), gates_in.options())};
  const at::Tensor gates = gates_in.to(acc_dtype).contiguous();
  at::Tensor grad_gates = at::empty({slots}, y.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_bwd_cpu", [&] {
    with_acc_type(acc_dtype, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      combine_bwd_cpu_kernel<scalar_t, acc_t>(
          grad_out.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), gates.const_data_ptr<acc_t>(),
          inverse.const_data_ptr<int64_t>(), sorted_slots.const_data_ptr<int64_t>(),
          grad_y.mutable_data_ptr<scalar_t>(), grad_gates.mutable_data_ptr<acc_t>(), slots, k, row_numel(y));
    });
  });
  return {grad_y, grad_gates.view(gates_in.sizes()).to(gates_in.scalar_type())};
}

}  // namespace

}  // namespace moce

TORCH_LIBRARY_FRAGMENT(moce, m) {
  m.def("combine_fwd(Tensor y, Tensor gates, Tensor inverse, Tensor sorted_slots) -> Tensor");
  m.def(
      "combine_bwd(Tensor grad_out, Tensor y, Tensor gates, Tensor inverse, Tensor sorted_slots) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moce, CPU, m) {
  m.impl("combine_fwd", &moce::combine_fwd_cpu);
  m.impl("combine_bwd", &moce::combine_bwd_cpu);
}
