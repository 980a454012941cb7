#pragma once
// CUDA adapter pooling / repetition (kernel layer; CPU twin and the maths: qlora/cpu/pool_repeat.hpp).
// T in {float, qlora::bf16}; sums and products in f32. cols must be a multiple of group. Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// y[r, j] = alpha * sum_{t<group} x[r, j*group + t]            (y OVERWRITTEN, (rows, cols/group))
template <class T>
void group_sum(const T* x, T* y, std::int64_t rows, std::int64_t cols, std::int64_t group, float alpha,
               Stream stream);

// y[r, i] += alpha * h[r, i / group]                            (y ACCUMULATES, (rows, cols))
template <class T>
void repeat_add(const T* h, T* y, std::int64_t rows, std::int64_t cols, std::int64_t group, float alpha,
                Stream stream);

}  // namespace qlora::cuda
