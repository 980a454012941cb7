// Philox random fills: one thread per element in a grid-stride loop; element i evaluates the counter-based
// stream at offset + i directly (include/qlora/core/philox.hpp), exactly as the CPU twin does.

#include "common.cuh"
#include "qlora/core/philox.hpp"
#include "qlora/cuda/random.hpp"

namespace qlora::cuda {
namespace {

__global__ void fill_uniform_kernel(float* y, std::int64_t n, std::uint64_t seed, std::uint64_t offset, float lo,
                                    float width) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    y[i] = qlora::detail::fma_rn(philox_uniform(seed, offset + std::uint64_t(i)), width, lo);
}

__global__ void fill_normal_kernel(float* y, std::int64_t n, std::uint64_t seed, std::uint64_t offset, float mean,
                                   float std) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    y[i] = qlora::detail::fma_rn(philox_normal(seed, offset + std::uint64_t(i)), std, mean);
}

unsigned grid_for(std::int64_t n, int threads) {
  return unsigned(std::min<std::int64_t>((n + threads - 1) / threads, 65535 * 4));
}

}  // namespace

void fill_uniform(float* y, std::int64_t n, std::uint64_t seed, std::uint64_t offset, float lo, float hi,
                  Stream stream) {
  if (n == 0) return;
  fill_uniform_kernel<<<grid_for(n, 256), 256, 0, stream>>>(y, n, seed, offset, lo, hi - lo);
  detail::check_launch("fill_uniform");
}

void fill_normal(float* y, std::int64_t n, std::uint64_t seed, std::uint64_t offset, float mean, float std,
                 Stream stream) {
  if (n == 0) return;
  fill_normal_kernel<<<grid_for(n, 256), 256, 0, stream>>>(y, n, seed, offset, mean, std);
  detail::check_launch("fill_normal");
}

}  // namespace qlora::cuda
