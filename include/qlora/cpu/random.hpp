#pragma once
// CPU twins of the random fills: element i is the Philox stream value at index offset + i
// (include/qlora/core/philox.hpp), so the same call on the GPU writes the same bits.

#include <cstdint>

#include "qlora/core/philox.hpp"
#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

inline void fill_uniform(float* y, std::int64_t n, std::uint64_t seed, std::uint64_t offset, float lo, float hi) {
  const float width = hi - lo;
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i)
    y[i] = qlora::detail::fma_rn(philox_uniform(seed, offset + std::uint64_t(i)), width, lo);
}

inline void fill_normal(float* y, std::int64_t n, std::uint64_t seed, std::uint64_t offset, float mean, float std) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i)
    y[i] = qlora::detail::fma_rn(philox_normal(seed, offset + std::uint64_t(i)), std, mean);
}

}  // namespace qlora::cpu
