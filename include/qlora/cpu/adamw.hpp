#pragma once
// CPU twin of cuda/adamw.cu: one AdamW step (Loshchilov & Hutter 2019) with torch.optim.AdamW's exact
// semantics (decoupled weight decay applied before the moments; eps added after the bias-corrected sqrt):
//   g = grad_scale * grad
//   p *= 1 - lr * wd
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   p -= (lr / (1 - b1^step)) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)
// step is 1-based; grad_scale folds gradient clipping (or loss-scale removal) into the update.

#include <cmath>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

template <class T>
void adamw_step(T* param, const T* grad, T* m, T* v, std::int64_t n, float lr, float beta1, float beta2, float eps,
                float weight_decay, std::int64_t step, float grad_scale) {
  // Per-step scalars in double, as PyTorch computes them in Python floats.
  const double bias_correction1 = 1.0 - std::pow(double(beta1), double(step));
  const double bias_correction2 = 1.0 - std::pow(double(beta2), double(step));
  const T step_size = T(double(lr) / bias_correction1);
  const T bias_correction2_sqrt = T(std::sqrt(bias_correction2));
  const T decay = T(1.0 - double(lr) * double(weight_decay));
  const T b1 = T(beta1), b2 = T(beta2);
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) {
    const T g = T(grad_scale) * grad[i];
    m[i] = b1 * m[i] + (T(1) - b1) * g;
    v[i] = b2 * v[i] + (T(1) - b2) * g * g;
    const T denom = std::sqrt(v[i]) / bias_correction2_sqrt + T(eps);
    param[i] = param[i] * decay - step_size * m[i] / denom;
  }
}

}  // namespace qlora::cpu
