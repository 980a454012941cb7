#pragma once
// Param: a trainable (or frozen) tensor with its gradient. Backward steps add into grad; a frozen param
// (requires_grad = false, the quantized base) ignores them, so no gradient memory exists for it.

#include <string>

#include "qlora/core/tensor.hpp"
#include "qlora/ops/elementwise.hpp"

namespace qlora::autograd {

struct Param {
  std::string name;
  Tensor value;
  Tensor grad;  // undefined until the first accumulation
  bool requires_grad = true;

  Param() = default;
  Param(std::string name, Tensor value, bool requires_grad = true)
      : name(std::move(name)), value(std::move(value)), requires_grad(requires_grad) {}

  // grad += g (converted to grad's dtype when they differ, e.g. a bf16 activation gradient into f32).
  void accumulate_grad(const Tensor& g) {
    if (!requires_grad) return;
    if (g.shape() != value.shape())
      throw Error("gradient of shape " + g.shape().str() + " for parameter '" + name + "' of shape " + value.shape().str());
    if (!grad.defined()) grad = Tensor::zeros(value.shape(), g.dtype(), value.device());
    ops::axpy_(grad, 1.f, g.dtype() == grad.dtype() ? g : g.to(grad.dtype()));
  }

  void zero_grad() {
    if (grad.defined()) grad.zero_();
  }
};

}  // namespace qlora::autograd
