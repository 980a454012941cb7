#pragma once
// CPU twin of cuda/rmsnorm.cu: RMSNorm (Zhang & Sennrich 2019) as in Llama, over the last axis.
//   rstd = 1 / sqrt(mean_j x_j^2 + eps),   y_j = x_j * rstd * w_j

#include <cmath>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

// x, y: (rows, cols); w: (cols); rstd: (rows), saved for the backward.
template <class T>
void rmsnorm_forward(const T* x, const T* w, T* y, T* rstd, std::int64_t rows, std::int64_t cols, float eps) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    double sum_sq = 0;
    for (std::int64_t j = 0; j < cols; ++j) sum_sq += double(xr[j]) * double(xr[j]);
    const T s = T(1.0 / std::sqrt(sum_sq / double(cols) + double(eps)));
    for (std::int64_t j = 0; j < cols; ++j) yr[j] = xr[j] * s * w[j];
    rstd[r] = s;
  }
}

// With g_j = w_j dy_j and d rstd / d x_j = -rstd^3 x_j / cols:
//   dx_j = rstd g_j - x_j rstd^3 / cols * sum_k g_k x_k
//   dw_j += sum_r dy[r,j] x[r,j] rstd[r]       (accumulates; dw == nullptr skips it)
template <class T>
void rmsnorm_backward(const T* x, const T* w, const T* rstd, const T* dy, T* dx, T* dw, std::int64_t rows,
                      std::int64_t cols) {
  // dw first, so that dx may alias dy. Column-wise so each thread owns its dw_j: no races, and a
  // sum that does not depend on the thread count.
  if (dw != nullptr) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
    for (std::int64_t j = 0; j < cols; ++j) {
      double sum = 0;
      for (std::int64_t r = 0; r < rows; ++r) {
        sum += double(dy[r * cols + j]) * double(x[r * cols + j]) * double(rstd[r]);
      }
      dw[j] += T(sum);
    }
  }
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    const T s = rstd[r];
    double dot = 0;  // sum_k w_k dy_k x_k
    for (std::int64_t j = 0; j < cols; ++j) dot += double(w[j]) * double(dyr[j]) * double(xr[j]);
    const T coef = T(dot) * s * s * s / T(cols);
    for (std::int64_t j = 0; j < cols; ++j) dxr[j] = s * w[j] * dyr[j] - xr[j] * coef;
  }
}

}  // namespace qlora::cpu
