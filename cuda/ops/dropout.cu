// Inverted dropout; CPU twin: include/qlora/cpu/dropout.hpp. The mask is philox_uniform(seed, offset + i),
// the same function the host evaluates, so both backends drop the same elements bit for bit.

#include "common.cuh"
#include "qlora/core/philox.hpp"
#include "qlora/cuda/dropout.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

template <class T>
__global__ void dropout_kernel(const T* x, T* y, std::int64_t n, float p, float keep_scale, std::uint64_t seed,
                               std::uint64_t offset) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) {
    const bool keep = philox_uniform(seed, offset + std::uint64_t(i)) >= p;
    y[i] = from_f32<T>(keep ? __fmul_rn(to_f32(x[i]), keep_scale) : 0.f);
  }
}

}  // namespace

template <class T>
void dropout(const T* x, T* y, std::int64_t n, float p, std::uint64_t seed, std::uint64_t offset, Stream stream) {
  if (n <= 0) return;
  const float keep_scale = 1.0f / (1.0f - p);
  dropout_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(x), dev(y), n, p, keep_scale, seed,
                                                                          offset);
  check_launch("dropout_kernel");
}

template void dropout<float>(const float*, float*, std::int64_t, float, std::uint64_t, std::uint64_t, Stream);
template void dropout<qlora::bf16>(const qlora::bf16*, qlora::bf16*, std::int64_t, float, std::uint64_t,
                                   std::uint64_t, Stream);

}  // namespace qlora::cuda
