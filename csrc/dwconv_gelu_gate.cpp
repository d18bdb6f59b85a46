// dwconv_gelu_gate: the depthwise "same" convolution of the gated feed-forward network (GDFN)
// fused with its gate (moce_kernels/dwconv_gelu_gate/reference.py): the 2 * Ch-channel
// convolution output never goes to memory.
//
// This file holds the schema of the ops (TORCH_LIBRARY_FRAGMENT), the argument checks shared
// with the CUDA kernels (csrc/cuda/dwconv_gelu_gate.cu) and the CPU kernels.
//
//   dwconv_gelu_gate_fwd(x, weight, bias?) -> y
//     x: [B, 2 * Ch, H, W]; weight: [2 * Ch, K, K], K odd in 1..9 (zero padding K / 2); bias:
//     [2 * Ch] or None; y: [B, Ch, H, W]. With u[n, c] = bias[c] + conv(x[n, c], weight[c]),
//     a = u[:, :Ch], b = u[:, Ch:]: y = gelu(a) * b, gelu(a) = a * Phi(a), Phi the standard
//     normal CDF (the exact, erf GELU).
//   dwconv_gelu_gate_bwd(grad_y, x, weight, bias?) -> (grad_x, grad_weight, grad_bias)
//     recomputes u; grad_a = grad_y * b * gelu'(a), gelu'(a) = Phi(a) + a * phi(a) (phi the
//     normal density), grad_b = grad_y * gelu(a); grad_x [B, 2 * Ch, H, W] is the correlation of
//     (grad_a, grad_b) with the flipped kernels; grad_weight [2 * Ch, K, K] and grad_bias
//     [2 * Ch] (zeros when bias is None) in weight's dtype.
//
// Sums accumulate in float32 (float64 for float64 x). The weight and bias gradients are summed
// per (image, channel) plane, then over the images in order: deterministic, and the same bits
// for any number of threads.
//
// The plane helpers (padding, K-specialised convolution and weight-gradient loops) are shared
// with grouped_dwconv.cpp (dwconv_planes.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "check.h"
#include "dwconv_planes.h"
#include "gelu_math.h"
#include "dwconv_gelu_gate.h"
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

void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, c10::DeviceType device_type) {
  MOCE_CHECK(x.defined(), op, ": x is an undefined tensor");
  MOCE_CHECK(x.dim() == 4, op, ": x must be a 4-D [B, 2 * Ch, H, W] tensor, got shape ", x.sizes());
  MOCE_CHECK(is_supported_dtype(x.scalar_type()), op,
             ": x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  check_device(op, "x", x, x, device_type);
  MOCE_CHECK(x.size(1) >= 2 && x.size(1) % 2 == 0, op,
             ": x must have an even channel count 2 * Ch >= 2 (the gate's two halves), got shape ",
             x.sizes());

  MOCE_CHECK(weight.defined(), op, ": weight is an undefined tensor");
  MOCE_CHECK(weight.dim() == 3 && weight.size(0) == x.size(1) && weight.size(1) == weight.size(2), op,
             ": weight must have shape [2 * Ch, K, K] with 2 * Ch = ", x.size(1), " (x.size(1)), got shape ",
             weight.sizes());
  const int64_t k = weight.size(2);
  MOCE_CHECK(k >= 1 && k % 2 == 1 && k <= kDwconvMaxKernelSize, op, ": weight's kernel size K must be odd, in 1..",
             kDwconvMaxKernelSize, ", got ", k);
  MOCE_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (",
             x.scalar_type(), "), got ", weight.scalar_type());
  check_device(op, "weight", weight, x, device_type);

  if (bias.has_value() && bias->defined()) {
    MOCE_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1), op, ": bias must have shape [2 * Ch] = [",
               x.size(1), "], got shape ", bias->sizes());
    MOCE_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have the dtype of x (",
               x.scalar_type(), "), got ", bias->scalar_type());
    check_device(op, "bias", *bias, x, device_type);
  }
}

}  // namespace

void dwconv_gelu_gate_check_fwd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, c10::DeviceType device_type) {
  check_common("moce::dwconv_gelu_gate_fwd", x, weight, bias, device_type);
}

