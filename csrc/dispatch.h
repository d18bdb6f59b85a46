// Host helpers of dispatch shared by the CPU (csrc/dispatch.cpp, which defines them) and CUDA
// (csrc/cuda/dispatch.cu) implementations, so both reject bad arguments alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>

namespace moce {

// MOCE_CHECK the arguments of moce::dispatch_fwd: x [B, ...] of any dtype (at least 1-D);
// sorted_images and inverse 1-D int64 of one length S, with S = B * k (S % B == 0; S == 0 when
// B == 0); all on one device of type device_type. The index VALUES are not read here.
void dispatch_check_fwd(const at::Tensor& x, const at::Tensor& sorted_images, const at::Tensor& inverse,
                        c10::DeviceType device_type);

// MOCE_CHECK the arguments of moce::dispatch_bwd: grad_out [S, ...] floating, inverse [S] int64
// on its device, batch >= 0 with S % batch == 0 (S == 0 when batch == 0).
void dispatch_check_bwd(const at::Tensor& grad_out, const at::Tensor& inverse, int64_t batch,
                        c10::DeviceType device_type);

}  // namespace moce
