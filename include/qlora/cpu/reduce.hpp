#pragma once
// CPU twin of cuda/reduce.cu: reductions over the last axis of a row-major (rows, cols) array.
// Sums accumulate in double: this is the reference the f32 GPU reductions are measured against.

#include <algorithm>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

template <class T>
void row_sum(const T* x, T* y, std::int64_t rows, std::int64_t cols) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    double sum = 0;
    for (std::int64_t j = 0; j < cols; ++j) sum += xr[j];
    y[r] = T(sum);
  }
}

template <class T>
void row_max(const T* x, T* y, std::int64_t rows, std::int64_t cols) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T best = xr[0];
    for (std::int64_t j = 1; j < cols; ++j) best = std::max(best, xr[j]);
    y[r] = best;
  }
}

template <class T>
void row_mean(const T* x, T* y, std::int64_t rows, std::int64_t cols) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    double sum = 0;
    for (std::int64_t j = 0; j < cols; ++j) sum += xr[j];
    y[r] = T(sum / double(cols));
  }
}

// *acc += sum_i x_i^2 (accumulates: the squared gradient norm is summed over many tensors).
// Sequential so the result does not depend on the thread count.
template <class T>
void sum_squares(const T* x, std::int64_t n, T* acc) {
  double sum = 0;
  for (std::int64_t i = 0; i < n; ++i) sum += double(x[i]) * double(x[i]);
  *acc += T(sum);
}

}  // namespace qlora::cpu