void dwconv_gelu_gate_check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, c10::DeviceType device_type) {
  constexpr const char* op = "moce::dwconv_gelu_gate_bwd";
  check_common(op, x, weight, bias, device_type);
  MOCE_CHECK(grad_y.defined(), op, ": grad_y is an undefined tensor");
  const std::array<int64_t, 4> want{x.size(0), x.size(1) / 2, x.size(2), x.size(3)};
  MOCE_CHECK(grad_y.sizes() == at::IntArrayRef(want), op, ": grad_y must have shape [B, Ch, H, W] = ",
             at::IntArrayRef(want), ", got ", grad_y.sizes());
  MOCE_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have the dtype of x (",
             x.scalar_type(), "), got ", grad_y.scalar_type());
  check_device(op, "grad_y", grad_y, x, device_type);
}

namespace {

using namespace gelu_math;  // NOLINT: normal_cdf, normal_pdf (gelu_math.h)

// --- planes ------------------------------------------------------------------------------------

using namespace dwconv_planes;  // NOLINT: the shared plane loops (dwconv_planes.h)

// out[p] = gelu(a[p]) * b[p] over n pixels.
template <typename acc_t>
__attribute__((always_inline)) inline void gate_fwd_any(const acc_t* a, const acc_t* b, acc_t* out, int64_t n) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) out[p] = a[p] * normal_cdf(a[p]) * b[p];
}

// From the H x W planes a, b and grad (of y): grad_a = grad * b * gelu'(a) and
// grad_b = grad * gelu(a), written into the centres of the padded planes padded_ga / padded_gb
// (border P, left as it is: the callers keep it zero).
template <typename acc_t>
__attribute__((always_inline)) inline void gate_bwd_any(const acc_t* a, const acc_t* b, const acc_t* grad,
                                                        acc_t* padded_ga, acc_t* padded_gb, int64_t H,
                                                        int64_t W, int64_t P) {
  const int64_t PW = W + 2 * P;
  for (int64_t h = 0; h < H; ++h) {
    const acc_t* ar = a + h * W;
    const acc_t* br = b + h * W;
    const acc_t* gr = grad + h * W;
    acc_t* ga = padded_ga + (h + P) * PW + P;
    acc_t* gb = padded_gb + (h + P) * PW + P;
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
      const acc_t av = ar[w];
      const acc_t cdf = normal_cdf(av);
      const acc_t pdf = normal_pdf(av);
      ga[w] = gr[w] * br[w] * (cdf + av * pdf);
      gb[w] = gr[w] * (av * cdf);
    }
  }
}

MOCE_ISA_CLONES void conv_plane(int64_t K, const float* padded, const float* taps, float bias, float* out,
                                     int64_t H, int64_t W) {
  conv_plane_any(K, padded, taps, bias, out, H, W);
}

MOCE_ISA_CLONES void conv_plane(int64_t K, const double* padded, const double* taps, double bias,
                                     double* out, int64_t H, int64_t W) {
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

MOCE_ISA_CLONES void gate_fwd(const float* a, const float* b, float* out, int64_t n) {
  gate_fwd_any(a, b, out, n);
}

MOCE_ISA_CLONES void gate_fwd(const double* a, const double* b, double* out, int64_t n) {
  gate_fwd_any(a, b, out, n);
}

MOCE_ISA_CLONES void gate_bwd(const float* a, const float* b, const float* grad, float* padded_ga,
                                   float* padded_gb, int64_t H, int64_t W, int64_t P) {
  gate_bwd_any(a, b, grad, padded_ga, padded_gb, H, W, P);
}

MOCE_ISA_CLONES void gate_bwd(const double* a, const double* b, const double* grad, double* padded_ga,
                                   double* padded_gb, int64_t H, int64_t W, int64_t P) {
  gate_bwd_any(a, b, grad, padded_ga, padded_gb, H, W, P);
}

struct Geometry {
  int64_t B, Ch, H, W, K;  // x: [B, 2 * Ch, H, W]; weight: [2 * Ch, K, K]
};

// u = bias[ch] + conv(x[n, ch], weight[ch]), with x's plane padded into `padded` (kept by the
// backward for the weight gradient).
template <typename scalar_t, typename acc_t>
void conv_channel(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, int64_t n, int64_t ch,
                  acc_t* padded, acc_t* u, const Geometry& g) {
  const int64_t K = g.K;
  acc_t taps[kDwconvMaxKernelSize * kDwconvMaxKernelSize];
  const scalar_t* wk = weight + ch * K * K;
  for (int64_t t = 0; t < K * K; ++t) taps[t] = static_cast<acc_t>(wk[t]);
  const acc_t b = bias == nullptr ? acc_t(0) : static_cast<acc_t>(bias[ch]);
  pad_plane(x + (n * 2 * g.Ch + ch) * g.H * g.W, padded, g.H, g.W, K / 2);
  conv_plane(K, padded, taps, b, u, g.H, g.W);
}

// Tasks are (image, gate channel) pairs: each convolves two planes.
int64_t pair_grain(const Geometry& g, int64_t work) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, g.H * g.W * g.K));
}

