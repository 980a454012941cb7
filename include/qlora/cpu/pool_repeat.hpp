#pragma once
// CPU twin of cuda/ops/pool_repeat.cu: the adapter's input pooling P_p and output repetition E_k
// (methods/qblora.md, "Generic operator") and their adjoints, along the last axis of a (rows, cols) matrix.
//
//   group_sum:  y[r, j] = alpha * sum_{t<g} x[r, j*g + t]      x: (rows, cols),   y: (rows, cols/g)
//   repeat_add: y[r, i] += alpha * h[r, i / g]                  h: (rows, cols/g), y: (rows, cols)
//
// P_p x = group_sum(x, p, 1/p)        E_k^T G = group_sum(G, k, 1)
// y += s E_k h = repeat_add(h, k, s)  dx += P_p^T du = repeat_add(du, p, 1/p)
// So two kernels serve both directions of both operators, and no expanded factor matrix ever exists.

#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

// alpha is a double so that the float64 reference path keeps 1/p exact to double precision.
// Sums in the accumulation type (double for T = double, float otherwise), in index order, then scales once:
// the CUDA twin does the same f32 sum in the same order, so f32 results agree exactly.
template <class T>
void group_sum(const T* x, T* y, std::int64_t rows, std::int64_t cols, std::int64_t group, double alpha) {
  const std::int64_t out_cols = cols / group;
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < out_cols; ++j) {
      const T* xg = x + r * cols + j * group;
      T sum = 0;
      for (std::int64_t t = 0; t < group; ++t) sum += xg[t];
      y[r * out_cols + j] = sum * T(alpha);
    }
  }
}

template <class T>
void repeat_add(const T* h, T* y, std::int64_t rows, std::int64_t cols, std::int64_t group, double alpha) {
  const std::int64_t in_cols = cols / group;
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t i = 0; i < cols; ++i) y[r * cols + i] += T(alpha) * h[r * in_cols + i / group];
}

}  // namespace qlora::cpu
