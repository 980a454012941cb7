#pragma once
// The AdamW step (Loshchilov & Hutter, decoupled weight decay) with torch.optim.AdamW's exact update, on
// f32 master weights and f32 state; and global gradient-norm clipping (torch.nn.utils.clip_grad_norm_).

#include <cmath>
#include <span>

#include "qlora/cpu/adamw.hpp"
#include "qlora/cuda/adamw.hpp"
#include "qlora/ops/dispatch.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/reduce.hpp"

namespace qlora::ops {

struct AdamWConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.01f;  // torch.optim.AdamW's default
};

// One step on one parameter; step counts from 1. grad_scale multiplies the gradient first (clipping).
inline void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWConfig& cfg,
                       std::int64_t step, float grad_scale = 1.f) {
  constexpr std::string_view op = "adamw_step";
  detail::check_same(op, {{&param, "param"}, {&grad, "grad"}, {&m, "m"}, {&v, "v"}});
  detail::check_shape(op, grad, param.shape(), "grad");
  detail::check_shape(op, m, param.shape(), "m");
  detail::check_shape(op, v, param.shape(), "v");
  if (step < 1) detail::fail(op, "step counts from 1, got " + std::to_string(step));
  detail::dispatch(op, param, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>) {
      cpu::adamw_step(param.data<T>(), grad.data<T>(), m.data<T>(), v.data<T>(), param.numel(), cfg.lr, cfg.beta1,
                      cfg.beta2, cfg.eps, cfg.weight_decay, step, grad_scale);
    } else if constexpr (std::is_same_v<T, float>) {
      cuda::adamw_step(param.data<float>(), grad.data<float>(), m.data<float>(), v.data<float>(), param.numel(), cfg.lr,
                       cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, step, grad_scale, cuda::current_stream());
    } else {
      detail::fail(op, "adapter master weights and optimizer state are f32 on CUDA, got " + param.str());
    }
  });
}

// sqrt of the sum of squares of every gradient.
inline double global_grad_norm(std::span<const Tensor> grads) { return std::sqrt(sum_squares(grads)); }

// Scales the gradients in place so their global norm is at most max_norm (coefficient
// max_norm / (norm + 1e-6), as PyTorch); returns the norm before clipping. A non-finite norm leaves the
// gradients untouched and is returned for the caller to act on.
inline double clip_grad_norm_(std::span<Tensor> grads, double max_norm) {
  const double norm = global_grad_norm(std::span<const Tensor>(grads.data(), grads.size()));
  if (!std::isfinite(norm)) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0)
    for (Tensor& g : grads) scale_(g, float(coef));
  return norm;
}

}  // namespace qlora::ops
