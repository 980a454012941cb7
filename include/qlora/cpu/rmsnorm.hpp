#pragma once
// CPU twin of cuda/rmsnorm.cu: RMSNorm (Zhang & Sennrich 2019) as in Llama, over the last axis, alone or
// fused with the residual add that precedes it in a decoder block.
//   rstd = 1 / sqrt(mean_j x_j^2 + eps),   y_j = x_j * rstd * w_j
//   add_rmsnorm:  h = x + residual,  y = rmsnorm(h)      (both h and y are outputs: h is the residual stream)
// The fused forms compute exactly what the unfused composition (add, then rmsnorm; rmsnorm_backward, then
// add the residual's gradient) computes, element for element: they call the same row functions.

#include <cmath>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

namespace detail {

// One row of the forward: y = x * rstd * w; returns rstd.
template <class T>
T rmsnorm_row(const T* x, const T* w, T* y, std::int64_t cols, float eps) {
  double sum_sq = 0;
  for (std::int64_t j = 0; j < cols; ++j) sum_sq += double(x[j]) * double(x[j]);
  const T s = T(1.0 / std::sqrt(sum_sq / double(cols) + double(eps)));
  for (std::int64_t j = 0; j < cols; ++j) y[j] = x[j] * s * w[j];
  return s;
}

// One row of the input gradient (see rmsnorm_backward): dx = rstd w dy - x rstd^3 / cols * sum_k w_k dy_k x_k.
template <class T>
void rmsnorm_row_backward(const T* x, const T* w, T s, const T* dy, T* dx, std::int64_t cols) {
  double dot = 0;  // sum_k w_k dy_k x_k
  for (std::int64_t j = 0; j < cols; ++j) dot += double(w[j]) * double(dy[j]) * double(x[j]);
  const T coef = T(dot) * s * s * s / T(cols);
  for (std::int64_t j = 0; j < cols; ++j) dx[j] = s * w[j] * dy[j] - x[j] * coef;
}

// dw_j += sum_r dy[r,j] x[r,j] rstd[r]. Column-wise so each thread owns its dw_j: no races, and a sum that
// does not depend on the thread count.
template <class T>
void rmsnorm_weight_grad(const T* x, const T* rstd, const T* dy, T* dw, std::int64_t rows, std::int64_t cols) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t j = 0; j < cols; ++j) {
    double sum = 0;
    for (std::int64_t r = 0; r < rows; ++r) sum += double(dy[r * cols + j]) * double(x[r * cols + j]) * double(rstd[r]);
    dw[j] += T(sum);
  }
}

}  // namespace detail

// x, y: (rows, cols); w: (cols); rstd: (rows), saved for the backward.
template <class T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, std::int64_t rows, std::int64_t cols, float eps) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) rstd[r] = detail::rmsnorm_row(x + r * cols, w, y + r * cols, cols, eps);
}

// With g_j = w_j dy_j and d rstd / d x_j = -rstd^3 x_j / cols:
//   dx_j = rstd g_j - x_j rstd^3 / cols * sum_k g_k x_k
//   dw_j += sum_r dy[r,j] x[r,j] rstd[r]       (accumulates; dw == nullptr skips it)
template <class T>
void rmsnorm_backward(const T* x, const T* w, const T* rstd, const T* dy, T* dx, T* dw, std::int64_t rows,
                      std::int64_t cols) {
  if (dw != nullptr) detail::rmsnorm_weight_grad(x, rstd, dy, dw, rows, cols);  // first, so that dx may alias dy
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r)
    detail::rmsnorm_row_backward(x + r * cols, w, rstd[r], dy + r * cols, dx + r * cols, cols);
}

// The residual add fused with the norm that follows it: sum = x + residual (rounded to T, as the unfused
// add stores it), y = rmsnorm(sum). sum may alias x or residual.
template <class T>
void add_rmsnorm_forward(const T* x, const T* residual, const T* w, T* sum, T* y, T* rstd, std::int64_t rows,
                         std::int64_t cols, float eps) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    T* sr = sum + r * cols;
    for (std::int64_t j = 0; j < cols; ++j) sr[j] = x[r * cols + j] + residual[r * cols + j];
    rstd[r] = detail::rmsnorm_row(sr, w, y + r * cols, cols, eps);
  }
}

// The gradient of add_rmsnorm's sum (hence of both x and residual): the norm's input gradient plus the
// gradient dsum that reaches the sum directly along the residual stream:
//   dx = rmsnorm_backward(sum, w, rstd, dy) + dsum;   dw += as in rmsnorm_backward (nullptr skips it).
// dx may alias dy, not dsum (the norm's gradient is written before dsum is read).
template <class T>
void add_rmsnorm_backward(const T* sum, const T* w, const T* rstd, const T* dy, const T* dsum, T* dx, T* dw,
                          std::int64_t rows, std::int64_t cols) {
  if (dw != nullptr) detail::rmsnorm_weight_grad(sum, rstd, dy, dw, rows, cols);
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    T* dxr = dx + r * cols;
    const T* dsr = dsum + r * cols;
    detail::rmsnorm_row_backward(sum + r * cols, w, rstd[r], dy + r * cols, dxr, cols);
    for (std::int64_t j = 0; j < cols; ++j) dxr[j] += dsr[j];
  }
}

}  // namespace qlora::cpu
