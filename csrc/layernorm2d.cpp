// layernorm2d: LayerNorm over the channel axis of a [B, C, H, W] tensor, at every pixel.
//
// This file holds the schema of the ops (TORCH_LIBRARY), the argument checks shared with the
// CUDA kernels (csrc/cuda/layernorm2d.cu) and the CPU kernels.
//
//   layernorm2d_fwd(x, weight, bias, eps) -> (y, mean, rstd)
//     y = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps), population variance
//     x, y: [B, C, H, W]; mean, rstd: [B, H, W] in float32 (float64 for float64 x)
//   layernorm2d_bwd(grad_y, x, weight, mean, rstd) -> (grad_x, grad_weight, grad_bias)
//     grad_x in x's dtype, grad_weight and grad_bias in weight's dtype
//
// Statistics accumulate in float32 (float64 for float64 x). weight and bias may have any of
// the supported dtypes; they are read in the accumulation type.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "layernorm2d.h"

namespace moce {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  MOCE_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name,
             " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                  c10::DeviceType device_type) {
  MOCE_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ",
             c10::DeviceTypeName(device_type, /*lower_case=*/true), " tensor, got ", t.device());
  MOCE_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(),
             "), got ", t.device());
}

void check_x(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  MOCE_CHECK(x.defined(), op, ": x is an undefined tensor");
  MOCE_CHECK(x.dim() == 4, op, ": x must be a 4-D [B, C, H, W] tensor, got shape ", x.sizes());
  check_float_dtype(op, "x", x);
  check_device(op, "x", x, x, device_type);
  MOCE_CHECK(x.size(1) >= 1, op, ": x must have at least one channel (C >= 1), got shape ", x.sizes());
}

void check_channel_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                          c10::DeviceType device_type) {
  MOCE_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  MOCE_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape [C] = [",
             x.size(1), "] (C = x.size(1)), got shape ", t.sizes());
  check_float_dtype(op, name, t);
  check_device(op, name, t, x, device_type);
}

}  // namespace

at::ScalarType layernorm2d_stats_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void layernorm2d_check_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, c10::DeviceType device_type) {
  constexpr const char* op = "moce::layernorm2d_fwd";
  check_x(op, x, device_type);
  check_channel_vector(op, "weight", weight, x, device_type);
  check_channel_vector(op, "bias", bias, x, device_type);
  MOCE_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be finite and > 0, got ", eps);
}

void layernorm2d_check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& mean, const at::Tensor& rstd, c10::DeviceType device_type) {
  constexpr const char* op = "moce::layernorm2d_bwd";
  check_x(op, x, device_type);
  check_channel_vector(op, "weight", weight, x, device_type);
  MOCE_CHECK(grad_y.defined(), op, ": grad_y is an undefined tensor");
  MOCE_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have the shape of x (", x.sizes(),
             "), got ", grad_y.sizes());
  MOCE_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have the dtype of x (",
             x.scalar_type(), "), got ", grad_y.scalar_type());
  check_device(op, "grad_y", grad_y, x, device_type);
  const auto stats_dtype = layernorm2d_stats_dtype(x.scalar_type());
  const std::vector<int64_t> stats_shape{x.size(0), x.size(2), x.size(3)};
  const auto check_stats = [&](const char* name, const at::Tensor& t) {
    MOCE_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
    MOCE_CHECK(t.sizes() == at::IntArrayRef(stats_shape), op, ": ", name, " must have shape [B, H, W] = ",
               at::IntArrayRef(stats_shape), ", got ", t.sizes());
    MOCE_CHECK(t.scalar_type() == stats_dtype, op, ": ", name, " must have dtype ", stats_dtype,
               " (the statistics dtype of a ", x.scalar_type(), " input), got ", t.scalar_type());
    check_device(op, name, t, x, device_type);
  };
  check_stats("mean", mean);
  check_stats("rstd", rstd);
}

