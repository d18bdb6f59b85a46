// grouped_dwconv: depthwise "same" convolutions (stride 1, zero padding K_e / 2) of E experts
// in one call, on rows packed by expert (moce_kernels/grouped_dwconv/reference.py).
//
// This file holds the schema of the ops (TORCH_LIBRARY_FRAGMENT), the argument checks shared
// with the CUDA kernels (csrc/cuda/grouped_dwconv.cu) and the CPU kernels.
//
//   grouped_dwconv_fwd(x, weight, bias?, offsets, channels, kernel_sizes) -> y
//     x, y: [N, C_max, H, W]; weight: [E, C_max, K_max, K_max]; bias: [E, C_max] or None;
//     offsets: [E + 1] int32 / int64, expert e owns rows offsets[e]:offsets[e + 1];
//     channels, kernel_sizes: E ints. Row n of expert e, channel c < channels[e]:
//       y[n, c] = bias[e, c] + conv(x[n, c], weight[e, c, lo:lo + K_e, lo:lo + K_e]),
//       lo = (K_max - K_e) / 2 (the kernel sits centred in the window); channels >= channels[e]: 0.
//   grouped_dwconv_bwd(grad_y, x, weight, offsets, channels, kernel_sizes)
//       -> (grad_x, grad_weight, grad_bias)
//     grad_x [N, C_max, H, W] (0 past channels[e]); grad_weight [E, C_max, K_max, K_max] (0
//     outside each expert's window and channels, and for experts without rows); grad_bias
//     [E, C_max] (0 past channels[e]); all in x's dtype.
//
// Sums accumulate in float32 (float64 for float64 x). The weight and bias gradients are summed
// per (row, channel) plane, then over each expert's rows in row order: deterministic, and the
// same bits for any number of threads. The CPU ops check the offsets' values (reading them is
// free here); the CUDA ops cannot without a synchronisation (see the .cu file).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "check.h"
#include "dwconv_planes.h"
#include "grouped_dwconv.h"

namespace moce {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                  c10::DeviceType device_type) {
  MOCE_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ",
             c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", t.device());
  MOCE_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(),
             "), got ", t.device());
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets,
                  at::IntArrayRef channels, at::IntArrayRef kernel_sizes, c10::DeviceType device_type) {
  MOCE_CHECK(x.defined(), op, ": x is an undefined tensor");
  MOCE_CHECK(x.dim() == 4, op, ": x must be a 4-D [N, C_max, H, W] tensor, got shape ", x.sizes());
  MOCE_CHECK(is_supported_dtype(x.scalar_type()), op,
             ": x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  check_device(op, "x", x, x, device_type);
  MOCE_CHECK(x.size(1) >= 1, op, ": x must have at least one channel (C_max >= 1), got shape ", x.sizes());

  MOCE_CHECK(weight.defined(), op, ": weight is an undefined tensor");
  MOCE_CHECK(weight.dim() == 4 && weight.size(0) >= 1 && weight.size(1) == x.size(1) &&
                 weight.size(2) == weight.size(3),
             op, ": weight must have shape [E, C_max, K_max, K_max] with E >= 1 and C_max = ", x.size(1),
             " (x.size(1)), got shape ", weight.sizes());
  MOCE_CHECK(weight.size(3) % 2 == 1, op, ": weight's window K_max must be odd, got ", weight.size(3));
  MOCE_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (",
             x.scalar_type(), "), got ", weight.scalar_type());
  check_device(op, "weight", weight, x, device_type);

  const int64_t num_experts = weight.size(0);
  MOCE_CHECK(offsets.defined(), op, ": offsets is an undefined tensor");
  MOCE_CHECK(offsets.dim() == 1 && offsets.size(0) == num_experts + 1, op,
             ": offsets must have shape [E + 1] = [", num_experts + 1, "] (E = weight.size(0)), got shape ",
             offsets.sizes());
  MOCE_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, op,
             ": offsets must be int64 or int32, got ", offsets.scalar_type());
  check_device(op, "offsets", offsets, x, device_type);

  MOCE_CHECK(static_cast<int64_t>(channels.size()) == num_experts, op,
             ": channels must have E = ", num_experts, " entries (E = weight.size(0)), got ",
             channels.size());
  MOCE_CHECK(static_cast<int64_t>(kernel_sizes.size()) == num_experts, op,
             ": kernel_sizes must have E = ", num_experts, " entries (E = weight.size(0)), got ",
             kernel_sizes.size());
  const int64_t k_max = weight.size(3);
  for (int64_t e = 0; e < num_experts; ++e) {
    MOCE_CHECK(channels[e] >= 1 && channels[e] <= x.size(1), op, ": channels[", e,
               "] must be in 1..C_max = 1..", x.size(1), ", got ", channels[e]);
    const int64_t k = kernel_sizes[e];
    MOCE_CHECK(k >= 1 && k % 2 == 1 && k <= kDwconvMaxKernelSize && k <= k_max, op, ": kernel_sizes[", e,
               "] must be odd, in 1..", kDwconvMaxKernelSize, " and <= K_max = ", k_max, ", got ", k);
  }
}

}  // namespace

