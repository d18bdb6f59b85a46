// dispatch: gather images into the expert order of a routing plan
// (moce_kernels/dispatch/reference.py).
//
// This file holds the schema of the ops (TORCH_LIBRARY_FRAGMENT), the argument checks shared
// with the CUDA kernels (csrc/cuda/dispatch.cu) and the CPU kernels.
//
//   dispatch_fwd(x, sorted_images, inverse) -> out
//     x: [B, ...] of ANY dtype (rows are moved as bytes); sorted_images, inverse: [S] int64,
//     S = B * k; out: [S, ...], out[i] = x[sorted_images[i]]. inverse is not read by the forward:
//     it is an argument so the autograd formula (moce_kernels/dispatch/compiled.py) can save it.
//   dispatch_bwd(grad_out, inverse, batch) -> grad_x
//     grad_out: [S, ...] floating; grad_x: [batch, ...] in grad_out's dtype,
//     grad_x[b] = sum_{j < k} grad_out[inverse[b * k + j]], summed in float32 (float64 for
//     float64) in the order j = 0..k-1: a gather, no scatter, no atomics.
//
// The CPU ops check every index before use (RuntimeError naming the tensor); the CUDA ops cannot
// without a synchronisation, so a row with an out-of-range index comes out all ones bits (NaN for
// every float dtype) instead of reading out of bounds.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.h"
#include "dispatch.h"

namespace moce {

namespace {

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                  const char* like_name, c10::DeviceType device_type) {
  MOCE_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ",
             c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", t.device());
  MOCE_CHECK(t.device() == like.device(), op, ": ", name, " must be on the device of ", like_name, " (",
             like.device(), "), got ", t.device());
}

void check_index(const char* op, const char* name, const at::Tensor& t, int64_t length) {
  MOCE_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  MOCE_CHECK(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape [S] = [", length,
             "], got shape ", t.sizes());
  MOCE_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
}

void check_rows(const char* op, int64_t slots, int64_t batch) {
  MOCE_CHECK(batch > 0 ? slots % batch == 0 : slots == 0, op, ": the plan's S = ", slots,
             " slots must be a multiple of the batch size B = ", batch, " (S = B * k)");
}

}  // namespace

void dispatch_check_fwd(const at::Tensor& x, const at::Tensor& sorted_images, const at::Tensor& inverse,
                        c10::DeviceType device_type) {
  constexpr const char* op = "moce::dispatch_fwd";
  MOCE_CHECK(x.defined(), op, ": x is an undefined tensor");
  MOCE_CHECK(x.dim() >= 1, op, ": x must be a [B, ...] tensor (at least 1-D), got a 0-D tensor");
  MOCE_CHECK(x.device().type() == device_type, op, ": x must be a ",
             c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", x.device());
  MOCE_CHECK(sorted_images.defined(), op, ": sorted_images is an undefined tensor");
  MOCE_CHECK(sorted_images.dim() == 1, op, ": sorted_images must be a 1-D [S] tensor, got shape ",
             sorted_images.sizes());
  const int64_t slots = sorted_images.size(0);
  check_index(op, "sorted_images", sorted_images, slots);
  check_index(op, "inverse", inverse, slots);
  check_device(op, "sorted_images", sorted_images, x, "x", device_type);
  check_device(op, "inverse", inverse, x, "x", device_type);
  check_rows(op, slots, x.size(0));
}

void dispatch_check_bwd(const at::Tensor& grad_out, const at::Tensor& inverse, int64_t batch,
                        c10::DeviceType device_type) {
  constexpr const char* op = "moce::dispatch_bwd";
  MOCE_CHECK(grad_out.defined(), op, ": grad_out is an undefined tensor");
  MOCE_CHECK(grad_out.dim() >= 1, op,
             ": grad_out must be a [S, ...] tensor (at least 1-D), got a 0-D tensor");
  const auto t = grad_out.scalar_type();
  MOCE_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
             ": grad_out must be float32, float64, bfloat16 or float16, got ", t);
  MOCE_CHECK(grad_out.device().type() == device_type, op, ": grad_out must be a ",
             c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", grad_out.device());
  check_index(op, "inverse", inverse, grad_out.size(0));
  check_device(op, "inverse", inverse, grad_out, "grad_out", device_type);
  MOCE_CHECK(batch >= 0, op, ": batch must be >= 0, got ", batch);
  check_rows(op, grad_out.size(0), batch);
}

namespace {

// MOCE_CHECK that every index is in [0, bound).
void check_index_values(const char* op, const char* name, const at::Tensor& index, int64_t bound) {
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    MOCE_CHECK(idx[i] >= 0 && idx[i] < bound, op, ": ", name, "[", i, "] = ", idx[i],
               " is out of range [0, ", bound, ")");
  }
}

// Elements per row of a [rows, ...] tensor (the product of the other dimensions).
int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

at::Tensor dispatch_fwd_cpu(const at::Tensor& x_in, const at::Tensor& sorted_images_in,
                            const at::Tensor& inverse) {
  constexpr const char* op = "moce::dispatch_fwd";
  dispatch_check_fwd(x_in, sorted_images_in, inverse, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor sorted_images = sorted_images_in.contiguous();
  const int64_t batch = x.size(0), slots = sorted_images.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = slots;
  at::Tensor out = at::empty(shape, x.options());
  check_index_values(op, "sorted_images", sorted_images, batch);
  const int64_t row_bytes = row_numel(x) * static_cast<int64_t>(x.element_size());
  if (out.numel() == 0) return out;
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* idx = sorted_images.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE * 4 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, slots, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memcpy(dst + i * row_bytes, src + idx[i] * row_bytes, row_bytes);
  });
  return out;
}

// Features per inner step: the k partial rows of a block stay in L1.
constexpr int64_t kFeatureBlock = 1024;

template <typename scalar_t>
void dispatch_bwd_cpu_kernel(const scalar_t* grad_out, const int64_t* inverse, scalar_t* grad_x,
                             int64_t batch, int64_t k, int64_t features) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, k * features));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    acc_t acc[kFeatureBlock];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t f0 = 0; f0 < features; f0 += kFeatureBlock) {
        const int64_t F = std::min(kFeatureBlock, features - f0);
        const scalar_t* first = grad_out + inverse[b * k] * features + f0;
        for (int64_t f = 0; f < F; ++f) acc[f] = static_cast<acc_t>(first[f]);
        for (int64_t j = 1; j < k; ++j) {
          const scalar_t* row = grad_out + inverse[b * k + j] * features + f0;
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) acc[f] += static_cast<acc_t>(row[f]);
        }
        scalar_t* out = grad_x + b * features + f0;
        for (int64_t f = 0; f < F; ++f) out[f] = static_cast<scalar_t>(acc[f]);
      }
    }
  });
}