template <typename scalar_t>
void dwconv_gelu_gate_fwd_cpu_kernel(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                     scalar_t* y, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t plane = g.H * g.W;
  const int64_t pad_size = (g.H + g.K - 1) * (g.W + g.K - 1);
  at::parallel_for(0, g.B * g.Ch, pair_grain(g, 8192), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> padded(pad_size);
    std::vector<acc_t> a(plane);
    std::vector<acc_t> b(plane);
    std::vector<acc_t> scratch(kDirect ? 0 : plane);
    for (int64_t pc = begin; pc < end; ++pc) {
      const int64_t n = pc / g.Ch, c = pc % g.Ch;
      conv_channel(x, weight, bias, n, c, padded.data(), a.data(), g);
      conv_channel(x, weight, bias, n, c + g.Ch, padded.data(), b.data(), g);
      scalar_t* out = y + pc * plane;
      if constexpr (kDirect) {
        gate_fwd(a.data(), b.data(), out, plane);
      } else {
        gate_fwd(a.data(), b.data(), scratch.data(), plane);
        for (int64_t p = 0; p < plane; ++p) out[p] = static_cast<scalar_t>(scratch[p]);
      }
    }
  });
}

// grad_x of both halves of every (image, gate channel) pair, and partial[(n * 2 Ch + ch) *
// taps_stride + t]: plane (n, ch)'s sum of grad_u * x shifted by tap t = i * K + j (t < K * K)
// and of grad_u (t = K * K).
template <typename scalar_t>
void dwconv_gelu_gate_bwd_cpu_kernel(const scalar_t* grad_y, const scalar_t* x, const scalar_t* weight,
                                     const scalar_t* bias, scalar_t* grad_x, at::opmath_type<scalar_t>* partial,
                                     int64_t taps_stride, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t plane = g.H * g.W;
  const int64_t P = g.K / 2;
  const int64_t pad_size = (g.H + 2 * P) * (g.W + 2 * P);
  at::parallel_for(0, g.B * g.Ch, pair_grain(g, 4096), [&](int64_t begin, int64_t end) {
    // x of both halves (kept for the weight gradient), their convolutions a and b, and the
    // gradients of a and b in padded planes: only their centres are rewritten, the zero border
    // stays.
    std::vector<acc_t> padded_x(2 * pad_size);
    std::vector<acc_t> padded_g(2 * pad_size, acc_t(0));
    std::vector<acc_t> u(2 * plane);
    std::vector<acc_t> grad_y_acc(kDirect ? 0 : plane);
    std::vector<acc_t> scratch(kDirect ? 0 : plane);
    for (int64_t pc = begin; pc < end; ++pc) {
      const int64_t n = pc / g.Ch, c = pc % g.Ch;
      for (int half = 0; half < 2; ++half) {
        conv_channel(x, weight, bias, n, c + half * g.Ch, padded_x.data() + half * pad_size,
                     u.data() + half * plane, g);
      }
      const acc_t* gy = nullptr;
      if constexpr (kDirect) {
        gy = grad_y + pc * plane;
      } else {
        const scalar_t* src = grad_y + pc * plane;
        for (int64_t p = 0; p < plane; ++p) grad_y_acc[p] = static_cast<acc_t>(src[p]);
        gy = grad_y_acc.data();
      }
      gate_bwd(u.data(), u.data() + plane, gy, padded_g.data(), padded_g.data() + pad_size, g.H, g.W, P);
      for (int half = 0; half < 2; ++half) {
        const int64_t ch = c + half * g.Ch;
        const acc_t* pg = padded_g.data() + half * pad_size;
        // grad_x is the "full" correlation of grad_u with the kernel flipped in both axes.
        acc_t flipped[kDwconvMaxKernelSize * kDwconvMaxKernelSize];
        const scalar_t* wk = weight + ch * g.K * g.K;
        for (int64_t t = 0; t < g.K * g.K; ++t) flipped[g.K * g.K - 1 - t] = static_cast<acc_t>(wk[t]);
        scalar_t* gx = grad_x + (n * 2 * g.Ch + ch) * plane;
        if constexpr (kDirect) {
          conv_plane(g.K, pg, flipped, acc_t(0), gx, g.H, g.W);
        } else {
          conv_plane(g.K, pg, flipped, acc_t(0), scratch.data(), g.H, g.W);
          for (int64_t p = 0; p < plane; ++p) gx[p] = static_cast<scalar_t>(scratch[p]);
        }
        weight_grad_plane(g.K, padded_x.data() + half * pad_size, pg, partial + (n * 2 * g.Ch + ch) * taps_stride,
                          g.H, g.W);
      }
    }
  });
}

