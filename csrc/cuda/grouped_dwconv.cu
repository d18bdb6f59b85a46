// CUDA implementation of moce::grouped_dwconv_fwd / moce::grouped_dwconv_bwd (schemas and the CPU
// kernels in csrc/grouped_dwconv.cpp, kernel bodies in grouped_dwconv.cuh).
//
// Nothing here reads a device value on the host: the offsets stay on the device (each block
// finds its row's expert there), channels and kernel sizes travel as a by-value kernel argument.
// At most dwconv::kMaxExperts experts per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../check.h"
#include "../grouped_dwconv.h"
#include "grouped_dwconv.cuh"

namespace moce::cuda {

namespace {

using dwconv::ExpertTable;
using dwconv::Geometry;

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

ExpertTable make_table(const char* op, at::IntArrayRef channels, at::IntArrayRef kernel_sizes) {
  MOCE_CHECK(static_cast<int64_t>(channels.size()) <= dwconv::kMaxExperts, op,
             ": the CUDA kernels take at most ", dwconv::kMaxExperts, " experts, got ", channels.size());
  ExpertTable table{};
  for (size_t e = 0; e < channels.size(); ++e) {
    table.channels[e] = static_cast<int32_t>(channels[e]);
    table.kernel_size[e] = static_cast<int32_t>(kernel_sizes[e]);
  }
  return table;
}

Geometry make_geometry(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  Geometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.tiles_w = (g.W + dwconv::kTileW - 1) / dwconv::kTileW;
  g.tiles = ((g.H + dwconv::kTileH - 1) / dwconv::kTileH) * g.tiles_w;
  g.num_experts = static_cast<int>(weight.size(0));
  MOCE_CHECK(weight.size(3) <= 1023, op, ": weight's window K_max must be at most 1023, got ",
             weight.size(3));
  g.k_max = static_cast<int>(weight.size(3));
  const int64_t blocks = g.N * g.C * g.tiles;
  MOCE_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": input too large (", blocks, " tiles)");
  return g;
}

// The 16-byte path: rows a multiple of the vector width and 16-byte aligned bases.
template <typename scalar_t>
bool use_vectors(int64_t W, std::initializer_list<const void*> ptrs) {
  if (W % (16 / static_cast<int64_t>(sizeof(scalar_t))) != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

at::Tensor grouped_dwconv_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                   const std::optional<at::Tensor>& bias_in, const at::Tensor& offsets_in,
                                   at::IntArrayRef channels, at::IntArrayRef kernel_sizes) {
  constexpr const char* op = "moce::grouped_dwconv_fwd";
  grouped_dwconv_check_fwd(x_in, weight_in, bias_in, offsets_in, channels, kernel_sizes,
                           c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  // A device-side conversion (no synchronisation); a no-op for int64 offsets.
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const ExpertTable table = make_table(op, channels, kernel_sizes);
  const Geometry g = make_geometry(op, x, weight);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const cudaStream_t stream = current_stream();
  const auto blocks = static_cast<unsigned int>(g.N * g.C * g.tiles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_dwconv_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
    const auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      dwconv::with_kernel_class(dwconv::largest_kernel(kernel_sizes), [&](auto class_tag) {
        constexpr int KC = decltype(class_tag)::value;
        dwconv::grouped_dwconv_fwd_kernel<scalar_t, acc_t, V, KC><<<blocks, dwconv::kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
            offsets.const_data_ptr<int64_t>(), table, y.mutable_data_ptr<scalar_t>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (use_vectors<scalar_t>(g.W, {x.const_data_ptr()})) {
      launch(std::integral_constant<int, 16 / static_cast<int>(sizeof(scalar_t))>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_dwconv_bwd_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& offsets_in, at::IntArrayRef channels, at::IntArrayRef kernel_sizes) {
  constexpr const char* op = "moce::grouped_dwconv_bwd";
  grouped_dwconv_check_bwd(grad_y_in, x_in, weight_in, offsets_in, channels, kernel_sizes,
                           c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor offsets = offsets_in.to(at::kLong).contiguous();
  const ExpertTable table = make_table(op, channels, kernel_sizes);
  const Geometry g = make_geometry(op, x, weight);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_b = at::empty({g.num_experts, g.C}, weight.options());
  if (x.numel() == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  const int taps = static_cast<int>(grouped_dwconv_num_taps(kernel_sizes));
  const cudaStream_t stream = current_stream();
  const auto blocks = static_cast<unsigned int>(g.N * g.C * g.tiles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_dwconv_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // [N * C * tiles, taps] per-tile partial sums; every entry is written by the first kernel.
    at::Tensor partial =
        at::empty({g.N * g.C * g.tiles, taps}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      dwconv::with_kernel_class(dwconv::largest_kernel(kernel_sizes), [&](auto class_tag) {
        constexpr int KC = decltype(class_tag)::value;
        dwconv::grouped_dwconv_bwd_kernel<scalar_t, acc_t, V, KC><<<blocks, dwconv::kThreads, 0, stream>>>(
            grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
            offsets.const_data_ptr<int64_t>(), table, grad_x.mutable_data_ptr<scalar_t>(),
            partial.mutable_data_ptr<acc_t>(), g, taps);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (use_vectors<scalar_t>(g.W, {x.const_data_ptr(), grad_y.const_data_ptr()})) {
      launch(std::integral_constant<int, 16 / static_cast<int>(sizeof(scalar_t))>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    constexpr int kReduceThreads = 128;
    dwconv::dwconv_bwd_weight_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(g.num_experts * g.C), kReduceThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), offsets.const_data_ptr<int64_t>(), table,
            grad_w.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>(), g, taps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

}  // namespace moce::cuda

TORCH_LIBRARY_IMPL(moce, CUDA, m) {
  m.impl("grouped_dwconv_fwd", &moce::cuda::grouped_dwconv_fwd_cuda);
  m.impl("grouped_dwconv_bwd", &moce::cuda::grouped_dwconv_bwd_cuda);
}
