// The CUDA kernels of dispatch and combine (csrc/cuda/dispatch.cuh, combine.cuh) on the CPU,
// driven as csrc/cuda/dispatch.cu and combine.cu drive them. The grid caps are parameters (the .cu
// files use 1 << 20 blocks along a row and 65,535 down the rows) so that small tests reach the
// kernels' grid-stride loops. dtype 0 = float32, 1 = bfloat16; gates and accumulation float32.
#include "cuda_shim.h"
#include "drivers.h"

// clang-format off: the shim must come first.
#include "../../../csrc/cuda/combine.cuh"
// clang-format on

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

namespace rows = moce::cuda::rows;

constexpr int kThreads = 256;

dim3 row_grid(int64_t row_items, int64_t rows_, int64_t cap_x, int64_t cap_y) {
  const int64_t x = std::max<int64_t>(1, std::min<int64_t>((row_items + kThreads - 1) / kThreads, cap_x));
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(std::clamp<int64_t>(rows_, 1, cap_y)));
}

}  // namespace

extern "C" {

// out[i] = x[index[i]] (rows of row_bytes bytes), the widest word that fits, as dispatch_fwd_cuda.
void dispatch_fwd(const void* x, const int64_t* index, int64_t batch, int64_t slots, int64_t row_bytes, void* out,
                  int64_t cap_x, int64_t cap_y) {
  const auto launch = [&](auto word_tag) {
    using W = decltype(word_tag);
    const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(W));
    emu::launch(row_grid(row_words, slots, cap_x, cap_y), dim3(kThreads), rows::dispatch_fwd_kernel<W>,
                static_cast<const W*>(x), index, static_cast<W*>(out), batch, slots, row_words);
  };
  rows::with_widest_word(row_bytes, x, out, launch);
}

// grad_x[b] = sum over b's k slots of grad_out[inverse[b * k + j]], as dispatch_bwd_cuda.
void dispatch_bwd(int dtype, const void* grad_out, const int64_t* inverse, int64_t batch, int64_t k,
                  int64_t features, void* grad_x, int64_t cap_x, int64_t cap_y) {
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int vec = 16 / static_cast<int>(sizeof(T));
    const bool use_vec = features % vec == 0 && emu::aligned(grad_out, 16) && emu::aligned(grad_x, 16);
    emu::with_vector_width<T>(use_vec, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      emu::launch(row_grid(features / V, batch, cap_x, cap_y), dim3(kThreads), rows::dispatch_bwd_kernel<T, float, V>,
                  static_cast<const T*>(grad_out), inverse, static_cast<T*>(grad_x), batch, k, features);
    });
  });
}

// out[b] = sum_j gates[b, j] * y[inverse[b * k + j]], as combine_fwd_cuda.
void combine_fwd(int dtype, const void* y, const float* gates, const int64_t* inverse, int64_t batch, int64_t k,
                 int64_t features, void* out, int64_t cap_x, int64_t cap_y) {
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int vec = 16 / static_cast<int>(sizeof(T));
    const bool use_vec = features % vec == 0 && emu::aligned(y, 16) && emu::aligned(out, 16);
    emu::with_vector_width<T>(use_vec, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      emu::launch(row_grid(features / V, batch, cap_x, cap_y), dim3(kThreads), rows::combine_fwd_kernel<T, float, V>,
                  static_cast<const T*>(y), gates, inverse, static_cast<T*>(out), batch, k, features);
    });
  });
}

// grad_y [S, F] and grad_gates [S] (float32), as combine_bwd_cuda.
void combine_bwd(int dtype, const void* grad_out, const void* y, const float* gates, const int64_t* inverse,
                 const int64_t* sorted_slots, int64_t slots, int64_t k, int64_t features, void* grad_y,
                 float* grad_gates, int64_t cap_x, int64_t cap_y) {
  emu::with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int vec = 16 / static_cast<int>(sizeof(T));
    const bool use_vec =
        features % vec == 0 && emu::aligned(grad_out, 16) && emu::aligned(y, 16) && emu::aligned(grad_y, 16);
    emu::with_vector_width<T>(use_vec, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const int64_t packs = features / V;
      emu::launch(row_grid(packs, slots, cap_x, cap_y), dim3(kThreads), rows::combine_bwd_y_kernel<T, float, V>,
                  static_cast<const T*>(grad_out), gates, sorted_slots, static_cast<T*>(grad_y), slots, k, features);
      const int64_t chunks = (packs + rows::kGateChunkPacks - 1) / rows::kGateChunkPacks;
      // Every entry is written by the partial kernel: NaN shows one that is not.
      std::vector<float> partial(static_cast<size_t>(slots * chunks), std::numeric_limits<float>::quiet_NaN());
      const dim3 grid(static_cast<unsigned int>(chunks), static_cast<unsigned int>(std::min<int64_t>(slots, cap_y)));
      emu::launch(grid, dim3(rows::kGateThreads), rows::combine_gate_partial_kernel<T, float, V>,
                  static_cast<const T*>(grad_out), static_cast<const T*>(y), inverse, partial.data(), slots, k,
                  features, chunks);
      constexpr int kReduceThreads = 128;
      constexpr int64_t kSlotsPerBlock = kReduceThreads / moce::cuda::kWarpSize;
      emu::launch(static_cast<unsigned int>((slots + kSlotsPerBlock - 1) / kSlotsPerBlock), kReduceThreads,
                  rows::combine_gate_reduce_kernel<float, float>, static_cast<const float*>(partial.data()),
                  grad_gates, slots, chunks);
    });
  });
}

}  // extern "C"
