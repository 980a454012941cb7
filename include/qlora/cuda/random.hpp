#pragma once
// Random fills on the device; twins of include/qlora/cpu/random.hpp, bit-identical to them.

#include <cstdint>

#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

void fill_uniform(float* y, std::int64_t n, std::uint64_t seed, std::uint64_t offset, float lo, float hi, Stream stream);
void fill_normal(float* y, std::int64_t n, std::uint64_t seed, std::uint64_t offset, float mean, float std,
                 Stream stream);

}  // namespace qlora::cuda
