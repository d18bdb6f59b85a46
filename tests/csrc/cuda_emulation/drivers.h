// What the drivers (*_kernels.cpp) share: the dtype switch of their C interface (0 = float32,
// 1 = bfloat16), the vector-width switch and the alignment test the .cu launchers use.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

namespace emu {

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls body(T{}) with T the dtype the code names.
template <typename Body>
void with_dtype(int dtype, const Body& body) {
  if (dtype == 0) {
    body(float{});
  } else {
    body(c10::BFloat16{});
  }
}

// Calls launch(std::integral_constant<int, V>) with V = 16 / sizeof(T) (16-byte packs) when
// `vec`, else 1.
template <typename T, typename Launch>
void with_vector_width(bool vec, const Launch& launch) {
  if (vec) {
    launch(std::integral_constant<int, 16 / static_cast<int>(sizeof(T))>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

}  // namespace emu