namespace {

// Pixels per CPU task: the inner loops run over this many contiguous pixels of one channel, so
// they vectorise, and a task's [C, kPixels] tile stays in cache across the passes over it.
constexpr int64_t kPixels = 64;

// Fixed number of reduction groups for grad_weight / grad_bias. Tasks are assigned to groups
// by index, not by thread, so the sums are bitwise identical for any number of threads.
constexpr int64_t kMaxGroups = 256;

template <typename scalar_t>
void layernorm2d_fwd_cpu_kernel(const scalar_t* x, const at::opmath_type<scalar_t>* w,
                                const at::opmath_type<scalar_t>* b, scalar_t* y,
                                at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* rstd,
                                int64_t B, int64_t C, int64_t N, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = (N + kPixels - 1) / kPixels;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (C * kPixels));
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const acc_t eps_acc = static_cast<acc_t>(eps);
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    acc_t sum[kPixels];
    acc_t mu[kPixels];
    acc_t rs[kPixels];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / chunks;
      const int64_t p0 = (task % chunks) * kPixels;
      const int64_t P = std::min(kPixels, N - p0);
      const scalar_t* xb = x + bi * C * N + p0;
      scalar_t* yb = y + bi * C * N + p0;

      // Two passes over the cached tile: the mean, then the centred sum of squares (no
      // cancellation). The mean sums x - x[c = 0], small numbers when |mean| >> std.
      for (int64_t p = 0; p < P; ++p) {
        mu[p] = static_cast<acc_t>(xb[p]);
        sum[p] = acc_t(0);
      }
      for (int64_t c = 1; c < C; ++c) {
        const scalar_t* xc = xb + c * N;
        for (int64_t p = 0; p < P; ++p) sum[p] += static_cast<acc_t>(xc[p]) - mu[p];
      }
      for (int64_t p = 0; p < P; ++p) {
        mu[p] += sum[p] * inv_c;
        sum[p] = acc_t(0);
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xc = xb + c * N;
        for (int64_t p = 0; p < P; ++p) {
          const acc_t d = static_cast<acc_t>(xc[p]) - mu[p];
          sum[p] += d * d;
        }
      }
      for (int64_t p = 0; p < P; ++p) {
        rs[p] = acc_t(1) / std::sqrt(sum[p] * inv_c + eps_acc);
        mean[bi * N + p0 + p] = mu[p];
        rstd[bi * N + p0 + p] = rs[p];
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xc = xb + c * N;
        scalar_t* yc = yb + c * N;
        const acc_t wc = w[c];
        const acc_t bc = b[c];
        for (int64_t p = 0; p < P; ++p) {
          yc[p] = static_cast<scalar_t>((static_cast<acc_t>(xc[p]) - mu[p]) * rs[p] * wc + bc);
        }
      }
    }
  });
}

