// The CUDA kernels of layernorm2d (csrc/cuda/layernorm2d.cuh) on the CPU, driven as
// csrc/cuda/layernorm2d.cu drives them (block sizes, 16-byte path, per-warp partial sums).
// dtype 0 = float32, 1 = bfloat16; statistics and parameters in float32.
#include "cuda_shim.h"
#include "drivers.h"

// clang-format off: the shim must come first.
#include "../../../csrc/cuda/layernorm2d.cuh"
// clang-format on

#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int kThreads = 128;
constexpr int kReduceThreads = 256;

unsigned int grid_for(int64_t threads_needed, int block) {
  return static_cast<unsigned int>((threads_needed + block - 1) / block);
}

}  // namespace

extern "C" {

// y, mean, rstd of x [B, C, H * W = N]; w, b [C] float32. `global_only`: the kernel that reads
// x twice even where the .cu would launch the staged one (the tests compare the two).
void layernorm2d_fwd(int dtype, const void* x, const float* w, const float* b, int64_t B, int64_t C, int64_t N,
                     float eps, void* y, float* mean, float* rstd, int scalar, int global_only) {
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int vec = 16 / static_cast<int>(sizeof(T));
    const bool use_vec = !scalar && N % vec == 0 && emu::aligned(x, 16) && emu::aligned(y, 16);
    emu::with_vector_width<T>(use_vec, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int64_t packs_per_image = N / V;
      const int64_t total = B * packs_per_image;
      const auto args = std::make_tuple(static_cast<const T*>(x), w, b, static_cast<T*>(y), mean, rstd, total,
                                        packs_per_image, C, N, eps);
      // As the .cu: the staged kernel on the 16-byte path where C fits it (unless `global_only`).
      if constexpr (V * sizeof(T) == 16) {
        if (!global_only) {
          const bool staged = moce::cuda::with_staged_width(C, [&](auto width_tag) {
            constexpr int kMaxC = decltype(width_tag)::value;
            std::apply(
                [&](auto... a) {
                  emu::launch(grid_for(total, moce::cuda::kStagedThreads), moce::cuda::kStagedThreads,
                              moce::cuda::layernorm2d_fwd_staged_kernel<T, float, V, kMaxC>, a...);
                },
                args);
          });
          if (staged) return;
        }
      }
      std::apply(
          [&](auto... a) {
            emu::launch(grid_for(total, kThreads), kThreads, moce::cuda::layernorm2d_fwd_kernel<T, float, V>, a...);
          },
          args);
    });
  });
}

// grad_x [B, C, N], grad_w and grad_b [C] (float32). `global_only` as in layernorm2d_fwd.
void layernorm2d_bwd(int dtype, const void* grad_y, const void* x, const float* w, const float* mean,
                     const float* rstd, int64_t B, int64_t C, int64_t N, void* grad_x, float* grad_w, float* grad_b,
                     int scalar, int global_only) {
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int vec = 16 / static_cast<int>(sizeof(T));
    const bool use_vec =
        !scalar && N % vec == 0 && emu::aligned(x, 16) && emu::aligned(grad_y, 16) && emu::aligned(grad_x, 16);
    emu::with_vector_width<T>(use_vec, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int64_t packs_per_image = N / V;
      const int64_t total = B * packs_per_image;
      const int64_t num_warps = (total + moce::cuda::kWarpSize - 1) / moce::cuda::kWarpSize;
      // Every entry is written by the first kernel: NaN shows one that is not.
      std::vector<float> partial_w(static_cast<size_t>(C * num_warps), std::numeric_limits<float>::quiet_NaN());
      std::vector<float> partial_b(partial_w);
      const auto args = std::make_tuple(static_cast<const T*>(grad_y), static_cast<const T*>(x), w, mean, rstd,
                                        static_cast<T*>(grad_x), partial_w.data(), partial_b.data(), total,
                                        packs_per_image, C, N, num_warps);
      bool staged = false;
      // As the .cu: the staged kernel (single-warp blocks) on the 16-byte path where C fits it.
      if constexpr (V * sizeof(T) == 16) {
        if (!global_only) {
          staged = moce::cuda::with_staged_bwd_width(C, [&](auto width_tag) {
            constexpr int kMaxC = decltype(width_tag)::value;
            std::apply(
                [&](auto... a) {
                  emu::launch(grid_for(total, moce::cuda::kStagedThreads), moce::cuda::kStagedThreads,
                              moce::cuda::layernorm2d_bwd_staged_kernel<T, float, V, kMaxC>, a...);
                },
                args);
          });
        }
      }
      if (!staged) {
        std::apply(
            [&](auto... a) {
              emu::launch(grid_for(total, kThreads), kThreads, moce::cuda::layernorm2d_bwd_kernel<T, float, V>, a...);
            },
            args);
      }
      emu::launch(static_cast<unsigned int>(C), kReduceThreads,
                  moce::cuda::layernorm2d_bwd_weight_kernel<float, kReduceThreads>,
                  static_cast<const float*>(partial_w.data()), static_cast<const float*>(partial_b.data()), grad_w,
                  grad_b, num_warps);
    });
  });
}

// What the shim reported since the last call ("" if nothing): warp primitives or barriers with
// returned threads.
const char* emulation_errors() {
  static std::string last;
  last = emu::take_errors();
  return last.c_str();
}

}  // extern "C"
