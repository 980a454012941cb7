#pragma once
// CUDA inverted dropout with a Philox mask (kernel layer; CPU twin and definition: qlora/cpu/dropout.hpp).
// T in {float, qlora::bf16}. y may alias x. Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

template <class T>
void dropout(const T* x, T* y, std::int64_t n, float p, std::uint64_t seed, std::uint64_t offset, Stream stream);

}  // namespace qlora::cuda
