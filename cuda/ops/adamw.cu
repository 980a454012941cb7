// One AdamW step with torch.optim.AdamW semantics (decoupled weight decay, bias-corrected moments), f32 state.
// Launch: grid-stride loop, 256 threads per block, one parameter per thread per iteration. The bias corrections
// and the decay factor 1 - lr*wd are formed once on the host in double, as PyTorch does in Python floats, and
// passed in as f32 factors.
// Not done yet: a multi-tensor (one launch for many parameter tensors) variant, bf16 parameters.

#include "common.cuh"
#include "qlora/cuda/adamw.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

__global__ void adamw_step_kernel(float* param, const float* grad, float* m, float* v, std::int64_t n, float beta1,
                                  float beta2, float eps, float decay, float step_size, float bias_correction2_sqrt,
                                  float grad_scale) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) {
    const float g = grad_scale * grad[i];
    float p = param[i] * decay;
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    p -= step_size * mi / (sqrtf(vi) / bias_correction2_sqrt + eps);
    param[i] = p;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

void adamw_step(float* param, const float* grad, float* m, float* v, std::int64_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, std::int64_t step, float grad_scale, Stream stream) {
  if (n <= 0) return;
  QLORA_CHECK(step >= 1, "adamw_step: step " + std::to_string(step) + " is not 1-based");
  const double bias_correction1 = 1.0 - std::pow(double(beta1), double(step));
  const double bias_correction2 = 1.0 - std::pow(double(beta2), double(step));
  const auto step_size = float(double(lr) / bias_correction1);
  const auto bias_correction2_sqrt = float(std::sqrt(bias_correction2));
  const auto decay = float(1.0 - double(lr) * double(weight_decay));  // p *= 1 - lr * wd
  adamw_step_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(
      param, grad, m, v, n, beta1, beta2, eps, decay, step_size, bias_correction2_sqrt, grad_scale);
  check_launch("adamw_step_kernel");
}

}  // namespace qlora::cuda
