#pragma once
// CUDA softmax over the last axis of a contiguous (rows, cols) array, numerically stable (kernel layer;
// CPU twin: qlora/cpu/softmax.hpp). T in {float, qlora::bf16}; f32 arithmetic. Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// y[r,j] = exp(x[r,j] - max_r) / sum_k exp(x[r,k] - max_r)
template <class T>
void softmax_forward(const T* x, T* y, std::int64_t rows, std::int64_t cols, Stream stream);

// dx = y * (dy - sum_j dy_j y_j)   (dx may alias dy)
template <class T>
void softmax_backward(const T* y, const T* dy, T* dx, std::int64_t rows, std::int64_t cols, Stream stream);

}  // namespace qlora::cuda