at::Tensor dispatch_bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& inverse_in, int64_t batch) {
  constexpr const char* op = "moce::dispatch_bwd";
  dispatch_check_bwd(grad_out_in, inverse_in, batch, c10::DeviceType::CPU);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor inverse = inverse_in.contiguous();
  const int64_t slots = grad_out.size(0);
  std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
  shape[0] = batch;
  at::Tensor grad_x = at::empty(shape, grad_out.options());
  check_index_values(op, "inverse", inverse, slots);
  if (grad_x.numel() == 0) return grad_x;
  const int64_t k = slots / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "dispatch_bwd_cpu", [&] {
    dispatch_bwd_cpu_kernel<scalar_t>(grad_out.const_data_ptr<scalar_t>(), inverse.const_data_ptr<int64_t>(),
                                      grad_x.mutable_data_ptr<scalar_t>(), batch, k, row_numel(grad_out));
  });
  return grad_x;
}

}  // namespace

}  // namespace moce

TORCH_LIBRARY_FRAGMENT(moce, m) {
  m.def("dispatch_fwd(Tensor x, Tensor sorted_images, Tensor inverse) -> Tensor");
  m.def("dispatch_bwd(Tensor grad_out, Tensor inverse, int batch) -> Tensor");
}

TORCH_LIBRARY_IMPL(moce, CPU, m) {
  m.impl("dispatch_fwd", &moce::dispatch_fwd_cpu);
  m.impl("dispatch_bwd", &moce::dispatch_bwd_cpu);
}