int64_t grouped_dwconv_num_taps(at::IntArrayRef kernel_sizes) {
  int64_t k = 1;
  for (const int64_t ks : kernel_sizes) k = std::max(k, ks);
  return k * k + 1;
}

void grouped_dwconv_check_fwd(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& offsets,
                              at::IntArrayRef channels, at::IntArrayRef kernel_sizes,
                              c10::DeviceType device_type) {
  constexpr const char* op = "moce::grouped_dwconv_fwd";
  check_common(op, x, weight, offsets, channels, kernel_sizes, device_type);
  if (bias.has_value() && bias->defined()) {
    MOCE_CHECK(bias->dim() == 2 && bias->size(0) == weight.size(0) && bias->size(1) == x.size(1), op,
               ": bias must have shape [E, C_max] = [", weight.size(0), ", ", x.size(1), "], got shape ",
               bias->sizes());
    MOCE_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have the dtype of x (",
               x.scalar_type(), "), got ", bias->scalar_type());
    check_device(op, "bias", *bias, x, device_type);
  }
}

void grouped_dwconv_check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& offsets, at::IntArrayRef channels,
                              at::IntArrayRef kernel_sizes, c10::DeviceType device_type) {
  constexpr const char* op = "moce::grouped_dwconv_bwd";
  check_common(op, x, weight, offsets, channels, kernel_sizes, device_type);
  MOCE_CHECK(grad_y.defined(), op, ": grad_y is an undefined tensor");
  MOCE_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have the shape of x (", x.sizes(), "), got ",
             grad_y.sizes());
  MOCE_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have the dtype of x (",
             x.scalar_type(), "), got ", grad_y.scalar_type());
  check_device(op, "grad_y", grad_y, x, device_type);
}

namespace {

// The expert of every row from host offsets, after checking they rise from 0 to N.
std::vector<int64_t> expert_of_rows(const char* op, const at::Tensor& offsets, int64_t rows) {
  const at::Tensor offs = offsets.to(at::kLong).contiguous();
  const int64_t* o = offs.const_data_ptr<int64_t>();
  const int64_t num_experts = offs.size(0) - 1;
  // The values as a list ([0, 3, 5]): a Tensor has no text without iostreams (see check.h).
  const at::IntArrayRef values(o, static_cast<size_t>(num_experts + 1));
  MOCE_CHECK(o[0] == 0 && o[num_experts] == rows, op, ": offsets must rise from 0 to N = ", rows, ", got ",
             values);
  for (int64_t e = 0; e < num_experts; ++e) {
    MOCE_CHECK(o[e] <= o[e + 1], op, ": offsets must be non-decreasing, got ", values);
  }
  // Checked first: with 0 = o[0] <= ... <= o[E] = rows every index below is in range.
  std::vector<int64_t> expert(rows);
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t n = o[e]; n < o[e + 1]; ++n) expert[n] = e;
  }
  return expert;
}

using namespace dwconv_planes;  // NOLINT: the shared plane loops (dwconv_planes.h)

MOCE_ISA_CLONES void conv_plane(int64_t K, const float* padded, const float* taps, float bias, float* out,
                                int64_t H, int64_t W) {
  conv_plane_any(K, padded, taps, bias, out, H, W);
}

MOCE_ISA_CLONES void conv_plane(int64_t K, const double* padded, const double* taps, double bias, double* out,
                                int64_t H, int64_t W) {
  conv_plane_any(K, padded, taps, bias, out, H, W);
}

MOCE_ISA_CLONES void weight_grad_plane(int64_t K, const float* padded_x, const float* padded_grad,
                                       float* partial, int64_t H, int64_t W) {
  weight_grad_plane_any(K, padded_x, padded_grad, partial, H, W);
}

MOCE_ISA_CLONES void weight_grad_plane(int64_t K, const double* padded_x, const double* padded_grad,
                                       double* partial, int64_t H, int64_t W) {
  weight_grad_plane_any(K, padded_x, padded_grad, partial, H, W);
}

