#pragma once
// Global gradient-norm clipping over all trainable parameters (torch.nn.utils.clip_grad_norm_ with the L2
// norm; QLoRA's max_grad_norm is 0.3, baselines.md section 2), and the finiteness check a trainer uses to skip
// a step.
//
// Non-finite gradients: clipping does not throw and does not skip. It returns the pre-clip norm (NaN or
// inf) and leaves the gradients untouched; the trainer decides (skip the step, stop with an error). A
// finite norm implies every gradient element is finite; all_finite() answers exactly even when the f32
// sum of squares overflows.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "qlora/autograd/param.hpp"
#include "qlora/ops/adamw.hpp"  // ops::global_grad_norm, ops::clip_grad_norm_ over tensors
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/reduce.hpp"

namespace qlora::train {

using autograd::Param;

// The default of QLoRA's recipes (HF max_grad_norm).
inline constexpr double kQloraMaxGradNorm = 0.3;

namespace detail {
inline std::vector<Tensor> defined_grads(std::span<Param* const> params) {
  std::vector<Tensor> grads;
  for (const Param* p : params)
    if (p->requires_grad && p->grad.defined()) grads.push_back(p->grad);
  return grads;
}
}  // namespace detail

// sqrt of the sum of squares of every defined gradient (parameters without a gradient count as zero).
inline double global_grad_norm(std::span<Param* const> params) {
  const std::vector<Tensor> grads = detail::defined_grads(params);
  return ops::global_grad_norm(grads);
}

// The factor clip_grad_norm_ multiplies the gradients by: max_norm / (norm + 1e-6), capped at 1 (PyTorch's
// clip_coef_clamped; the same expression as ops::clip_grad_norm_). Optimizer::step(grad_scale) takes it, to
// fold clipping into the update instead of a separate pass over the gradients.
inline double clip_coefficient(double norm, double max_norm) {
  if (!std::isfinite(norm)) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

// Scales the gradients in place so that their global norm is max_norm when it was larger; returns the norm
// before clipping. A non-finite norm leaves the gradients as they are (see above).
inline double clip_grad_norm_(std::span<Param* const> params, double max_norm = kQloraMaxGradNorm) {
  if (!(max_norm > 0) || !std::isfinite(max_norm))
    throw Error("clip_grad_norm_: max_norm " + std::to_string(max_norm) + " is not a positive number");
  std::vector<Tensor> grads = detail::defined_grads(params);  // handles: scaling them scales the params' grads
  return ops::clip_grad_norm_(grads, max_norm);
}

// True when every element of every defined gradient is finite.
inline bool all_finite(std::span<Param* const> params) {
  for (const Param* p : params) {
    if (!p->requires_grad || !p->grad.defined()) continue;
    const Tensor& g = p->grad;
    if (g.device().is_cpu()) {
      const auto finite = [&](auto* data) {
        for (std::int64_t i = 0; i < g.numel(); ++i)
          if (!std::isfinite(data[i])) return false;
        return true;
      };
      if (g.dtype() == DType::f64 ? !finite(g.data<double>()) : !finite(g.data<float>())) return false;
    } else {
      // 0 * x is 0 for finite x and NaN for inf or NaN, so the sum of squares of 0 * g is 0 or NaN: exact
      // where the sum of squares of g itself could overflow to inf.
      const Tensor zeroed = ops::scale(g, 0.f);
      if (std::isnan(ops::sum_squares(std::span<const Tensor>(&zeroed, 1)))) return false;
    }
  }
  return true;
}

}  // namespace qlora::train
