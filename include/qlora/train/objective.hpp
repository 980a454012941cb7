#pragma once
// Training objectives (docs/objectives.md): what one micro-batch's forward and backward optimise.
//   sft:  the next-token cross-entropy (the model's own forward_backward)
//   rilq: RILQ's model-wise discrepancy to a full-precision teacher plus weighted cross-entropy
//   ti:   Teacher Intervention's distillation with the teacher's attention signals substituted on a schedule
// Objective<Model> is the interface; sft is generic and lives here, rilq and ti need a model's internals and
// live with the model (models/llama/distill.hpp, which also has the factory from a name). ObjectiveModel
// presents a model trained under an objective to Trainer<Model>, which only calls forward_backward,
// evaluate_loss, params and zero_grad.

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/autograd/param.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/nn/context.hpp"

namespace qlora::train {

struct ObjectiveResult {
  double loss = 0;                   // the micro-batch's objective: what the gradient added is the gradient of
  double cross_entropy = NAN;        // mean next-token cross-entropy, when the objective computed it
  double loss_sum = 0;               // cross-entropy summed over valid targets (0 when not computed)
  std::int64_t valid_tokens = 0;
  std::vector<std::pair<std::string, double>> terms;  // the objective's named parts, unweighted (for logs)

  nlohmann::json terms_json() const {
    nlohmann::json j = nlohmann::json::object();
    for (const auto& [name, value] : terms) j[name] = value;
    return j;
  }
};

template <class Model>
class Objective {
 public:
  virtual ~Objective() = default;
  virtual std::string name() const = 0;
  // One micro-batch: ids and next-token targets (batch, t) i32 (-100 ignored); ctx is a training context
  // (its seed and step key the dropout masks); step is the optimizer step (0-based), for schedules.
  // Adds the objective's gradient into the model's Params.
  virtual ObjectiveResult forward_backward(Model& model, nn::Context& ctx, const Tensor& ids, const Tensor& targets,
                                           std::int64_t step) = 0;
  // The same objective's value without gradients, in inference mode (no dropout): validation, and the
  // function finite differences check forward_backward against.
  virtual ObjectiveResult evaluate(Model& model, const Tensor& ids, const Tensor& targets, std::int64_t step) = 0;
  // The objective's settings (recorded in a run's configuration).
  virtual nlohmann::json config() const { return {{"objective", name()}}; }
};

// Supervised fine-tuning: the model's own mean next-token cross-entropy.
template <class Model>
class SftObjective final : public Objective<Model> {
 public:
  std::string name() const override { return "sft"; }
  ObjectiveResult forward_backward(Model& model, nn::Context& ctx, const Tensor& ids, const Tensor& targets,
                                   std::int64_t) override {
    const auto r = model.forward_backward(ctx, ids, targets);
    return ObjectiveResult{r.loss, r.loss, r.loss_sum, r.valid_tokens, {{"ce", r.loss}}};
  }
  ObjectiveResult evaluate(Model& model, const Tensor& ids, const Tensor& targets, std::int64_t) override {
    const auto r = model.evaluate_loss(ids, targets);
    return ObjectiveResult{r.loss, r.loss, r.loss_sum, r.valid_tokens, {{"ce", r.loss}}};
  }
};

// What Trainer<ObjectiveModel<Model>> trains: the model, each micro-batch through the objective. The
// trainer numbers micro-batches in ctx.step (step * micro_batches_per_step + a), from which the optimizer
// step is recovered for the objective's schedule. Evaluation stays the model's cross-entropy.
template <class Model>
class ObjectiveModel {
 public:
  ObjectiveModel(Model& model, Objective<Model>& objective, std::int64_t micro_batches_per_step)
      : model_(model), objective_(objective), micro_batches_per_step_(micro_batches_per_step) {
    QLORA_CHECK(micro_batches_per_step >= 1,
                "objective: micro-batches per step must be >= 1, got " + std::to_string(micro_batches_per_step));
  }

  ObjectiveResult forward_backward(nn::Context& ctx, const Tensor& ids, const Tensor& targets) {
    return objective_.forward_backward(model_, ctx, ids, targets, std::int64_t(ctx.step) / micro_batches_per_step_);
  }
  auto evaluate_loss(const Tensor& ids, const Tensor& targets) { return model_.evaluate_loss(ids, targets); }
  std::vector<autograd::Param*> params() { return model_.params(); }
  void zero_grad() { model_.zero_grad(); }

  Model& model() { return model_; }
  Objective<Model>& objective() { return objective_; }

 private:
  Model& model_;
  Objective<Model>& objective_;
  std::int64_t micro_batches_per_step_;
};

}  // namespace qlora::train
