// CUDA kernel bodies of dispatch (rows gathered into expert order; schemas, semantics and the CPU
// kernels in csrc/dispatch.cpp), and the row layout combine.cuh shares.
//
// Layout: a [rows, ...] tensor is a [rows, F] matrix, F = the product of the other dimensions.
// Blocks run along a row (blockIdx.x: a slice of the row's vectors) and down the rows
// (blockIdx.y, striding by gridDim.y, so any row count fits the 65535 limit on gridDim.y); each
// thread moves VEC adjacent elements per access (128-bit accesses when the rows allow it).
//
// Indices are checked before use: a row whose index is out of range is written with all bits
// set (NaN for every float dtype) and nothing is read out of bounds.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "common.cuh"

namespace moce::cuda::rows {

// A word with every bit set: NaN read as any float type, -1 as any signed integer.
template <typename W>
__device__ __forceinline__ W all_ones() {
  W w;
  memset(&w, 0xff, sizeof(W));
  return w;
}

// out[i, :] = x[index[i], :], rows of row_words words of type W (a row's bytes, moved in the
// widest word that divides them and both base addresses).
template <typename W>
__global__ void dispatch_fwd_kernel(const W* __restrict__ x,            // [B, row_words]
                                    const int64_t* __restrict__ index,  // [S]
                                    W* __restrict__ out,                // [S, row_words]
                                    int64_t batch, int64_t slots, int64_t row_words) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < slots; i += gridDim.y) {
    const int64_t src = index[i];
    const bool ok = src >= 0 && src < batch;
    W* dst = out + i * row_words;
    for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < row_words; w += step) {
      dst[w] = ok ? x[src * row_words + w] : all_ones<W>();
    }
  }
}

// grad_x[b, :] = sum_{j < k} grad_out[inverse[b * k + j], :], in acc_t, in the order j = 0..k-1.
// VEC elements per thread: the caller guarantees F % VEC == 0 and 16-byte aligned bases when
// VEC > 1.
template <typename T, typename acc_t, int VEC>
__global__ void dispatch_bwd_kernel(const T* __restrict__ grad_out,       // [S, F]
                                    const int64_t* __restrict__ inverse,  // [S]
                                    T* __restrict__ grad_x,               // [B, F]
                                    int64_t batch, int64_t k, int64_t features) {
  const int64_t slots = batch * k;
  const int64_t packs = features / VEC;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += step) {
      acc_t acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
      bool ok = true;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = inverse[b * k + j];
        if (row < 0 || row >= slots) {
          ok = false;
          continue;
        }
        const Pack<T, VEC> g = load_pack<T, VEC>(grad_out + row * features + p * VEC);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += static_cast<acc_t>(g.val[v]);
      }
      Pack<T, VEC> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) out.val[v] = static_cast<T>(ok ? acc[v] : quiet_nan<acc_t>());
      store_pack<T, VEC>(grad_x + b * features + p * VEC, out);
    }
  }
}

// Host side (dispatch.cu and tests/csrc/cuda_emulation): calls launch(W{}) with W the widest of
// uint4 / uint2 / unsigned int / unsigned short / unsigned char whose size divides a row's
// bytes and both base addresses.
template <typename Launch>
void with_widest_word(int64_t row_bytes, const void* x, const void* out, const Launch& launch) {
  const auto fits = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && reinterpret_cast<std::uintptr_t>(x) % bytes == 0 &&
           reinterpret_cast<std::uintptr_t>(out) % bytes == 0;
  };
  if (fits(16)) {
    launch(uint4{});
  } else if (fits(8)) {
    launch(uint2{});
  } else if (fits(4)) {
    launch(static_cast<unsigned int>(0));
  } else if (fits(2)) {
    launch(static_cast<unsigned short>(0));
  } else {
    launch(static_cast<unsigned char>(0));
  }
}

}  // namespace moce::cuda::rows
