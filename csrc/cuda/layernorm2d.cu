// CUDA implementation of moce::layernorm2d_fwd / moce::layernorm2d_bwd (schemas and the CPU
// kernels in csrc/layernorm2d.cpp, kernel bodies in layernorm2d.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <limits>

#include "../check.h"
#include "../layernorm2d.h"
#include "layernorm2d.cuh"

namespace moce::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kReduceThreads = 256;

// Pixels per 128-bit access: 4 float, 2 double, 8 half / bfloat16.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream aliases; including
// ATen/cuda/CUDAContext.h for it would also need the cuBLAS/cuSPARSE headers, which a bare
// CUDA toolkit may lack.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

unsigned int grid_for(int64_t threads_needed, int block) {
  const int64_t blocks = (threads_needed + block - 1) / block;
  MOCE_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "moce::layernorm2d: input too large (",
             threads_needed, " threads)");
  return static_cast<unsigned int>(blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm2d_fwd_cuda(const at::Tensor& x_in,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& bias, double eps) {
  layernorm2d_check_fwd(x_in, weight, bias, eps, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t N = H * W;
  const auto stats_dtype = layernorm2d_stats_dtype(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({B, H, W}, x.options().dtype(stats_dtype));
  at::Tensor rstd = at::empty({B, H, W}, x.options().dtype(stats_dtype));
  if (x.numel() == 0) return {y, mean, rstd};
  const at::Tensor w = weight.to(stats_dtype).contiguous();
  const at::Tensor b = bias.to(stats_dtype).contiguous();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layernorm2d_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int vec = kVec<scalar_t>;
    const bool use_vec = N % vec == 0 && aligned16(x.const_data_ptr()) && aligned16(y.const_data_ptr());
    const auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int64_t packs_per_image = N / V;
      const int64_t total = B * packs_per_image;
      const auto args = std::make_tuple(x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                                        b.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(),
                                        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), total,
                                        packs_per_image, C, N, static_cast<acc_t>(eps));
      if constexpr (V * sizeof(scalar_t) == 16) {
        // x read once (layernorm2d_fwd_staged_kernel) where the channels fit its shared memory.
        const bool staged = moce::cuda::with_staged_width(C, [&](auto width_tag) {
          constexpr int kMaxC = decltype(width_tag)::value;
          std::apply(
              [&](auto... a) {
                layernorm2d_fwd_staged_kernel<scalar_t, acc_t, V, kMaxC>
                    <<<grid_for(total, kStagedThreads), kStagedThreads, 0, stream>>>(a...);
              },
              args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        if (staged) return;
      }
      std::apply(
          [&](auto... a) {
            layernorm2d_fwd_kernel<scalar_t, acc_t, V><<<grid_for(total, kThreads), kThreads, 0, stream>>>(a...);
          },
          args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (use_vec) {
      launch(std::integral_constant<int, vec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm2d_bwd_cuda(const at::Tensor& grad_y_in,
                                                                    const at::Tensor& x_in,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& mean_in,
                                                                    const at::Tensor& rstd_in) {
  layernorm2d_check_bwd(grad_y_in, x_in, weight, mean_in, rstd_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
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
  at::Tensor grad_w = at::empty({C}, x.options().dtype(stats_dtype));
  at::Tensor grad_b = at::empty({C}, x.options().dtype(stats_dtype));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layernorm2d_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int vec = kVec<scalar_t>;
    const bool use_vec = N % vec == 0 && aligned16(x.const_data_ptr()) &&
                         aligned16(grad_y.const_data_ptr()) && aligned16(grad_x.const_data_ptr());
    const auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int64_t packs_per_image = N / V;
      const int64_t total = B * packs_per_image;
      const int64_t num_warps = (total + kWarpSize - 1) / kWarpSize;
      // [C, num_warps] partial sums; every entry is written by the first kernel.
      at::Tensor partial_w = at::empty({C, num_warps}, x.options().dtype(stats_dtype));
      at::Tensor partial_b = at::empty({C, num_warps}, x.options().dtype(stats_dtype));
      const auto args = std::make_tuple(
          grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
          mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(),
          partial_w.mutable_data_ptr<acc_t>(), partial_b.mutable_data_ptr<acc_t>(), total, packs_per_image,
          C, N, num_warps);
      // x and grad_y read once (layernorm2d_bwd_staged_kernel) where both fit its shared memory;
      // its blocks are single warps, so the partial sums are laid out the same.
      bool staged = false;
      if constexpr (V * sizeof(scalar_t) == 16) {
        staged = moce::cuda::with_staged_bwd_width(C, [&](auto width_tag) {
          constexpr int kMaxC = decltype(width_tag)::value;
          std::apply(
              [&](auto... a) {
                layernorm2d_bwd_staged_kernel<scalar_t, acc_t, V, kMaxC>
                    <<<grid_for(total, kStagedThreads), kStagedThreads, 0, stream>>>(a...);
              },
              args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      if (!staged) {
        std::apply(
            [&](auto... a) {
              layernorm2d_bwd_kernel<scalar_t, acc_t, V><<<grid_for(total, kThreads), kThreads, 0, stream>>>(a...);
            },
            args);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      MOCE_CHECK(C <= std::numeric_limits<int32_t>::max(), "moce::layernorm2d_bwd: too many channels");
      layernorm2d_bwd_weight_kernel<acc_t, kReduceThreads>
          <<<static_cast<unsigned int>(C), kReduceThreads, 0, stream>>>(
              partial_w.const_data_ptr<acc_t>(), partial_b.const_data_ptr<acc_t>(),
              grad_w.mutable_data_ptr<acc_t>(), grad_b.mutable_data_ptr<acc_t>(), num_warps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (use_vec) {
      launch(std::integral_constant<int, vec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {grad_x, grad_w.to(weight.scalar_type()), grad_b.to(weight.scalar_type())};
}

}  // namespace

}  // namespace moce::cuda

TORCH_LIBRARY_IMPL(moce, CUDA, m) {
  m.impl("layernorm2d_fwd", &moce::cuda::layernorm2d_fwd_cuda);
  m.impl("layernorm2d_bwd", &moce::cuda::layernorm2d_bwd_cuda);
}