// grad_x at each pixel: rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)), g = grad_y * weight.
// grad_weight[c] = sum over (b, pixel) of grad_y * xhat, grad_bias[c] = sum of grad_y, summed
// per group into partial_w / partial_b ([groups, C]).
template <typename scalar_t>
void layernorm2d_bwd_cpu_kernel(const scalar_t* dy, const scalar_t* x, const at::opmath_type<scalar_t>* w,
                                const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
                                scalar_t* dx, at::opmath_type<scalar_t>* partial_w,
                                at::opmath_type<scalar_t>* partial_b, int64_t B, int64_t C, int64_t N,
                                int64_t groups) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunks = (N + kPixels - 1) / kPixels;
  const int64_t tasks = B * chunks;
  const int64_t tasks_per_group = (tasks + groups - 1) / groups;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  at::parallel_for(0, groups, 1, [&](int64_t group_begin, int64_t group_end) {
    acc_t mu[kPixels];
    acc_t rs[kPixels];
    acc_t sum_g[kPixels];
    acc_t sum_gx[kPixels];
    for (int64_t group = group_begin; group < group_end; ++group) {
      acc_t* pw = partial_w + group * C;
      acc_t* pb = partial_b + group * C;
      std::fill_n(pw, C, acc_t(0));
      std::fill_n(pb, C, acc_t(0));
      const int64_t task_end = std::min(tasks, (group + 1) * tasks_per_group);
      for (int64_t task = group * tasks_per_group; task < task_end; ++task) {
        const int64_t bi = task / chunks;
        const int64_t p0 = (task % chunks) * kPixels;
        const int64_t P = std::min(kPixels, N - p0);
        const int64_t offset = bi * C * N + p0;
        for (int64_t p = 0; p < P; ++p) {
          mu[p] = mean[bi * N + p0 + p];
          rs[p] = rstd[bi * N + p0 + p];
          sum_g[p] = acc_t(0);
          sum_gx[p] = acc_t(0);
        }
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* xc = x + offset + c * N;
          const scalar_t* dyc = dy + offset + c * N;
          const acc_t wc = w[c];
          acc_t gw = 0;
          acc_t gb = 0;
#pragma omp simd reduction(+ : gw, gb)
          for (int64_t p = 0; p < P; ++p) {
            const acc_t xhat = (static_cast<acc_t>(xc[p]) - mu[p]) * rs[p];
            const acc_t dyp = static_cast<acc_t>(dyc[p]);
            const acc_t g = dyp * wc;
            sum_g[p] += g;
            sum_gx[p] += g * xhat;
            gw += dyp * xhat;
            gb += dyp;
          }
          pw[c] += gw;
          pb[c] += gb;
        }
        for (int64_t p = 0; p < P; ++p) {
          sum_g[p] *= inv_c;
          sum_gx[p] *= inv_c;
        }
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* xc = x + offset + c * N;
          const scalar_t* dyc = dy + offset + c * N;
          scalar_t* dxc = dx + offset + c * N;
          const acc_t wc = w[c];
          for (int64_t p = 0; p < P; ++p) {
            const acc_t xhat = (static_cast<acc_t>(xc[p]) - mu[p]) * rs[p];
            const acc_t g = static_cast<acc_t>(dyc[p]) * wc;
            dxc[p] = static_cast<scalar_t>(rs[p] * (g - sum_g[p] - xhat * sum_gx[p]));
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm2d_fwd_cpu(const at::Tensor& x_in,
                                                                   const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps) {
  layernorm2d_check_fwd(x_in, weight, bias, eps, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto stats_dtype = layernorm2d_stats_dtype(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({B, H, W}, x.options().dtype(stats_dtype));
  at::Tensor rstd = at::empty({B, H, W}, x.options().dtype(stats_dtype));
  if (x.numel() == 0) return {y, mean, rstd};
  const at::Tensor w = weight.to(stats_dtype).contiguous();
  const at::Tensor b = bias.to(stats_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layernorm2d_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layernorm2d_fwd_cpu_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                                         b.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(),
                                         mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), B,
                                         C, H * W, eps);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm2d_bwd_cpu(const at::Tensor& grad_y_in,
                                                                   const at::Tensor& x_in,
                                                                   const at::Tensor& weight,
                                                                   const at::Tensor& mean_in,
                                                                   const at::Tensor& rstd_in) {
  layernorm2d_check_bwd(grad_y_in, x_in, weight, mean_in, rstd_in, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor mean = mean_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  const auto stats_dtype = layernorm2d_stats_dtype(x.scalar_type());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) {
    return {grad_x, at::zeros({C}, weight.options()), at::zeros({C}, weight.options())};
  }
  const at::Tensor w = weight.to(stats_dtype).contiguous();
  const int64_t tasks = B * ((N + kPixels - 1) / kPixels);
  const int64_t groups = std::min(tasks, kMaxGroups);
  at::Tensor partial_w = at::empty({groups, C}, x.options().dtype(stats_dtype));
  at::Tensor partial_b = at::empty({groups, C}, x.options().dtype(stats_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layernorm2d_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layernorm2d_bwd_cpu_kernel<scalar_t>(
        grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        partial_w.mutable_data_ptr<acc_t>(), partial_b.mutable_data_ptr<acc_t>(), B, C, N, groups);
  });
  // Sum the group partials in group order, in float64: the same bits whatever the thread count.
  at::Tensor grad_w = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor grad_b = at::empty({C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(stats_dtype, "layernorm2d_bwd_cpu_reduce", [&] {
    const scalar_t* pw = partial_w.const_data_ptr<scalar_t>();
    const scalar_t* pb = partial_b.const_data_ptr<scalar_t>();
    double* gw = grad_w.mutable_data_ptr<double>();
    double* gb = grad_b.mutable_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      gw[c] = 0.0;
      gb[c] = 0.0;
    }
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = 0; c < C; ++c) {
        gw[c] += static_cast<double>(pw[g * C + c]);
        gb[c] += static_cast<double>(pb[g * C + c]);
      }
    }
  });
  return {grad_x, grad_w.to(weight.scalar_type()), grad_b.to(weight.scalar_type())};
}

}  // namespace

}  // namespace moce

TORCH_LIBRARY(moce, m) {
  m.def("layernorm2d_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layernorm2d_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moce, CPU, m) {
  m.impl("layernorm2d_fwd", &moce::layernorm2d_fwd_cpu);
  m.impl("layernorm2d_bwd", &moce::layernorm2d_bwd_cpu);
}
