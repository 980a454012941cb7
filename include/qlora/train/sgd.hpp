#pragma once
// SGD with momentum, torch.optim.SGD's update (g is the gradient times grad_scale):
//   g += wd * p                                   (weight decay coupled into the gradient, as PyTorch)
//   b = g at the first step, else b = mu b + (1 - dampening) g
//   g = g + mu b with nesterov, else g = b        (only when mu != 0)
//   p -= lr g
// Built from the elementwise ops (scale, axpy), so it runs on every backend and dtype the ops take; it is
// not on any hot path (the QLoRA recipes use AdamW).

#include <string>
#include <utility>
#include <vector>

#include "qlora/ops/elementwise.hpp"
#include "qlora/train/optimizer.hpp"

namespace qlora::train {

struct SgdOptions {
  double lr = 1e-2;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

class Sgd final : public Optimizer {
 public:
  explicit Sgd(std::span<Param* const> params, const SgdOptions& options = {})
      : Optimizer(params, options.lr, "sgd"), options_(options) {
    if (!(options.momentum >= 0) || !std::isfinite(options.momentum))
      throw Error("sgd: momentum " + std::to_string(options.momentum) + " is not >= 0");
    if (!std::isfinite(options.dampening))
      throw Error("sgd: dampening " + std::to_string(options.dampening) + " is not finite");
    if (!(options.weight_decay >= 0) || !std::isfinite(options.weight_decay))
      throw Error("sgd: weight decay " + std::to_string(options.weight_decay) + " is not >= 0");
    if (options.nesterov && (options.momentum <= 0 || options.dampening != 0))
      throw Error("sgd: nesterov momentum needs momentum > 0 and dampening 0 (momentum " +
                  std::to_string(options.momentum) + ", dampening " + std::to_string(options.dampening) + ")");
    if (options.momentum != 0) momentum_buffer_ = zeros_like_params();
  }

  const SgdOptions& options() const { return options_; }
  std::string name() const override { return "sgd"; }

  // "<param>.momentum_buffer" per parameter when momentum is on; nothing otherwise.
  std::vector<std::pair<std::string, Tensor>> state_tensors() const override {
    std::vector<std::pair<std::string, Tensor>> state;
    for (std::size_t i = 0; i < momentum_buffer_.size(); ++i)
      state.emplace_back(params_[i]->name + ".momentum_buffer", momentum_buffer_[i]);
    return state;
  }

  nlohmann::json scalar_state() const override {
    nlohmann::json j = Optimizer::scalar_state();
    j["momentum"] = options_.momentum;
    j["dampening"] = options_.dampening;
    j["weight_decay"] = options_.weight_decay;
    j["nesterov"] = options_.nesterov;
    return j;
  }

 private:
  void update(std::int64_t step, double grad_scale) override {
    const auto mu = float(options_.momentum);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Param& p = *params_[i];
      Tensor g = ops::scale(p.grad, float(grad_scale));  // a copy: the gradient itself stays untouched
      if (options_.weight_decay != 0) ops::axpy_(g, float(options_.weight_decay), p.value);
      if (options_.momentum != 0) {
        Tensor& buffer = momentum_buffer_[i];
        if (step == 1) {
          buffer.copy_from(g);  // PyTorch: buf = clone(g) at the first step, no dampening
        } else {
          ops::scale_(buffer, mu);
          ops::axpy_(buffer, float(1.0 - options_.dampening), g);
        }
        if (options_.nesterov) ops::axpy_(g, mu, buffer);
        else g = buffer;
      }
      ops::axpy_(p.value, float(-lr_), g);
    }
  }

  SgdOptions options_;
  std::vector<Tensor> momentum_buffer_;
};

}  // namespace qlora::train
