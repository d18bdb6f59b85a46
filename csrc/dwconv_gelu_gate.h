// Host helpers of dwconv_gelu_gate shared by the CPU (csrc/dwconv_gelu_gate.cpp, which defines
// them) and CUDA (csrc/cuda/dwconv_gelu_gate.cu) implementations, so both reject bad arguments
// alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>

namespace moce {

// MOCE_CHECK the arguments of moce::dwconv_gelu_gate_fwd: x [B, 2 * Ch, H, W] floating with
// Ch >= 1; weight [2 * Ch, K, K] with K odd in 1..kDwconvMaxKernelSize (9) and bias [2 * Ch]
// (if given) in x's dtype; all on one device of type device_type.
void dwconv_gelu_gate_check_fwd(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, c10::DeviceType device_type);

// MOCE_CHECK the arguments of moce::dwconv_gelu_gate_bwd: as above, plus grad_y [B, Ch, H, W]
// in x's dtype on x's device.
void dwconv_gelu_gate_check_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, c10::DeviceType device_type);

}  // namespace moce
