#pragma once
// Optimizer: the interface the trainer and the checkpoint writer see. An optimizer updates a fixed list of
// trainable Params from their gradients; its state is a list of named tensors ("<param>.exp_avg", ...) plus a
// step counter and the learning rate, which is everything a checkpoint needs to resume bit for bit.
//
// step() is non-virtual: it checks the gradients, counts the step and calls the optimizer's update with the
// 1-based step number (the same count PyTorch keeps in state["step"]).

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/autograd/param.hpp"
#include "qlora/core/tensor.hpp"

namespace qlora::train {

using autograd::Param;

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One update of every parameter, with the gradient multiplied by grad_scale first (a clipping
  // coefficient folded into the update instead of a separate pass over the gradients). Every parameter
  // must have a gradient of its own shape, dtype and device; a missing one throws (never a silent skip).
  void step(double grad_scale = 1.0) {
    if (!std::isfinite(grad_scale))
      throw Error(name() + ": gradient scale " + std::to_string(grad_scale) + " is not finite");
    for (const Param* p : params_) {
      if (!p->grad.defined())
        throw Error(name() + ": parameter '" + p->name + "' has no gradient (run backward before step)");
      if (p->grad.shape() != p->value.shape() || p->grad.dtype() != p->value.dtype() ||
          p->grad.device() != p->value.device())
        throw Error(name() + ": gradient " + p->grad.str() + " of parameter '" + p->name + "' does not match its value " +
                    p->value.str());
    }
    update(step_count_ + 1, grad_scale);
    ++step_count_;
  }

  // Zeroes every gradient in place (the memory stays, as after PyTorch's zero_grad(set_to_none=False)).
  virtual void zero_grad() {
    for (Param* p : params_) p->zero_grad();
  }

  double lr() const { return lr_; }
  virtual void set_lr(double lr) {
    if (!std::isfinite(lr) || lr < 0) throw Error(name() + ": learning rate " + std::to_string(lr) + " is not >= 0");
    lr_ = lr;
  }

  // Updates taken so far (0 before the first step; the checkpoint's "step").
  std::int64_t step_count() const { return step_count_; }

  // The state tensors, named "<param name>.<state>", in a fixed order. They are the optimizer's own
  // tensors (not copies): a checkpoint writer reads them; load_state_tensors copies saved values into them.
  virtual std::vector<std::pair<std::string, Tensor>> state_tensors() const = 0;

  // The scalar state: {"optimizer": name, "step": step_count, "lr": lr, and the hyperparameters}.
  virtual nlohmann::json scalar_state() const {
    return {{"optimizer", name()}, {"step", step_count_}, {"lr", lr_}};
  }

  // Restores a checkpoint's state: tensors by name (every state tensor must be present once, with its
  // shape and dtype; values are copied to the optimizer's device) and the step count and lr of
  // scalar_state(). Anything missing, extra or mismatched throws, naming it.
  void load_state(const nlohmann::json& scalars, std::span<const std::pair<std::string, Tensor>> tensors) {
    if (!scalars.is_object() || !scalars.contains("optimizer") || !scalars.contains("step") || !scalars.contains("lr"))
      throw Error(name() + ": optimizer state " + scalars.dump() + " lacks optimizer, step or lr");
    if (scalars.at("optimizer") != name())
      throw Error("optimizer state of '" + scalars.at("optimizer").dump() + "' cannot be loaded into " + name());
    const auto step = scalars.at("step").get<std::int64_t>();
    if (step < 0) throw Error(name() + ": optimizer state has step " + std::to_string(step));
    const auto own = state_tensors();
    if (tensors.size() != own.size())
      throw Error(name() + ": optimizer state has " + std::to_string(tensors.size()) + " tensors, expected " +
                  std::to_string(own.size()));
    for (const auto& [key, target] : own) {
      const Tensor* found = nullptr;
      for (const auto& [saved_key, saved] : tensors)
        if (saved_key == key) {
          if (found) throw Error(name() + ": optimizer state tensor '" + key + "' appears twice");
          found = &saved;
        }
      if (!found) throw Error(name() + ": optimizer state lacks tensor '" + key + "'");
      if (found->shape() != target.shape() || found->dtype() != target.dtype())
        throw Error(name() + ": optimizer state tensor '" + key + "' is " + found->str() + ", expected " + target.str());
    }
    for (auto [key, target] : own)
      for (const auto& [saved_key, saved] : tensors)
        if (saved_key == key) target.copy_from(saved);
    set_lr(scalars.at("lr").get<double>());
    step_count_ = step;
  }

  const std::vector<Param*>& params() const { return params_; }
  virtual std::string name() const = 0;

 protected:
  // Keeps the trainable params (frozen ones are left out: they have no gradient and no state). All must be
  // defined and share one device (one fused launch); duplicates and an empty list are refused.
  Optimizer(std::span<Param* const> params, double lr, std::string_view optimizer_name) {
    const std::string who(optimizer_name);
    for (Param* p : params) {
      if (p == nullptr) throw Error(who + ": null parameter");
      if (!p->requires_grad) continue;
      if (!p->value.defined()) throw Error(who + ": parameter '" + p->name + "' has no value");
      for (const Param* q : params_)
        if (q == p) throw Error(who + ": parameter '" + p->name + "' is listed twice");
      if (!params_.empty() && p->value.device() != params_.front()->value.device())
        throw Error(who + ": parameter '" + p->name + "' is on " + p->value.device().str() + " but '" +
                    params_.front()->name + "' is on " + params_.front()->value.device().str());
      params_.push_back(p);
    }
    if (params_.empty()) throw Error(who + ": no trainable parameters");
    if (!std::isfinite(lr) || lr < 0) throw Error(who + ": learning rate " + std::to_string(lr) + " is not >= 0");
    lr_ = lr;
  }

  // Applies update number `step` (1-based) to every parameter.
  virtual void update(std::int64_t step, double grad_scale) = 0;

  // Zero state tensors shaped like every parameter (allocated up front, so a checkpoint can be loaded into
  // an optimizer that has not stepped yet).
  std::vector<Tensor> zeros_like_params() const {
    std::vector<Tensor> state;
    state.reserve(params_.size());
    for (const Param* p : params_) state.push_back(Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device()));
    return state;
  }

  std::vector<Param*> params_;
  double lr_ = 0;
  std::int64_t step_count_ = 0;
};

}  // namespace qlora::train
