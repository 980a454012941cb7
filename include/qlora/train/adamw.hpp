#pragma once
// AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's update: decoupled weight decay p -= lr*wd*p,
// then Adam with bias correction (formula: qlora/cpu/multi_tensor_adamw.hpp). f32 master weights and f32
// state on CUDA, where every step is ONE kernel launch over all parameters (cuda/train/multi_tensor_adamw.cu);
// on the CPU the same chunk table is walked by the CPU twin, in f32 or f64.
//
// Defaults are PyTorch's except weight decay: 0, QLoRA's setting for adapters (baselines.md section 2,
// qblora.md "paged AdamW 32-bit, weight decay 0").

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "qlora/cpu/multi_tensor_adamw.hpp"
#include "qlora/cuda/multi_tensor_adamw.hpp"
#include "qlora/cuda/runtime.hpp"
#include "qlora/train/optimizer.hpp"

namespace qlora::train {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

class AdamW final : public Optimizer {
 public:
  explicit AdamW(std::span<Param* const> params, const AdamWOptions& options = {})
      : Optimizer(params, options.lr, "adamw"), options_(options) {
    const auto in_unit = [](double b) { return b >= 0 && b < 1; };
    if (!in_unit(options.beta1) || !in_unit(options.beta2))
      throw Error("adamw: betas (" + std::to_string(options.beta1) + ", " + std::to_string(options.beta2) +
                  ") must lie in [0, 1)");
    if (!(options.eps >= 0) || !std::isfinite(options.eps))
      throw Error("adamw: eps " + std::to_string(options.eps) + " is not >= 0");
    if (!(options.weight_decay >= 0) || !std::isfinite(options.weight_decay))
      throw Error("adamw: weight decay " + std::to_string(options.weight_decay) + " is not >= 0");
    const Tensor& first = params_.front()->value;
    for (const Param* p : params_) {
      if (p->value.dtype() != first.dtype())
        throw Error("adamw: parameter '" + p->name + "' is " + p->value.str() + " but '" + params_.front()->name +
                    "' is " + first.str() + " (one dtype for all parameters)");
    }
    const bool supported = first.device().is_cpu() ? (first.dtype() == DType::f32 || first.dtype() == DType::f64)
                                                    : first.dtype() == DType::f32;
    if (!supported)
      throw Error("adamw: parameters are " + first.str() + "; master weights and state are f32 (or f64 on the CPU)");
    exp_avg_ = zeros_like_params();
    exp_avg_sq_ = zeros_like_params();
    std::vector<std::int64_t> numels;
    for (const Param* p : params_) numels.push_back(p->value.numel());
    chunks_ = cpu::make_tensor_chunks(numels);
  }

  const AdamWOptions& options() const { return options_; }
  std::string name() const override { return "adamw"; }

  std::vector<std::pair<std::string, Tensor>> state_tensors() const override {
    std::vector<std::pair<std::string, Tensor>> state;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      state.emplace_back(params_[i]->name + ".exp_avg", exp_avg_[i]);
      state.emplace_back(params_[i]->name + ".exp_avg_sq", exp_avg_sq_[i]);
    }
    return state;
  }

  nlohmann::json scalar_state() const override {
    nlohmann::json j = Optimizer::scalar_state();
    j["betas"] = {options_.beta1, options_.beta2};
    j["eps"] = options_.eps;
    j["weight_decay"] = options_.weight_decay;
    return j;
  }

 private:
  void update(std::int64_t step, double grad_scale) override {
    const Tensor& first = params_.front()->value;
    if (first.device().is_cpu()) {
      if (first.dtype() == DType::f64) update_cpu<double>(step, grad_scale);
      else update_cpu<float>(step, grad_scale);
      return;
    }
#if defined(QLORA_WITH_CUDA)
    cuda::set_device(first.device().index);
    upload_table_if_changed();
    const auto* base = static_cast<const std::uint8_t*>(device_table_.data());
    cuda::multi_tensor_adamw(reinterpret_cast<const cpu::AdamWTensor<float>*>(base),
                             reinterpret_cast<const cpu::TensorChunk*>(base + tensors_bytes()),
                             std::int64_t(chunks_.size()), factors<float>(step, grad_scale), cuda::current_stream());
#else
    throw Error("adamw: parameters on " + first.device().str() + " but qlora was built without CUDA");
#endif
  }

  template <class T>
  cpu::AdamWFactors<T> factors(std::int64_t step, double grad_scale) const {
    return cpu::adamw_factors<T>(lr_, options_.beta1, options_.beta2, options_.eps, options_.weight_decay, step,
                                 grad_scale);
  }

  // The table of the parameters' current pointers (a Param's tensors may be replaced between steps).
  template <class T>
  std::vector<cpu::AdamWTensor<T>> table() const {
    std::vector<cpu::AdamWTensor<T>> tensors;
    for (std::size_t i = 0; i < params_.size(); ++i)
      tensors.push_back({params_[i]->value.template data<T>(), params_[i]->grad.template data<T>(),
                         exp_avg_[i].data<T>(), exp_avg_sq_[i].data<T>(), params_[i]->value.numel()});
    return tensors;
  }

  template <class T>
  void update_cpu(std::int64_t step, double grad_scale) {
    const auto tensors = table<T>();
    cpu::multi_tensor_adamw(tensors.data(), chunks_.data(), std::int64_t(chunks_.size()),
                            factors<T>(step, grad_scale));
  }

  std::size_t tensors_bytes() const { return params_.size() * sizeof(cpu::AdamWTensor<float>); }

  // Uploads the table (tensors, then chunks) when a pointer differs from the uploaded one: once in a
  // training run, since parameters and gradients keep their storage.
  void upload_table_if_changed() {
    const auto tensors = table<float>();
    const std::size_t chunk_bytes = chunks_.size() * sizeof(cpu::TensorChunk);
    std::vector<std::uint8_t> bytes(tensors_bytes() + chunk_bytes);
    std::memcpy(bytes.data(), tensors.data(), tensors_bytes());
    std::memcpy(bytes.data() + tensors_bytes(), chunks_.data(), chunk_bytes);
    if (bytes == uploaded_table_) return;
    const Device device = params_.front()->value.device();
    device_table_ = Tensor::empty({std::int64_t(bytes.size())}, DType::u8, device);
    device_table_.copy_from(Tensor::from(bytes, {std::int64_t(bytes.size())}));
    uploaded_table_ = std::move(bytes);
  }

  AdamWOptions options_;
  std::vector<Tensor> exp_avg_, exp_avg_sq_;
  std::vector<cpu::TensorChunk> chunks_;
  Tensor device_table_;                       // the table in device memory (CUDA parameters only)
  std::vector<std::uint8_t> uploaded_table_;  // its host copy, to notice when a pointer changes
};

}  // namespace qlora::train
