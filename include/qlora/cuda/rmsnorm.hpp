#pragma once
// CUDA RMSNorm over the last axis, alone or fused with the residual add before it (kernel layer; CPU twin:
// qlora/cpu/rmsnorm.hpp).
// x, y, dy, dx: (rows, cols); w: (cols); T in {float, qlora::bf16}; rstd and dw are f32. Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// rstd[r] = 1 / sqrt(mean_j x[r,j]^2 + eps);  y = x * rstd * w
template <class T>
void rmsnorm_forward(const T* x, const T* w, T* y, float* rstd, std::int64_t rows, std::int64_t cols, float eps,
                     Stream stream);

// dx = rstd * (w * dy) - x * rstd^3 / cols * sum_j (w_j dy_j x_j)      (dx OVERWRITTEN; may alias dy or x)
// dw[j] += sum_r dy[r,j] * x[r,j] * rstd[r]                            (ACCUMULATES; dw == nullptr skips it)
template <class T>
void rmsnorm_backward(const T* x, const T* w, const float* rstd, const T* dy, T* dx, float* dw, std::int64_t rows,
                      std::int64_t cols, Stream stream);

// sum = x + residual (rounded to T; may alias x or residual);  rstd, y = rmsnorm(sum) as above.
template <class T>
void add_rmsnorm_forward(const T* x, const T* residual, const T* w, T* sum, T* y, float* rstd, std::int64_t rows,
                         std::int64_t cols, float eps, Stream stream);

// dx = rmsnorm_backward's dx (rounded to T) + dsum: the gradient of add_rmsnorm's sum, hence of x and of
// residual (dx OVERWRITTEN; may alias dy, not dsum); dw ACCUMULATES as in rmsnorm_backward.
template <class T>
void add_rmsnorm_backward(const T* sum, const T* w, const float* rstd, const T* dy, const T* dsum, T* dx, float* dw,
                          std::int64_t rows, std::int64_t cols, Stream stream);

}  // namespace qlora::cuda
