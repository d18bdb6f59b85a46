// The CUDA kernel bodies of grouped_dwconv and dwconv_gelu_gate (csrc/cuda/*.cuh), compiled for the
// CPU against cuda_shim.h and driven as csrc/cuda/*.cu drive them: the same geometry, the same
// choice of 16-byte path and kernel class, the same scratch buffers. A C interface for ctypes
// (tests/csrc/test_cuda_emulation.py); dtype 0 = float32, 1 = bfloat16.
#include "cuda_shim.h"
#include "drivers.h"

// clang-format off: the shim must come first.
#include "../../../csrc/cuda/dwconv_gelu_gate.cuh"
#include "../../../csrc/cuda/grouped_dwconv.cuh"
// clang-format on

#include <limits>
#include <type_traits>
#include <vector>

namespace {

using moce::cuda::dwconv::Geometry;
namespace dw = moce::cuda::dwconv;
namespace gate = moce::cuda::gate;

Geometry geometry(int64_t N, int64_t C, int64_t H, int64_t W, int num_experts, int64_t k_max) {
  Geometry g{};
  g.N = N;
  g.C = C;
  g.H = H;
  g.W = W;
  g.tiles_w = (W + dw::kTileW - 1) / dw::kTileW;
  g.tiles = ((H + dw::kTileH - 1) / dw::kTileH) * g.tiles_w;
  g.num_experts = num_experts;
  g.k_max = static_cast<int>(k_max);
  return g;
}

unsigned int blocks(const Geometry& g) { return static_cast<unsigned int>(g.N * g.C * g.tiles); }

// The .cu files' rule: rows a multiple of the vector width and 16-byte aligned bases; `scalar`
// forces the 1-element path.
template <typename T>
bool vectors(int64_t W, std::initializer_list<const void*> ptrs, int scalar) {
  if (scalar || W % (16 / static_cast<int64_t>(sizeof(T))) != 0) return false;
  for (const void* p : ptrs) {
    if (!emu::aligned(p, 16)) return false;
  }
  return true;
}

dw::ExpertTable table_of(const int64_t* channels, const int64_t* kernel_sizes, int E) {
  dw::ExpertTable table{};
  for (int e = 0; e < E; ++e) {
    table.channels[e] = static_cast<int32_t>(channels[e]);
    table.kernel_size[e] = static_cast<int32_t>(kernel_sizes[e]);
  }
  return table;
}

}  // namespace

extern "C" {

// grouped_dwconv_fwd: x [N, C, H, W], weight [E, C, k_max, k_max], bias [E, C] or null.
void grouped_dwconv_fwd(int dtype, const void* x, const void* weight, const void* bias, const int64_t* offsets,
                        const int64_t* channels, const int64_t* kernel_sizes, int E, int64_t N, int64_t C,
                        int64_t H, int64_t W, int64_t k_max, void* y, int scalar) {
  const Geometry g = geometry(N, C, H, W, E, k_max);
  const dw::ExpertTable table = table_of(channels, kernel_sizes, E);
  const std::vector<int64_t> sizes(kernel_sizes, kernel_sizes + E);
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    emu::with_vector_width<T>(vectors<T>(W, {x}, scalar), [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      dw::with_kernel_class(dw::largest_kernel(sizes), [&](auto class_tag) {
        constexpr int KC = decltype(class_tag)::value;
        emu::launch(blocks(g), dw::kThreads, dw::grouped_dwconv_fwd_kernel<T, float, V, KC>,
                    static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias), offsets,
                    table, static_cast<T*>(y), g);
      });
    });
  });
}

