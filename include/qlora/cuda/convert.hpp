#pragma once
// CUDA conversions and fills (kernel layer; CPU twin: qlora/cpu/convert.hpp).
// Src, Dst, T in {float, qlora::bf16, qlora::f16}. Rounding to bf16/f16 is round-to-nearest-even with NaN kept
// NaN, bit-identical to qlora::to_bf16 / qlora::to_f16 on the host. All pointers are device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// y[i] = Dst(x[i]) for i < n.
template <class Src, class Dst>
void convert(const Src* x, Dst* y, std::int64_t n, Stream stream);

// y[i] = T(value) for i < n.
template <class T>
void fill(T* y, std::int64_t n, float value, Stream stream);

}  // namespace qlora::cuda
