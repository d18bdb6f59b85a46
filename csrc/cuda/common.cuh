// Device helpers shared by the CUDA kernels (layernorm2d, grouped_dwconv, dispatch, combine,
// route): vector loads and stores of VEC adjacent elements, warp sums, the warp size.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace moce::cuda {

constexpr int kWarpSize = 32;

// VEC elements of T, moved as one access of sizeof(T) * VEC bytes (16: a 128-bit access).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

// The raw word a Pack travels as (uint4 / uint2 / unsigned int / unsigned short / unsigned
// char), so that a Pack is one vector instruction: a plain struct copy may be split into VEC
// scalar accesses.
template <int BYTES>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<1> {
  using type = unsigned char;
};

// ptr must be aligned to sizeof(T) * VEC bytes.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ ptr) {
  using W = typename Word<sizeof(Pack<T, VEC>)>::type;
  const W word = *reinterpret_cast<const W*>(ptr);
  Pack<T, VEC> pack;
  memcpy(&pack, &word, sizeof(pack));
  return pack;
}

// ptr must be aligned to sizeof(T) * VEC bytes.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ ptr, const Pack<T, VEC>& pack) {
  using W = typename Word<sizeof(Pack<T, VEC>)>::type;
  W word;
  memcpy(&word, &pack, sizeof(word));
  *reinterpret_cast<W*>(ptr) = word;
}

// store_pack through __stwb (st.global.wb, the default caching) rather than a plain store: nvcc
// splits a plain store of the word back into VEC scalar stores in some kernels (layernorm2d's).
// The inline asm behind __stwb is also a compiler memory barrier, so the kernels that vectorise
// fine with store_pack keep it.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack_wb(T* __restrict__ ptr, const Pack<T, VEC>& pack) {
  using W = typename Word<sizeof(Pack<T, VEC>)>::type;
  W word;
  memcpy(&word, &pack, sizeof(word));
  __stwb(reinterpret_cast<W*>(ptr), word);
}

// Sum over the 32 lanes of a warp (butterfly, a fixed order); the result is in every lane.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the 32 lanes of a warp (shift down, a fixed order); the result is valid in lane 0
// only, where it has the same bits as warp_sum's.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum_lane0(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

}  // namespace moce::cuda
