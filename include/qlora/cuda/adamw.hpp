#pragma once
// CUDA AdamW step with torch.optim.AdamW semantics, f32 parameters and state (kernel layer; CPU twin:
// qlora/cpu/adamw.hpp). Device pointers.

#include <cstdint>

#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// g = grad_scale * grad;  p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
// p -= (lr / (1 - b1^step)) * m / (sqrt(v) / sqrt(1 - b2^step) + eps).   step is 1-based.
void adamw_step(float* param, const float* grad, float* m, float* v, std::int64_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, std::int64_t step, float grad_scale, Stream stream);

}  // namespace qlora::cuda