// The convolution of a padded plane into out (scalar_t): straight into out when it is already
// the accumulation type, else through the scratch plane.
template <typename scalar_t, typename acc_t>
void conv_plane_to(int64_t K, const acc_t* padded, const acc_t* taps, acc_t bias, scalar_t* out,
                   acc_t* scratch, int64_t H, int64_t W) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    conv_plane(K, padded, taps, bias, out, H, W);
  } else {
    conv_plane(K, padded, taps, bias, scratch, H, W);
    for (int64_t p = 0; p < H * W; ++p) out[p] = static_cast<scalar_t>(scratch[p]);
  }
}

struct Geometry {
  int64_t N, C, H, W, E, k_max;
};

template <typename scalar_t>
void grouped_dwconv_fwd_cpu_kernel(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                   const std::vector<int64_t>& expert, at::IntArrayRef channels,
                                   at::IntArrayRef kernel_sizes, scalar_t* y, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.H * g.W;
  int64_t k_top = 1;
  for (const int64_t k : kernel_sizes) k_top = std::max(k_top, k);
  const int64_t pad_size = (g.H + k_top - 1) * (g.W + k_top - 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, plane * k_top));
  at::parallel_for(0, g.N * g.C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded(pad_size);
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : plane);
    acc_t taps[kDwconvMaxKernelSize * kDwconvMaxKernelSize];
    for (int64_t pc = begin; pc < end; ++pc) {
      const int64_t n = pc / g.C, c = pc % g.C;
      const int64_t e = expert[n];
      scalar_t* out = y + pc * plane;
      if (c >= channels[e]) {
        std::fill_n(out, plane, scalar_t(0));
        continue;
      }
      const int64_t K = kernel_sizes[e];
      const int64_t lo = (g.k_max - K) / 2;
      const scalar_t* wk = weight + (e * g.C + c) * g.k_max * g.k_max;
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < K; ++j) taps[i * K + j] = static_cast<acc_t>(wk[(lo + i) * g.k_max + lo + j]);
      }
      const acc_t b = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[e * g.C + c]);
      pad_plane(x + pc * plane, padded.data(), g.H, g.W, K / 2);
      conv_plane_to(K, padded.data(), taps, b, out, scratch.data(), g.H, g.W);
    }
  });
}

template <typename scalar_t>
void grouped_dwconv_bwd_cpu_kernel(const scalar_t* grad_y, const scalar_t* x, const scalar_t* weight,
                                   const std::vector<int64_t>& expert, at::IntArrayRef channels,
                                   at::IntArrayRef kernel_sizes, scalar_t* grad_x,
                                   at::opmath_type<scalar_t>* partial, int64_t taps_stride,
                                   const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.H * g.W;
  int64_t k_top = 1;
  for (const int64_t k : kernel_sizes) k_top = std::max(k_top, k);
  const int64_t pad_size = (g.H + k_top - 1) * (g.W + k_top - 1);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, plane * k_top));
  at::parallel_for(0, g.N * g.C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded_x(pad_size);
    std::vector<acc_t> padded_g(pad_size);
    std::vector<acc_t> scratch(std::is_same_v<scalar_t, acc_t> ? 0 : plane);
    acc_t flipped[kDwconvMaxKernelSize * kDwconvMaxKernelSize];
    for (int64_t pc = begin; pc < end; ++pc) {
      const int64_t n = pc / g.C, c = pc % g.C;
      const int64_t e = expert[n];
      scalar_t* gx = grad_x + pc * plane;
      acc_t* part = partial + pc * taps_stride;
      std::fill_n(part, taps_stride, acc_t(0));
      if (c >= channels[e]) {
        std::fill_n(gx, plane, scalar_t(0));
        continue;
      }
      const int64_t K = kernel_sizes[e];
      const int64_t lo = (g.k_max - K) / 2;
      const scalar_t* wk = weight + (e * g.C + c) * g.k_max * g.k_max;
      // grad_x is the "full" correlation of grad_y with the kernel flipped in both axes.
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < K; ++j) {
          flipped[(K - 1 - i) * K + (K - 1 - j)] = static_cast<acc_t>(wk[(lo + i) * g.k_max + lo + j]);
        }
      }
      pad_plane(x + pc * plane, padded_x.data(), g.H, g.W, K / 2);
      pad_plane(grad_y + pc * plane, padded_g.data(), g.H, g.W, K / 2);
      conv_plane_to(K, padded_g.data(), flipped, acc_t(0), gx, scratch.data(), g.H, g.W);
      weight_grad_plane(K, padded_x.data(), padded_g.data(), part, g.H, g.W);
    }
  });
}

