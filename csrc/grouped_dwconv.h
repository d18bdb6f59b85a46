// Host helpers of grouped_dwconv shared by the CPU (csrc/grouped_dwconv.cpp, which defines them)
// and CUDA (csrc/cuda/grouped_dwconv.cu) implementations, so both reject bad arguments alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

namespace moce {

// Largest kernel size the kernels support (the CUDA tiles carry a halo of kMaxKernelSize / 2).
constexpr int64_t kDwconvMaxKernelSize = 9;

// Per-plane partial sums of the weight gradient: K_e * K_e taps (index i * K_e + j) then the bias
// term, for the largest K_e of the call.
int64_t grouped_dwconv_num_taps(at::IntArrayRef kernel_sizes);

// MOCE_CHECK the arguments of moce::grouped_dwconv_fwd: x [N, C_max, H, W] floating with
// C_max >= 1; weight [E, C_max, K_max, K_max] (K_max odd) and bias [E, C_max] (if given) in x's
// dtype; offsets [E + 1] int32 / int64; all on one device of type device_type; channels and
// kernel_sizes E ints, 1 <= channels[e] <= C_max, kernel_sizes[e] odd in 1..min(9, K_max).
// The VALUES of offsets are not read here (that would synchronise a GPU).
void grouped_dwconv_check_fwd(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& offsets,
                              at::IntArrayRef channels, at::IntArrayRef kernel_sizes,
                              c10::DeviceType device_type);

// MOCE_CHECK the arguments of moce::grouped_dwconv_bwd: as above, plus grad_y of x's shape and
// dtype on x's device.
void grouped_dwconv_check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& offsets, at::IntArrayRef channels,
                              at::IntArrayRef kernel_sizes, c10::DeviceType device_type);

}  // namespace moce
