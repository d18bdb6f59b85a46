// Just enough of CUDA to run a kernel body from csrc/cuda/*.cuh on the CPU (host compiler, no
// GPU): the execution-space keywords compile away, a launch runs the grid's blocks one after the
// other on blockDim.x std::threads, and the block-level primitives the kernels use
// behave as on a GPU:
//   __shared__        a function-level static: one copy, shared by the threads of the running
//                     block (blocks never run at the same time);
//   __syncthreads()   a barrier over the block's threads (a thread that has returned counts as
//                     arrived, as on sm_70 and newer);
//   __shfl_*_sync     an exchange through per-warp slots between two barriers of the warp.
// What it cannot show: timing, the memory model beyond barriers, alignment faults (x86 forgives
// an unaligned 16-byte access), register or shared-memory limits. tests/csrc/test_cuda_emulation.py
// says how it is used.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace emu {

constexpr int kWarp = 32;

struct Block {
  explicit Block(unsigned int threads) : all(threads) {
    for (unsigned int first = 0; first < threads; first += kWarp) {
      const unsigned int lanes = threads - first < kWarp ? threads - first : kWarp;
      warps.push_back(std::make_unique<std::barrier<>>(lanes));
    }
    slots.resize(threads);
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;  // one 8-byte exchange slot per thread
};

inline Block* current = nullptr;

// Runs kernel(args...) over `grid` blocks of `threads` threads: one pool of threads runs the
// blocks in turn, each block with fresh barriers (a thread done with a block drops out of them).
template <typename Kernel, typename... Args>
void launch(unsigned int grid, unsigned int threads, Kernel kernel, Args... args) {
  if (grid == 0) return;
  auto block = std::make_unique<Block>(threads);
  current = block.get();
  unsigned int next = 0;
  auto advance = [&]() noexcept {  // runs once, between one block and the next
    if (++next < grid) {
      block = std::make_unique<Block>(threads);
      current = block.get();
    }
  };
  std::barrier<decltype(advance)> step(threads, advance);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (unsigned int b = 0; b < grid; ++b) {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = threads;
        gridDim.x = grid;
        kernel(args...);
        current->warps[t / kWarp]->arrive_and_drop();
        current->all.arrive_and_drop();
        step.arrive_and_wait();
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
  current = nullptr;
}

template <typename T>
T exchange(T v, int source_lane_xor, int source_lane_down) {
  static_assert(sizeof(T) <= 8, "exchange slots hold 8 bytes");
  const unsigned int t = threadIdx.x;
  const unsigned int first = t - t % kWarp;
  const unsigned int lane = t % kWarp;
  std::barrier<>& warp = *current->warps[t / kWarp];
  std::memcpy(&current->slots[t], &v, sizeof(T));
  warp.arrive_and_wait();
  unsigned int src = source_lane_down >= 0 ? lane + source_lane_down : lane ^ source_lane_xor;
  if (src >= static_cast<unsigned int>(kWarp)) src = lane;  // __shfl_down past the warp: own value
  T out;
  std::memcpy(&out, &current->slots[first + src], sizeof(T));
  warp.arrive_and_wait();
  return out;
}

}  // namespace emu

inline void __syncthreads() { emu::current->all.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned int, T v, int lane_mask) {
  return emu::exchange(v, lane_mask, -1);
}

template <typename T>
T __shfl_down_sync(unsigned int, T v, unsigned int delta) {
  return emu::exchange(v, 0, static_cast<int>(delta));
}

template <typename W>
void __stwb(W* ptr, W value) {
  *ptr = value;
}

inline float normcdff(float a) { return 0.5f * std::erfc(-a * 0.70710678118654752f); }
inline double normcdf(double a) { return 0.5 * std::erfc(-a * 0.70710678118654752440); }