// grad_weight / grad_bias of every (expert, channel): the plane partials of the expert's rows,
// summed in row order (the same bits for any thread count); 0 wherever the expert has no tap.
template <typename scalar_t>
void grouped_dwconv_bwd_weight_cpu(const at::opmath_type<scalar_t>* partial, int64_t taps_stride,
                                   const int64_t* offsets, at::IntArrayRef channels,
                                   at::IntArrayRef kernel_sizes, scalar_t* grad_w, scalar_t* grad_b,
                                   const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t window = g.k_max * g.k_max;
  at::parallel_for(0, g.E * g.C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ec = begin; ec < end; ++ec) {
      const int64_t e = ec / g.C, c = ec % g.C;
      const int64_t K = kernel_sizes[e];
      const int64_t lo = (g.k_max - K) / 2;
      const bool active = c < channels[e];
      scalar_t* gw = grad_w + ec * window;
      const auto sum_tap = [&](int64_t t) {
        acc_t s = 0;
        for (int64_t n = offsets[e]; n < offsets[e + 1]; ++n) s += partial[(n * g.C + c) * taps_stride + t];
        return s;
      };
      for (int64_t a = 0; a < g.k_max; ++a) {
        for (int64_t b = 0; b < g.k_max; ++b) {
          const int64_t i = a - lo, j = b - lo;
          const bool inside = active && i >= 0 && i < K && j >= 0 && j < K;
          gw[a * g.k_max + b] = static_cast<scalar_t>(inside ? sum_tap(i * K + j) : acc_t(0));
        }
      }
      grad_b[ec] = static_cast<scalar_t>(active ? sum_tap(K * K) : acc_t(0));
    }
  });
}

at::Tensor grouped_dwconv_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                  const std::optional<at::Tensor>& bias_in, const at::Tensor& offsets,
                                  at::IntArrayRef channels, at::IntArrayRef kernel_sizes) {
  grouped_dwconv_check_fwd(x_in, weight_in, bias_in, offsets, channels, kernel_sizes, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(3)};
  const std::vector<int64_t> expert = expert_of_rows("moce::grouped_dwconv_fwd", offsets, g.N);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_dwconv_fwd_cpu", [&] {
    grouped_dwconv_fwd_cpu_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                            has_bias ? bias.const_data_ptr<scalar_t>() : nullptr, expert,
                                            channels, kernel_sizes, y.mutable_data_ptr<scalar_t>(), g);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_dwconv_bwd_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& offsets, at::IntArrayRef channels, at::IntArrayRef kernel_sizes) {
  grouped_dwconv_check_bwd(grad_y_in, x_in, weight_in, offsets, channels, kernel_sizes, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(3)};
  const std::vector<int64_t> expert = expert_of_rows("moce::grouped_dwconv_bwd", offsets, g.N);
  const at::Tensor offs = offsets.to(at::kLong).contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_b = at::empty({g.E, g.C}, weight.options());
  if (x.numel() == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  const int64_t taps = grouped_dwconv_num_taps(kernel_sizes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_dwconv_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // [N * C_max, taps] per-plane partial sums of the weight (and bias) gradient.
    at::Tensor partial =
        at::empty({g.N * g.C, taps}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    grouped_dwconv_bwd_cpu_kernel<scalar_t>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                            weight.const_data_ptr<scalar_t>(), expert, channels, kernel_sizes,
                                            grad_x.mutable_data_ptr<scalar_t>(),
                                            partial.mutable_data_ptr<acc_t>(), taps, g);
    grouped_dwconv_bwd_weight_cpu<scalar_t>(
        partial.const_data_ptr<acc_t>(), taps, offs.const_data_ptr<int64_t>(), channels, kernel_sizes,
        grad_w.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>(), g);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

}  // namespace moce

TORCH_LIBRARY_FRAGMENT(moce, m) {
  m.def(
      "grouped_dwconv_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor offsets, int[] channels, "
      "int[] kernel_sizes) -> Tensor");
  m.def(
      "grouped_dwconv_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor offsets, int[] channels, "
      "int[] kernel_sizes) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moce, CPU, m) {
  m.impl("grouped_dwconv_fwd", &moce::grouped_dwconv_fwd_cpu);
  m.impl("grouped_dwconv_bwd", &moce::grouped_dwconv_bwd_cpu);
}
