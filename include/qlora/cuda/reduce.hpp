#pragma once
// CUDA reductions over the last axis of a contiguous (rows, cols) array (kernel layer; CPU twin:
// qlora/cpu/reduce.hpp). T in {float, qlora::bf16}; f32 accumulation; results are f32 (float*).
// All pointers are device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

template <class T>
void row_sum(const T* x, float* y, std::int64_t rows, std::int64_t cols, Stream stream);  // y[r] = sum_j x[r,j]
template <class T>
void row_max(const T* x, float* y, std::int64_t rows, std::int64_t cols, Stream stream);  // y[r] = max_j x[r,j]
template <class T>
void row_mean(const T* x, float* y, std::int64_t rows, std::int64_t cols, Stream stream);  // y[r] = sum / cols

// *acc += sum_i x[i]^2 (ACCUMULATES; used for gradient norms). Atomic across blocks: the order of the f32
// additions, hence the last bits, may differ from run to run.
template <class T>
void sum_squares(const T* x, std::int64_t n, float* acc, Stream stream);

}  // namespace qlora::cuda
