// CUDA implementation of moce::dispatch_fwd / moce::dispatch_bwd (schemas and the CPU kernels in
// csrc/dispatch.cpp, kernel bodies in dispatch.cuh). No host synchronisation: the indices stay
// on the device and are bounds-checked there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../dispatch.h"
#include "dispatch.cuh"

namespace moce::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0; }

// Blocks along a row (x) and down the rows (y, strided in the kernels).
dim3 row_grid(int64_t row_items, int64_t rows) {
  const int64_t x = std::max<int64_t>(1, std::min<int64_t>((row_items + kThreads - 1) / kThreads, 1 << 20));
  return dim3(static_cast<unsigned int>(x),
              static_cast<unsigned int>(std::clamp<int64_t>(rows, 1, kMaxGridY)));
}

int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

at::Tensor dispatch_fwd_cuda(const at::Tensor& x_in, const at::Tensor& sorted_images_in,
                             const at::Tensor& inverse) {
  dispatch_check_fwd(x_in, sorted_images_in, inverse, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor sorted_images = sorted_images_in.contiguous();
  const int64_t batch = x.size(0), slots = sorted_images.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = slots;
  at::Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = row_numel(x) * static_cast<int64_t>(x.element_size());
  const cudaStream_t stream = current_stream();
  const auto launch = [&](auto word_tag) {
    using W = decltype(word_tag);
    const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(W));
    rows::dispatch_fwd_kernel<W><<<row_grid(row_words, slots), kThreads, 0, stream>>>(
        static_cast<const W*>(x.const_data_ptr()), sorted_images.const_data_ptr<int64_t>(),
        static_cast<W*>(out.mutable_data_ptr()), batch, slots, row_words);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  rows::with_widest_word(row_bytes, x.const_data_ptr(), out.const_data_ptr(), launch);
  return out;
}

at::Tensor dispatch_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& inverse_in, int64_t batch) {
  dispatch_check_bwd(grad_out_in, inverse_in, batch, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor inverse = inverse_in.contiguous();
  std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
  shape[0] = batch;
  at::Tensor grad_x = at::empty(shape, grad_out.options());
  if (grad_x.numel() == 0) return grad_x;
  const int64_t k = grad_out.size(0) / batch;
  const int64_t features = row_numel(grad_out);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "dispatch_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int vec = 16 / static_cast<int>(sizeof(scalar_t));
    const auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      rows::dispatch_bwd_kernel<scalar_t, acc_t, V><<<row_grid(features / V, batch), kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), inverse.const_data_ptr<int64_t>(),
          grad_x.mutable_data_ptr<scalar_t>(), batch, k, features);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (features % vec == 0 && aligned(grad_out.const_data_ptr(), 16) &&
        aligned(grad_x.const_data_ptr(), 16)) {
      launch(std::integral_constant<int, vec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return grad_x;
}

}  // namespace

}  // namespace moce::cuda

TORCH_LIBRARY_IMPL(moce, CUDA, m) {
  m.impl("dispatch_fwd", &moce::cuda::dispatch_fwd_cuda);
  m.impl("dispatch_bwd", &moce::cuda::dispatch_bwd_cuda);
}
