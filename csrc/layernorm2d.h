// Host helpers of layernorm2d shared by the CPU (csrc/layernorm2d.cpp, which defines them) and
// CUDA (csrc/cuda/layernorm2d.cu) implementations, so both reject bad arguments alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

namespace moce {

// Statistics (mean, rstd) and accumulation dtype: float64 for float64 x, else float32.
at::ScalarType layernorm2d_stats_dtype(at::ScalarType x_dtype);

// MOCE_CHECK the arguments of moce::layernorm2d_fwd: x [B, C, H, W] floating with C >= 1,
// weight and bias [C] floating, all on one device of type device_type, eps finite and > 0.
void layernorm2d_check_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, c10::DeviceType device_type);

// MOCE_CHECK the arguments of moce::layernorm2d_bwd: as above, plus grad_y of x's shape and
// dtype, mean and rstd [B, H, W] in the statistics dtype.
void layernorm2d_check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& mean, const at::Tensor& rstd, c10::DeviceType device_type);

}  // namespace moce
