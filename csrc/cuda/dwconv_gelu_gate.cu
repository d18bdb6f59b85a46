// CUDA implementation of moce::dwconv_gelu_gate_fwd / moce::dwconv_gelu_gate_bwd (schemas and
// the CPU kernels in csrc/dwconv_gelu_gate.cpp, kernel bodies in dwconv_gelu_gate.cuh).
//
// Nothing here reads a device value on the host. The backward allocates a [B, 2 * Ch, H, W]
// gradient buffer in the accumulation type and [B * 2 * Ch * tiles, K * K + 1] partial sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>

#include "../check.h"
#include "../dwconv_gelu_gate.h"
#include "dwconv_gelu_gate.cuh"

namespace moce::cuda {

namespace {

using dwconv::Geometry;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// The 16-byte path: rows a multiple of the vector width and 16-byte aligned bases.
template <typename scalar_t>
bool use_vectors(int64_t W, std::initializer_list<const void*> ptrs) {
  if (W % (16 / static_cast<int64_t>(sizeof(scalar_t))) != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

// The tile grid over `planes_per_image` planes of each of x's B images (dwconv::Geometry with
// C = planes_per_image, one "expert", k_max = K).
Geometry make_geometry(const char* op, const at::Tensor& x, int64_t planes_per_image, int64_t K) {
  Geometry g{};
  g.N = x.size(0);
  g.C = planes_per_image;
  g.H = x.size(2);
  g.W = x.size(3);
  g.tiles_w = (g.W + dwconv::kTileW - 1) / dwconv::kTileW;
  g.tiles = ((g.H + dwconv::kTileH - 1) / dwconv::kTileH) * g.tiles_w;
  g.num_experts = 1;
  g.k_max = static_cast<int>(K);
  const int64_t blocks = g.N * g.C * g.tiles;
  MOCE_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": input too large (", blocks, " tiles)");
  return g;
}

unsigned int grid_size(const Geometry& g) { return static_cast<unsigned int>(g.N * g.C * g.tiles); }

// Calls launch(std::integral_constant<int, V>) with V the vector width of scalar_t (16 bytes)
// when `vectors`, else 1.
template <typename scalar_t, typename Launch>
void with_vector_width(bool vectors, const Launch& launch) {
  if (vectors) {
    launch(std::integral_constant<int, 16 / static_cast<int>(sizeof(scalar_t))>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

at::Tensor dwconv_gelu_gate_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                     const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "moce::dwconv_gelu_gate_fwd";
  dwconv_gelu_gate_check_fwd(x_in, weight_in, bias_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t Ch = x.size(1) / 2;
  at::Tensor y = at::empty({x.size(0), Ch, x.size(2), x.size(3)}, x.options());
  if (y.numel() == 0) return y;
  const Geometry g = make_geometry(op, x, Ch, weight.size(2));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dwconv_gelu_gate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
    with_vector_width<scalar_t>(use_vectors<scalar_t>(g.W, {x.const_data_ptr()}), [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      dwconv::with_kernel_class(g.k_max, [&](auto class_tag) {
        constexpr int KC = decltype(class_tag)::value;
        gate::dwconv_gelu_gate_fwd_kernel<scalar_t, acc_t, V, KC><<<grid_size(g), dwconv::kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b, y.mutable_data_ptr<scalar_t>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_gelu_gate_bwd_cuda(const at::Tensor& grad_y_in,
                                                                         const at::Tensor& x_in,
                                                                         const at::Tensor& weight_in,
                                                                         const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "moce::dwconv_gelu_gate_bwd";
  dwconv_gelu_gate_check_bwd(grad_y_in, x_in, weight_in, bias_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t Ch = x.size(1) / 2;
  const int64_t K = weight.size(2);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_b = at::empty({2 * Ch}, weight.options());
  if (x.numel() == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  const Geometry pairs = make_geometry(op, x, Ch, K);       // (image, gate channel) planes
  const Geometry planes = make_geometry(op, x, 2 * Ch, K);  // (image, channel) planes
  const int taps = static_cast<int>(K * K + 1);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dwconv_gelu_gate_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    // Every element of both is written before it is read.
    at::Tensor grad_u = at::empty(x.sizes(), x.options().dtype(acc_dtype));
    at::Tensor partial = at::empty({planes.N * planes.C * planes.tiles, taps}, x.options().dtype(acc_dtype));
    const scalar_t* b = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
    // grad_u is a fresh (aligned) allocation: its rows take the 16-byte path whenever x's do
    // (16 / sizeof(acc_t) divides 16 / sizeof(scalar_t)).
    const bool vectors = use_vectors<scalar_t>(pairs.W, {x.const_data_ptr()});
    with_vector_width<scalar_t>(vectors, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      constexpr int GV = V == 1 ? 1 : 16 / static_cast<int>(sizeof(acc_t));
      dwconv::with_kernel_class(K, [&](auto class_tag) {
        constexpr int KC = decltype(class_tag)::value;
        gate::dwconv_gelu_gate_bwd_gate_kernel<scalar_t, acc_t, V, KC>
            <<<grid_size(pairs), dwconv::kThreads, 0, stream>>>(
                grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                b, grad_u.mutable_data_ptr<acc_t>(), pairs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        gate::dwconv_gelu_gate_bwd_conv_kernel<scalar_t, acc_t, V, GV, KC>
            <<<grid_size(planes), dwconv::kThreads, 0, stream>>>(
                grad_u.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                grad_x.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), planes, taps);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    constexpr int kReduceThreads = 128;
    gate::dwconv_gelu_gate_bwd_weight_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(2 * Ch), kReduceThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), grad_w.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>(),
            planes, taps, has_bias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

}  // namespace moce::cuda

TORCH_LIBRARY_IMPL(moce, CUDA, m) {
  m.impl("dwconv_gelu_gate_fwd", &moce::cuda::dwconv_gelu_gate_fwd_cuda);
  m.impl("dwconv_gelu_gate_bwd", &moce::cuda::dwconv_gelu_gate_bwd_cuda);
}