// grouped_dwconv_bwd: grad_x [N, C, H, W], grad_w [E, C, k_max, k_max], grad_b [E, C].
void grouped_dwconv_bwd(int dtype, const void* grad_y, const void* x, const void* weight, const int64_t* offsets,
                        const int64_t* channels, const int64_t* kernel_sizes, int E, int64_t N, int64_t C,
                        int64_t H, int64_t W, int64_t k_max, void* grad_x, void* grad_w, void* grad_b,
                        int scalar) {
  const Geometry g = geometry(N, C, H, W, E, k_max);
  const dw::ExpertTable table = table_of(channels, kernel_sizes, E);
  const std::vector<int64_t> sizes(kernel_sizes, kernel_sizes + E);
  const int64_t largest = dw::largest_kernel(sizes);
  const int taps = static_cast<int>(largest * largest + 1);
  // Every entry is written by the first kernel: NaN shows one that is not.
  std::vector<float> partial(static_cast<size_t>(g.N * g.C * g.tiles * taps), std::numeric_limits<float>::quiet_NaN());
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    emu::with_vector_width<T>(vectors<T>(W, {x, grad_y}, scalar), [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      dw::with_kernel_class(largest, [&](auto class_tag) {
        constexpr int KC = decltype(class_tag)::value;
        emu::launch(blocks(g), dw::kThreads, dw::grouped_dwconv_bwd_kernel<T, float, V, KC>,
                    static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const T*>(weight), offsets,
                    table, static_cast<T*>(grad_x), partial.data(), g, taps);
      });
    });
    emu::launch(static_cast<unsigned int>(E * C), 128, dw::dwconv_bwd_weight_kernel<T, float>,
                static_cast<const float*>(partial.data()), offsets, table, static_cast<T*>(grad_w),
                static_cast<T*>(grad_b), g, taps);
  });
}

// dwconv_gelu_gate_fwd: x [B, 2 Ch, H, W], weight [2 Ch, K, K], bias [2 Ch] or null; y [B, Ch, H, W].
void dwconv_gelu_gate_fwd(int dtype, const void* x, const void* weight, const void* bias, int64_t B, int64_t Ch,
                          int64_t H, int64_t W, int64_t K, void* y, int scalar) {
  const Geometry g = geometry(B, Ch, H, W, 1, K);
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    emu::with_vector_width<T>(vectors<T>(W, {x}, scalar), [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      dw::with_kernel_class(K, [&](auto class_tag) {
        constexpr int KC = decltype(class_tag)::value;
        emu::launch(blocks(g), dw::kThreads, gate::dwconv_gelu_gate_fwd_kernel<T, float, V, KC>,
                    static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
                    static_cast<T*>(y), g);
      });
    });
  });
}

// dwconv_gelu_gate_bwd: grad_x [B, 2 Ch, H, W], grad_w [2 Ch, K, K], grad_b [2 Ch].
void dwconv_gelu_gate_bwd(int dtype, const void* grad_y, const void* x, const void* weight, const void* bias,
                          int64_t B, int64_t Ch, int64_t H, int64_t W, int64_t K, void* grad_x, void* grad_w,
                          void* grad_b, int scalar) {
  const Geometry pairs = geometry(B, Ch, H, W, 1, K);
  const Geometry planes = geometry(B, 2 * Ch, H, W, 1, K);
  const int taps = static_cast<int>(K * K + 1);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> grad_u(static_cast<size_t>(B * 2 * Ch * H * W), nan);
  std::vector<float> partial(static_cast<size_t>(planes.N * planes.C * planes.tiles * taps), nan);
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    // As the .cu: grad_u, a fresh allocation, takes the 16-byte path whenever x does.
    const bool vec = vectors<T>(W, {x}, scalar) && emu::aligned(grad_u.data(), 16);
    emu::with_vector_width<T>(vec, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      constexpr int GV = V == 1 ? 1 : 16 / static_cast<int>(sizeof(float));
      dw::with_kernel_class(K, [&](auto class_tag) {
        constexpr int KC = decltype(class_tag)::value;
        emu::launch(blocks(pairs), dw::kThreads, gate::dwconv_gelu_gate_bwd_gate_kernel<T, float, V, KC>,
                    static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const T*>(weight),
                    static_cast<const T*>(bias), grad_u.data(), pairs);
        emu::launch(blocks(planes), dw::kThreads, gate::dwconv_gelu_gate_bwd_conv_kernel<T, float, V, GV, KC>,
                    static_cast<const float*>(grad_u.data()), static_cast<const T*>(x),
                    static_cast<const T*>(weight), static_cast<T*>(grad_x), partial.data(), planes, taps);
      });
    });
    emu::launch(static_cast<unsigned int>(2 * Ch), 128, gate::dwconv_gelu_gate_bwd_weight_kernel<T, float>,
                static_cast<const float*>(partial.data()), static_cast<T*>(grad_w), static_cast<T*>(grad_b), planes,
                taps, bias != nullptr);
  });
}

}  // extern "C"
