// Just enough of CUDA to run a kernel body from csrc/cuda/*.cuh on the CPU (host compiler, no
// GPU): the execution-space keywords compile away, a launch runs the grid's blocks one after the
// other on blockDim.x std::threads, and the block-level primitives the kernels use behave as on
// a GPU:
//   __shared__        a function-level static: one copy, shared by the threads of the running
//                     block (blocks never run at the same time); dynamic shared memory
//                     (extern __shared__) is declared by the translation unit that needs it;
//   __syncthreads()   a barrier over the block's threads;
//   __shfl_*_sync, __match_any_sync
//                     an exchange through per-warp slots between two barriers of the warp.
// It also reports what a GPU leaves undefined: a warp-wide primitive (full mask) while some lanes
// of the warp have returned, and a __syncthreads() some threads of the block have returned
// before (errors(), reset by take_errors()). What it cannot show: timing, the memory model beyond
// barriers, register or shared-memory limits. tests/csrc/test_cuda_emulation.py says how it is
// used.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#ifndef EMU_SHARED_IS_EXTERN
#define __shared__ static
#else
#define __shared__
#endif
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  unsigned int x, y, z;
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

inline std::mutex error_mutex;
inline std::string error_text;
inline std::atomic<int> error_count{0};

inline void report(const std::string& what) {
  const std::lock_guard<std::mutex> lock(error_mutex);
  if (error_count++ < 8) {
    error_text += what + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                  ", thread " + std::to_string(threadIdx.x) + ")\n";
  }
}

struct Block {
  explicit Block(unsigned int threads) : all(threads), exited(threads) {
    for (unsigned int first = 0; first < threads; first += kWarp) {
      const unsigned int lanes = threads - first < kWarp ? threads - first : kWarp;
      warps.push_back(std::make_unique<std::barrier<>>(lanes));
    }
    slots.resize(threads);
    for (auto& e : exited) e = false;
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;  // one 8-byte exchange slot per thread
  std::vector<std::atomic<bool>> exited;
  std::atomic<int> exited_count{0};
};

inline Block* current = nullptr;

// Runs kernel(args...) over grid.x * grid.y blocks of block.x threads: one pool of threads runs
// the blocks in turn, each block with fresh barriers (a thread done with a block drops out).
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block_dim, Kernel kernel, Args... args) {
  const unsigned int threads = block_dim.x;
  const unsigned long blocks = static_cast<unsigned long>(grid.x) * grid.y;
  if (blocks == 0 || block_dim.y != 1 || block_dim.z != 1 || grid.z != 1) return;
  auto block = std::make_unique<Block>(threads);
  current = block.get();
  unsigned long next = 0;
  auto advance = [&]() noexcept {  // runs once, between one block and the next
    if (++next < blocks) {
      block = std::make_unique<Block>(threads);
      current = block.get();
    }
  };
  std::barrier<decltype(advance)> step(threads, advance);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (unsigned long b = 0; b < blocks; ++b) {
        threadIdx = dim3(t);
        blockIdx = dim3(static_cast<unsigned int>(b % grid.x), static_cast<unsigned int>(b / grid.x));
        blockDim = block_dim;
        gridDim = grid;
        kernel(args...);
        current->exited[t] = true;
        ++current->exited_count;
        current->warps[t / kWarp]->arrive_and_drop();
        current->all.arrive_and_drop();
        step.arrive_and_wait();
      }
    });
  }
  for (std::thread& thread : pool) thread.join();
  current = nullptr;
}

template <typename Kernel, typename... Args>
void launch(unsigned int grid, unsigned int threads, Kernel kernel, Args... args) {
  launch(dim3(grid), dim3(threads), kernel, args...);
}

// The first lane of this thread's warp and the warp's lane count.
inline unsigned int warp_first() { return threadIdx.x - threadIdx.x % kWarp; }

inline void check_warp_complete(const char* primitive) {
  const unsigned int first = warp_first();
  const unsigned int end = first + kWarp < blockDim.x ? first + kWarp : blockDim.x;
  for (unsigned int lane = first; lane < end; ++lane) {
    if (current->exited[lane]) {
      report(std::string(primitive) + " with a full mask after lane " + std::to_string(lane % kWarp) +
             " of the warp returned");
      return;
    }
  }
}

// Every lane's value, read after all live lanes wrote theirs: fn(values of the warp's lanes).
template <typename T, typename Fn>
auto warp_exchange(T v, const char* primitive, Fn fn) {
  static_assert(sizeof(T) <= 8, "exchange slots hold 8 bytes");
  const unsigned int t = threadIdx.x;
  std::barrier<>& warp = *current->warps[t / kWarp];
  uint64_t word = 0;
  std::memcpy(&word, &v, sizeof(T));
  current->slots[t] = word;
  warp.arrive_and_wait();
  check_warp_complete(primitive);
  const auto out = fn(&current->slots[warp_first()]);
  warp.arrive_and_wait();
  return out;
}

template <typename T>
T slot_value(const uint64_t* lanes, unsigned int lane) {
  T out;
  std::memcpy(&out, &lanes[lane], sizeof(T));
  return out;
}

}  // namespace emu

inline void __syncthreads() {
  if (emu::current->exited_count > 0) emu::report("__syncthreads() after some threads of the block returned");
  emu::current->all.arrive_and_wait();
}

template <typename T>
T __shfl_xor_sync(unsigned int, T v, int lane_mask) {
  const unsigned int lane = threadIdx.x % emu::kWarp;
  return emu::warp_exchange(v, "__shfl_xor_sync",
                            [&](const uint64_t* lanes) { return emu::slot_value<T>(lanes, lane ^ lane_mask); });
}

template <typename T>
T __shfl_down_sync(unsigned int, T v, unsigned int delta) {
  const unsigned int lane = threadIdx.x % emu::kWarp;
  return emu::warp_exchange(v, "__shfl_down_sync", [&](const uint64_t* lanes) {
    return emu::slot_value<T>(lanes, lane + delta < emu::kWarp ? lane + delta : lane);  // past the warp: own
  });
}

template <typename T>
unsigned int __match_any_sync(unsigned int, T v) {
  return emu::warp_exchange(v, "__match_any_sync", [&](const uint64_t* lanes) {
    unsigned int mask = 0;
    for (int lane = 0; lane < emu::kWarp; ++lane) {
      if (emu::slot_value<T>(lanes, lane) == v) mask |= 1u << lane;
    }
    return mask;
  });
}

inline int __popc(unsigned int v) { return __builtin_popcount(v); }

template <typename W>
void __stwb(W* ptr, W value) {
  *ptr = value;
}

inline float normcdff(float a) { return 0.5f * std::erfc(-a * 0.70710678118654752f); }
inline double normcdf(double a) { return 0.5 * std::erfc(-a * 0.70710678118654752440); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

namespace emu {

// Errors reported since the last call (one line each, the first 8), and clears them.
inline std::string take_errors() {
  const std::lock_guard<std::mutex> lock(error_mutex);
  std::string out = error_count > 0 ? std::to_string(error_count.load()) + " error(s):\n" + error_text : "";
  error_count = 0;
  error_text.clear();
  return out;
}

}  // namespace emu