// grad_weight / grad_bias of every channel: the plane partials summed in image order (the same
// bits for any thread count); grad_bias is 0 without a bias.
template <typename scalar_t>
void dwconv_gelu_gate_bwd_weight_cpu(const at::opmath_type<scalar_t>* partial, int64_t taps_stride,
                                     bool has_bias, scalar_t* grad_w, scalar_t* grad_b, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = 2 * g.Ch;
  const int64_t taps = g.K * g.K;
  at::parallel_for(0, channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const auto sum_tap = [&](int64_t t) {
        acc_t s = 0;
        for (int64_t n = 0; n < g.B; ++n) s += partial[(n * channels + ch) * taps_stride + t];
        return s;
      };
      for (int64_t t = 0; t < taps; ++t) grad_w[ch * taps + t] = static_cast<scalar_t>(sum_tap(t));
      grad_b[ch] = static_cast<scalar_t>(has_bias ? sum_tap(taps) : acc_t(0));
    }
  });
}

at::Tensor dwconv_gelu_gate_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                    const std::optional<at::Tensor>& bias_in) {
  dwconv_gelu_gate_check_fwd(x_in, weight_in, bias_in, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const Geometry g{x.size(0), x.size(1) / 2, x.size(2), x.size(3), weight.size(2)};
  at::Tensor y = at::empty({g.B, g.Ch, g.H, g.W}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dwconv_gelu_gate_fwd_cpu", [&] {
    dwconv_gelu_gate_fwd_cpu_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                              has_bias ? bias.const_data_ptr<scalar_t>() : nullptr,
                                              y.mutable_data_ptr<scalar_t>(), g);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_gelu_gate_bwd_cpu(const at::Tensor& grad_y_in,
                                                                        const at::Tensor& x_in,
                                                                        const at::Tensor& weight_in,
                                                                        const std::optional<at::Tensor>& bias_in) {
  dwconv_gelu_gate_check_bwd(grad_y_in, x_in, weight_in, bias_in, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const Geometry g{x.size(0), x.size(1) / 2, x.size(2), x.size(3), weight.size(2)};
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_b = at::empty({2 * g.Ch}, weight.options());
  if (x.numel() == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  const int64_t taps = g.K * g.K + 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dwconv_gelu_gate_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // [B * 2 Ch, taps] per-plane partial sums of the weight (and bias) gradient.
    at::Tensor partial =
        at::empty({g.B * 2 * g.Ch, taps}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    dwconv_gelu_gate_bwd_cpu_kernel<scalar_t>(
        grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        has_bias ? bias.const_data_ptr<scalar_t>() : nullptr, grad_x.mutable_data_ptr<scalar_t>(),
        partial.mutable_data_ptr<acc_t>(), taps, g);
    dwconv_gelu_gate_bwd_weight_cpu<scalar_t>(partial.const_data_ptr<acc_t>(), taps, has_bias,
                                              grad_w.mutable_data_ptr<scalar_t>(),
                                              grad_b.mutable_data_ptr<scalar_t>(), g);
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

}  // namespace moce

TORCH_LIBRARY_FRAGMENT(moce, m) {
  m.def("dwconv_gelu_gate_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("dwconv_gelu_gate_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moce, CPU, m) {
  m.impl("dwconv_gelu_gate_fwd", &moce::dwconv_gelu_gate_fwd_cpu);
  m.impl("dwconv_gelu_gate_bwd", &moce::dwconv_gelu_gate_bwd_cpu);
}
