#pragma once
// CPU twin of cuda/ops/dropout.cu: inverted dropout with a counter-based mask, so the backward regenerates
// the mask from (seed, offset) instead of storing it, and CPU and GPU drop the same elements.
//   keep_i = philox_uniform(seed, offset + i) >= p;   y_i = keep_i ? x_i * (1 / (1 - p)) : 0
// The backward is the same function applied to dy with the same seed and offset.

#include <cstdint>

#include "qlora/core/philox.hpp"
#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

template <class T>
void dropout(const T* x, T* y, std::int64_t n, float p, std::uint64_t seed, std::uint64_t offset) {
  const T keep_scale = T(1.0f / (1.0f - p));  // rounded to f32 first, as on the device
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i)
    y[i] = philox_uniform(seed, offset + std::uint64_t(i)) >= p ? x[i] * keep_scale : T(0);
}

}  // namespace qlora::cpu
