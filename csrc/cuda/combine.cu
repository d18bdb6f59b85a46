// CUDA implementation of moce::combine_fwd / moce::combine_bwd (schemas and the CPU kernels in
// csrc/combine.cpp, kernel bodies in combine.cuh). No host synchronisation: the indices stay on
// the device and are bounds-checked there.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../check.h"
#include "../combine.h"
#include "combine.cuh"

namespace moce::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

dim3 row_grid(int64_t row_items, int64_t rows) {
  const int64_t x = std::max<int64_t>(1, std::min<int64_t>((row_items + kThreads - 1) / kThreads, 1 << 20));
  return dim3(static_cast<unsigned int>(x),
              static_cast<unsigned int>(std::clamp<int64_t>(rows, 1, kMaxGridY)));
}

int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

// Calls f(acc_t{}) with acc_t = double or float, as combine_acc_dtype says.
template <typename F>
void with_acc_type(at::ScalarType acc_dtype, F&& f) {
  if (acc_dtype == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// Calls f(std::integral_constant<int, V>{}): V = the 16-byte vector width of scalar_t when every
// row and base allows it, else 1.
template <typename scalar_t, typename F>
void with_vector_width(int64_t features, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int vec = 16 / static_cast<int>(sizeof(scalar_t));
  bool ok = features % vec == 0;
  for (const void* p : ptrs) ok = ok && aligned16(p);
  if (ok) {
    f(std::integral_constant<int, vec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

at::Tensor combine_fwd_cuda(const at::Tensor& y_in, const at::Tensor& gates_in, const at::Tensor& inverse_in,
                            const at::Tensor& sorted_slots) {
  combine_check_fwd(y_in, gates_in, inverse_in, sorted_slots, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous();
  const at::Tensor inverse = inverse_in.contiguous();
  const int64_t batch = gates_in.size(0), k = gates_in.size(1);
  std::vector<int64_t> shape(y.sizes().begin(), y.sizes().end());
  shape[0] = batch;
  at::Tensor out = at::empty(shape, y.options());
  if (out.numel() == 0) return out;
  const auto acc_dtype = combine_acc_dtype(y.scalar_type(), gates_in.scalar_type());
  const at::Tensor gates = gates_in.to(acc_dtype).contiguous();  // on the device: no sync
  const int64_t features = row_numel(y);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_fwd_cuda", [&] {
    with_acc_type(acc_dtype, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      with_vector_width<scalar_t>(features, {y.const_data_ptr(), out.const_data_ptr()}, [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        rows::combine_fwd_kernel<scalar_t, acc_t, V><<<row_grid(features / V, batch), kThreads, 0, stream>>>(
            y.const_data_ptr<scalar_t>(), gates.const_data_ptr<acc_t>(), inverse.const_data_ptr<int64_t>(),
            out.mutable_data_ptr<scalar_t>(), batch, k, features);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> combine_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& y_in,
                                                    const at::Tensor& gates_in, const at::Tensor& inverse_in,
                                                    const at::Tensor& sorted_slots_in) {
  combine_check_bwd(grad_out_in, y_in, gates_in, inverse_in, sorted_slots_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const at::Tensor inverse = inverse_in.contiguous();
  const at::Tensor sorted_slots = sorted_slots_in.contiguous();
  const int64_t k = gates_in.size(1), slots = y.size(0);
  at::Tensor grad_y = at::empty(y.sizes(), y.options());
  if (y.numel() == 0) return {grad_y, at::zeros(gates_in.sizes(), gates_in.options())};
  const auto acc_dtype = combine_acc_dtype(y.scalar_type(), gates_in.scalar_type());
  const at::Tensor gates = gates_in.to(acc_dtype).contiguous();
  at::Tensor grad_gates = at::empty({slots}, y.options().dtype(acc_dtype));
  const int64_t features = row_numel(y);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "combine_bwd_cuda", [&] {
    with_acc_type(acc_dtype, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      with_vector_width<scalar_t>(
          features, {grad_out.const_data_ptr(), y.const_data_ptr(), grad_y.const_data_ptr()},
          [&](auto vec_tag) {
            constexpr int V = decltype(vec_tag)::value;
            const int64_t packs = features / V;
            rows::combine_bwd_y_kernel<scalar_t, acc_t, V><<<row_grid(packs, slots), kThreads, 0, stream>>>(
                grad_out.const_data_ptr<scalar_t>(), gates.const_data_ptr<acc_t>(),
                sorted_slots.const_data_ptr<int64_t>(), grad_y.mutable_data_ptr<scalar_t>(), slots, k,
                features);
            C10_CUDA_KERNEL_LAUNCH_CHECK();

            const int64_t chunks = (packs + rows::kGateChunkPacks - 1) / rows::kGateChunkPacks;
            MOCE_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "moce::combine_bwd: rows too long");
            // [S, chunks] partial sums; every entry is written by the first kernel.
            at::Tensor partial = at::empty({slots, chunks}, y.options().dtype(acc_dtype));
            const dim3 grid(static_cast<unsigned int>(chunks),
                            static_cast<unsigned int>(std::min<int64_t>(slots, kMaxGridY)));
            rows::combine_gate_partial_kernel<scalar_t, acc_t, V><<<grid, rows::kGateThreads, 0, stream>>>(
                grad_out.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                inverse.const_data_ptr<int64_t>(), partial.mutable_data_ptr<acc_t>(), slots, k, features,
                chunks);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            constexpr int kReduceThreads = 128;  // 4 slots per block, one warp each
            constexpr int64_t kSlotsPerBlock = kReduceThreads / kWarpSize;
            const int64_t reduce_blocks = (slots + kSlotsPerBlock - 1) / kSlotsPerBlock;
            MOCE_CHECK(reduce_blocks <= std::numeric_limits<int32_t>::max(),
                       "moce::combine_bwd: too many slots");
            rows::combine_gate_reduce_kernel<acc_t, acc_t>
                <<<static_cast<unsigned int>(reduce_blocks), kReduceThreads, 0, stream>>>(
                    partial.const_data_ptr<acc_t>(), grad_gates.mutable_data_ptr<acc_t>(), slots, chunks);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
  return {grad_y, grad_gates.view(gates_in.sizes()).to(gates_in.scalar_type())};
}

}  // namespace

}  // namespace moce::cuda

TORCH_LIBRARY_IMPL(moce, CUDA, m) {
  m.impl("combine_fwd", &moce::cuda::combine_fwd_cuda);
  m.impl("combine_bwd", &moce::cuda::combine_bwd_cuda);
}
