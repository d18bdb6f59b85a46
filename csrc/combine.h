// Host helpers of combine shared by the CPU (csrc/combine.cpp, which defines them) and CUDA
// (csrc/cuda/combine.cu) implementations, so both reject bad arguments alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

namespace moce {

// Accumulation dtype: float64 when y or gates is float64, else float32.
at::ScalarType combine_acc_dtype(at::ScalarType y_dtype, at::ScalarType gates_dtype);

// MOCE_CHECK the arguments of moce::combine_fwd: y [S, ...] floating (at least 1-D); gates
// [B, k] floating with B * k == S; inverse and sorted_slots [S] int64; all on one device of type
// device_type. The index VALUES are not read here.
void combine_check_fwd(const at::Tensor& y, const at::Tensor& gates, const at::Tensor& inverse,
                       const at::Tensor& sorted_slots, c10::DeviceType device_type);

// MOCE_CHECK the arguments of moce::combine_bwd: as above, plus grad_out [B, ...] (y's feature
// shape) in y's dtype on y's device.
void combine_check_bwd(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& gates,
                       const at::Tensor& inverse, const at::Tensor& sorted_slots,
                       c10::DeviceType device_type);

}  // namespace moce
