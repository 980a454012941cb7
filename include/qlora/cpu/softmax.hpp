#pragma once
// CPU twin of cuda/softmax.cu: softmax over the last axis of a row-major (rows, cols) array.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

// y_j = exp(x_j - max) / sum_k exp(x_k - max): subtracting the row max leaves the result unchanged
// and keeps every exponent <= 0, so nothing overflows. y may alias x.
template <class T>
void softmax_forward(const T* x, T* y, std::int64_t rows, std::int64_t cols) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    T max = xr[0];
    for (std::int64_t j = 1; j < cols; ++j) max = std::max(max, xr[j]);
    double sum = 0;
    for (std::int64_t j = 0; j < cols; ++j) {
      yr[j] = std::exp(xr[j] - max);
      sum += yr[j];
    }
    const T inv_sum = T(1.0 / sum);
    for (std::int64_t j = 0; j < cols; ++j) yr[j] *= inv_sum;
  }
}

// The softmax Jacobian is diag(y) - y y^T, so dx = y * (dy - sum_j dy_j y_j). dx may alias dy.
template <class T>
void softmax_backward(const T* y, const T* dy, T* dx, std::int64_t rows, std::int64_t cols) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* yr = y + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    double dot = 0;
    for (std::int64_t j = 0; j < cols; ++j) dot += double(dyr[j]) * double(yr[j]);
    for (std::int64_t j = 0; j < cols; ++j) dxr[j] = yr[j] * (dyr[j] - T(dot));
  }
}

}  // namespace qlora::cpu
