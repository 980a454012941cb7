// Adapter pooling (P_p, E_k^T) and repetition (E_k, P_p^T) along the last axis; CPU twin:
// include/qlora/cpu/pool_repeat.hpp. Both are memory-bound streams over the larger of the two matrices.
//   group_sum: one thread per output element, summing its group in index order (the twin's order, so f32
//              results match exactly). For the groups used by adapters (2..128) a warp reads 32 groups: the
//              loads are strided by the group, but every byte of each 32-byte sector is used by the warp.
//   repeat_add: one thread per element of the large matrix; h is re-read group times and stays in L1/L2.
// Not done yet: 16-byte vector loads.

#include "common.cuh"
#include "qlora/cuda/pool_repeat.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

template <class T>
__global__ void group_sum_kernel(const T* x, T* y, std::int64_t n_out, std::int64_t group, float alpha) {
  for (std::int64_t o = grid_index(); o < n_out; o += grid_stride()) {
    const T* xg = x + o * group;  // rows are contiguous and cols % group == 0: output o owns x[o*g, o*g+g)
    float sum = 0.f;
    for (std::int64_t t = 0; t < group; ++t) sum += to_f32(xg[t]);
    y[o] = from_f32<T>(sum * alpha);
  }
}

template <class T>
__global__ void repeat_add_kernel(const T* h, T* y, std::int64_t n, std::int64_t group, float alpha) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride())
    y[i] = from_f32<T>(to_f32(y[i]) + alpha * to_f32(h[i / group]));
}

}  // namespace

template <class T>
void group_sum(const T* x, T* y, std::int64_t rows, std::int64_t cols, std::int64_t group, float alpha,
               Stream stream) {
  const std::int64_t n_out = rows * (cols / group);
  if (n_out <= 0) return;
  group_sum_kernel<<<elementwise_grid(n_out), kElementwiseThreads, 0, stream>>>(dev(x), dev(y), n_out, group, alpha);
  check_launch("group_sum_kernel");
}

template <class T>
void repeat_add(const T* h, T* y, std::int64_t rows, std::int64_t cols, std::int64_t group, float alpha,
                Stream stream) {
  const std::int64_t n = rows * cols;
  if (n <= 0) return;
  repeat_add_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(h), dev(y), n, group, alpha);
  check_launch("repeat_add_kernel");
}

#define QLORA_INSTANTIATE(T)                                                                         \
  template void group_sum<T>(const T*, T*, std::int64_t, std::int64_t, std::int64_t, float, Stream); \
  template void repeat_add<T>(const T*, T*, std::int64_t, std::int64_t, std::int64_t, float, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)
#undef QLORA_INSTANTIATE

}  // namespace qlora::cuda
