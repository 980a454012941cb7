#pragma once
// Distillation objectives on the Llama model (docs/objectives.md): a full-precision teacher (same
// architecture, dense weights, no adapters) runs in inference mode on the student's micro-batch, and the
// student (quantized base + adapters) is trained towards it.
//   RILQ (methods/rilq.md): w_MD mean((h_S - h_T)^2) + w_GT CE, h = the hidden state after the final RMSNorm.
//   Teacher Intervention (methods/teacher-intervention.md, "Mapping to a decoder-only Llama"): the teacher's
//   attention signal (post-RoPE q, k / o_proj's input / o_proj's output) replaces the student's in every block
//   as the TiSchedule says; the loss is soft cross-entropy on the logits + per-block residual-stream MSE +
//   per-block attention-output MSE (+ an optional ground-truth CE), all weights 1 by default.
// make_objective(options, teacher) maps a name (sft | rilq | ti) to the objective.

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "qlora/ops/rmsnorm.hpp"
#include "qlora/train/objective.hpp"
#include "qlora/train/rilq_loss.hpp"
#include "qlora/train/soft_cross_entropy.hpp"
#include "qlora/train/ti_schedule.hpp"
#include "models/llama/config.hpp"
#include "models/llama/model.hpp"

namespace qlora::models::llama {

// The default teacher: the student's MODEL loaded without quantization and without adapters, on the same
// device in the same activation dtype.
inline LoadOptions teacher_load_options(const LoadOptions& student) {
  LoadOptions o = student;
  o.quant.reset();
  o.adapter = nn::AdapterConfig{nn::AdapterKind::none};
  return o;
}

// A teacher must have the student's architecture and live where the student's activations do.
inline void check_teacher(const Model& student, const Model& teacher) {
  const Config &s = student.config(), &t = teacher.config();
  const auto same = [&](std::int64_t a, std::int64_t b, const char* what) {
    QLORA_CHECK(a == b, std::string("--teacher: the teacher's ") + what + " (" + std::to_string(b) +
                            ") differs from the student's (" + std::to_string(a) + ")");
  };
  same(s.hidden_size, t.hidden_size, "hidden_size");
  same(s.num_hidden_layers, t.num_hidden_layers, "num_hidden_layers");
  same(s.num_attention_heads, t.num_attention_heads, "num_attention_heads");
  same(s.num_key_value_heads, t.num_key_value_heads, "num_key_value_heads");
  same(s.head_dim, t.head_dim, "head_dim");
  same(s.vocab_size, t.vocab_size, "vocab_size");
  QLORA_CHECK(student.device() == teacher.device() && student.dtype() == teacher.dtype(),
              "--teacher: the teacher runs on " + teacher.device().str() + " in " + std::string(dtype_name(teacher.dtype())) +
                  ", the student on " + student.device().str() + " in " + std::string(dtype_name(student.dtype())));
}

// What an inference forward exposes for distillation.
struct HiddenStates {
  std::vector<DecoderBlock::AttentionSignals> attention;  // per block, when recorded
  std::vector<Tensor> block_outputs;                       // per block, when kept
  Tensor final_hidden;                                     // after the final RMSNorm (batch, t, hidden)
};

// An inference forward of `model` (no dropout, nothing saved for a backward, interventions as set).
inline HiddenStates hidden_states(Model& model, const Tensor& ids, bool record_attention, bool keep_block_outputs) {
  nn::Context ctx;
  ctx.training = false;
  HiddenStates out;
  out.attention.resize(record_attention ? std::size_t(model.num_layers()) : 0);
  Tensor h = model.embed(ids);
  for (std::int64_t i = 0; i < model.num_layers(); ++i) {
    DecoderBlock& b = model.block(i);
    if (record_attention) b.record_attention(&out.attention[std::size_t(i)]);
    try {
      h = b.forward(ctx, h);
    } catch (...) {
      b.record_attention(nullptr);
      throw;
    }
    b.record_attention(nullptr);
    if (keep_block_outputs) out.block_outputs.push_back(h);
  }
  out.final_hidden = ops::rmsnorm(h, model.final_norm(), float(model.config().rms_norm_eps)).y;
  return out;
}

// The student's training forward and backward under ctx, or its loss alone in inference mode (ctx null).
inline LossResult run_student(Model& student, nn::Context* ctx, const Tensor& ids, const Tensor& targets,
                              const TrainingLoss& terms) {
  if (ctx) return student.forward_backward_embedded(*ctx, student.embed(ids), targets, nullptr, terms);
  nn::Context inference;
  inference.training = false;
  return student.forward_loss_embedded(inference, student.embed(ids), targets, terms);
}

// RILQ's discrepancy mean((h_S - h_T)^2) at the final hidden state, without gradients (evaluation).
inline double rilq_discrepancy(Model& student, Model& teacher, const Tensor& ids) {
  return train::mse_discrepancy(hidden_states(student, ids, false, false).final_hidden,
                                hidden_states(teacher, ids, false, false).final_hidden, 1.0, false)
      .loss;
}

// ---------------------------------------------------------------------------------------------------------
// RILQ

struct RilqOptions {
  train::RilqWeights weights;  // 0.5 discrepancy + 0.5 cross-entropy (aiha-lab/RILQ's defaults)
  // Keep the teacher's final hidden states per sequence (keyed by its token ids) instead of running the
  // teacher again: for a fixed calibration set (RILQ's 256 windows), at t x hidden values per sequence.
  bool cache_teacher = false;
};

class RilqObjective final : public train::Objective<Model> {
 public:
  RilqObjective(Model& teacher, RilqOptions options) : teacher_(teacher), options_(options) {
    QLORA_CHECK(options.weights.discrepancy >= 0 && options.weights.cross_entropy >= 0,
                "rilq: loss weights must be >= 0, got discrepancy " + std::to_string(options.weights.discrepancy) +
                    ", cross-entropy " + std::to_string(options.weights.cross_entropy));
  }

  std::string name() const override { return "rilq"; }
  nlohmann::json config() const override {
    return {{"objective", "rilq"},
            {"discrepancy_weight", options_.weights.discrepancy},
            {"ce_weight", options_.weights.cross_entropy},
            {"cache_teacher", options_.cache_teacher}};
  }

  train::ObjectiveResult forward_backward(Model& student, nn::Context& ctx, const Tensor& ids, const Tensor& targets,
                                          std::int64_t) override {
    return run(student, &ctx, ids, targets);
  }
  train::ObjectiveResult evaluate(Model& student, const Tensor& ids, const Tensor& targets, std::int64_t) override {
    return run(student, nullptr, ids, targets);
  }

  std::size_t cached_sequences() const { return cache_.size(); }

 private:
  // The objective with its backward under ctx, or its value alone in inference mode (ctx null).
  train::ObjectiveResult run(Model& student, nn::Context* ctx, const Tensor& ids, const Tensor& targets) {
    check_teacher(student, teacher_);
    const Tensor target = teacher_hidden(ids);
    double discrepancy = 0;
    HiddenStateLoss loss;
    loss.final_hidden = options_.weights.discrepancy != 0;
    loss.term = [&](const HiddenPoint&, const Tensor& value, bool want_grad) {
      train::DiscrepancyResult d = train::mse_discrepancy(value, target, options_.weights.discrepancy, want_grad);
      discrepancy = d.loss / options_.weights.discrepancy;
      return HiddenLossTerm{d.loss, std::move(d.grad)};
    };
    const LossResult r = run_student(student, ctx, ids, targets, TrainingLoss{options_.weights.cross_entropy, &loss});
    train::ObjectiveResult out{r.total, NAN, r.loss_sum, r.valid_tokens, {}};
    if (loss.final_hidden) out.terms.emplace_back("discrepancy", discrepancy);
    if (options_.weights.cross_entropy != 0) {
      out.cross_entropy = r.loss;
      out.terms.emplace_back("ce", r.loss);
    }
    return out;
  }

  // The teacher's final hidden states (batch, t, hidden) for ids, from the cache where it has each row.
  Tensor teacher_hidden(const Tensor& ids) {
    if (!options_.cache_teacher) return hidden_states(teacher_, ids, false, false).final_hidden;
    const std::int64_t batch = ids.dim(0), t = ids.dim(1);
    const std::vector<std::int32_t> all = ids.to_vector<std::int32_t>();
    std::vector<std::string> keys(static_cast<std::size_t>(batch));
    std::vector<std::int32_t> missing_ids;
    std::vector<std::int64_t> missing_rows;
    for (std::int64_t b = 0; b < batch; ++b) {
      keys[std::size_t(b)].assign(reinterpret_cast<const char*>(all.data() + b * t), std::size_t(t) * sizeof(std::int32_t));
      if (cache_.count(keys[std::size_t(b)])) continue;
      missing_rows.push_back(b);
      missing_ids.insert(missing_ids.end(), all.begin() + b * t, all.begin() + (b + 1) * t);
    }
    // Rows are independent in the model (attention stays within a sequence), so a row's hidden states do
    // not depend on the batch it was computed in.
    if (!missing_rows.empty()) {
      const Tensor fresh = hidden_states(teacher_, Tensor::from(missing_ids, {std::int64_t(missing_rows.size()), t}),
                                         false, false).final_hidden;
      for (std::size_t m = 0; m < missing_rows.size(); ++m)
        cache_.emplace(keys[std::size_t(missing_rows[m])], fresh.select(std::int64_t(m)).clone());
    }
    Tensor out = Tensor::empty({batch, t, teacher_.config().hidden_size}, teacher_.dtype(), teacher_.device());
    for (std::int64_t b = 0; b < batch; ++b) out.select(b).copy_from(cache_.at(keys[std::size_t(b)]));
    return out;
  }

  Model& teacher_;
  RilqOptions options_;
  std::unordered_map<std::string, Tensor> cache_;
};

// ---------------------------------------------------------------------------------------------------------
// Teacher Intervention

struct TiWeights {
  double logits = 1;            // L_pred: soft cross-entropy to the teacher's next-token distribution
  double hidden = 1;            // L_rep: sum over blocks of mean((y_S - y_T)^2) at each block output
  double attention_output = 1;  // L_attn_out: sum over blocks of mean((o_S - o_T)^2) at o_proj's output
  double cross_entropy = 0;     // ground-truth CE: off in the reference ("for fair comparison to TernaryBERT")
};

struct TiOptions {
  train::TiSchedule schedule;  // gradual, s = 60 steps
  TiWeights weights;
  std::int64_t logits_chunk_rows = 1024;  // rows of logits formed at once by the soft cross-entropy
};

class TeacherInterventionObjective final : public train::Objective<Model> {
 public:
  TeacherInterventionObjective(Model& teacher, TiOptions options) : teacher_(teacher), options_(options) {
    const TiWeights& w = options.weights;
    QLORA_CHECK(w.logits >= 0 && w.hidden >= 0 && w.attention_output >= 0 && w.cross_entropy >= 0,
                "ti: loss weights must be >= 0");
  }

  std::string name() const override { return "ti"; }
  nlohmann::json config() const override {
    const TiWeights& w = options_.weights;
    return {{"objective", "ti"},
            {"schedule", std::string(train::ti_schedule_kind_name(options_.schedule.kind))},
            {"intervention_steps", options_.schedule.intervention_steps},
            {"weights", {{"logits", w.logits}, {"hidden", w.hidden}, {"attention_output", w.attention_output},
                         {"ce", w.cross_entropy}}}};
  }
  const TiOptions& options() const { return options_; }

  train::ObjectiveResult forward_backward(Model& student, nn::Context& ctx, const Tensor& ids, const Tensor& targets,
                                          std::int64_t step) override {
    return run(student, &ctx, ids, targets, step);
  }
  train::ObjectiveResult evaluate(Model& student, const Tensor& ids, const Tensor& targets, std::int64_t step) override {
    return run(student, nullptr, ids, targets, step);
  }

  // Sets every block of `student` to take the teacher's signals at `point`, and clears them on exit.
  class InterventionScope {
   public:
    InterventionScope(Model& student, train::InterventionPoint point,
                      const std::vector<DecoderBlock::AttentionSignals>& teacher)
        : student_(student) {
      for (std::int64_t i = 0; i < student.num_layers(); ++i)
        student.block(i).intervene(point, point == train::InterventionPoint::none ? nullptr : &teacher[std::size_t(i)]);
    }
    ~InterventionScope() {
      for (std::int64_t i = 0; i < student_.num_layers(); ++i) student_.block(i).intervene(train::InterventionPoint::none);
    }
    InterventionScope(const InterventionScope&) = delete;
    InterventionScope& operator=(const InterventionScope&) = delete;

   private:
    Model& student_;
  };

 private:
  train::ObjectiveResult run(Model& student, nn::Context* ctx, const Tensor& ids, const Tensor& targets,
                             std::int64_t step) {
    check_teacher(student, teacher_);
    const TiWeights& w = options_.weights;
    const train::InterventionPoint point = options_.schedule.at(step);
    HiddenStates teacher = hidden_states(teacher_, ids, true, w.hidden != 0);
    // Keep only the teacher signals this step uses.
    for (DecoderBlock::AttentionSignals& s : teacher.attention) {
      if (point != train::InterventionPoint::map) s.q = s.k = Tensor();
      if (point != train::InterventionPoint::context) s.context = Tensor();
      if (point != train::InterventionPoint::output && w.attention_output == 0) s.output = Tensor();
    }

    double logits_term = 0, hidden_term = 0, attention_term = 0;
    HiddenStateLoss loss;
    loss.attention_outputs = w.attention_output != 0;
    loss.block_outputs = w.hidden != 0;
    loss.final_hidden = w.logits != 0;
    loss.term = [&](const HiddenPoint& p, const Tensor& value, bool want_grad) -> HiddenLossTerm {
      if (p.kind == HiddenPoint::final_hidden) {
        const Tensor flat = value.reshape({value.shape().rows(), value.shape().last()});
        const Tensor teacher_flat = teacher.final_hidden.reshape(flat.shape());
        train::SoftCrossEntropyResult s = train::linear_soft_cross_entropy(
            flat, student.head_weight(), teacher_flat, teacher_.head_weight(), w.logits, options_.logits_chunk_rows,
            want_grad);
        logits_term += s.loss / w.logits;
        return {s.loss, std::move(s.dhidden)};
      }
      const bool at_block = p.kind == HiddenPoint::block_output;
      const Tensor& target =
          at_block ? teacher.block_outputs[std::size_t(p.layer)] : teacher.attention[std::size_t(p.layer)].output;
      train::DiscrepancyResult d =
          train::mse_discrepancy(value, target, at_block ? w.hidden : w.attention_output, want_grad);
      (at_block ? hidden_term : attention_term) += d.loss / (at_block ? w.hidden : w.attention_output);
      return {d.loss, std::move(d.grad)};
    };

    InterventionScope scope(student, point, teacher.attention);
    const LossResult r = run_student(student, ctx, ids, targets, TrainingLoss{w.cross_entropy, &loss});
    // Adapters on a bypassed path got no gradient; the optimizer wants one for every parameter. A zero one
    // leaves fresh Adam moments at zero, so they stay put, as PyTorch's optimizers skip a None gradient.
    if (ctx)
      for (autograd::Param* p : student.params())
        if (p->requires_grad && !p->grad.defined())
          p->grad = Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device());
    train::ObjectiveResult out{r.total, NAN, r.loss_sum, r.valid_tokens, {}};
    if (loss.final_hidden) out.terms.emplace_back("logits_kd", logits_term);
    if (loss.block_outputs) out.terms.emplace_back("hidden_mse", hidden_term);
    if (loss.attention_outputs) out.terms.emplace_back("attention_mse", attention_term);
    if (w.cross_entropy != 0) {
      out.cross_entropy = r.loss;
      out.terms.emplace_back("ce", r.loss);
    }
    out.terms.emplace_back("intervention", double(int(point)));
    return out;
  }

  Model& teacher_;
  TiOptions options_;
};

// ---------------------------------------------------------------------------------------------------------
// The factory

struct ObjectiveOptions {
  std::string name = "sft";  // sft | rilq | ti (--objective)
  RilqOptions rilq;
  TiOptions ti;
};

// The objective `options.name`; rilq and ti need the teacher (which must outlive the objective).
inline std::unique_ptr<train::Objective<Model>> make_objective(const ObjectiveOptions& options, Model* teacher) {
  if (options.name == "sft") return std::make_unique<train::SftObjective<Model>>();
  if (options.name == "rilq" || options.name == "ti") {
    QLORA_CHECK(teacher, "--objective " + options.name + " needs a teacher model (--teacher, or MODEL unquantized)");
    if (options.name == "rilq") return std::make_unique<RilqObjective>(*teacher, options.rilq);
    return std::make_unique<TeacherInterventionObjective>(*teacher, options.ti);
  }
  throw Error("--objective '" + options.name + "' is not one of sft, rilq, ti");
}

}  // namespace qlora::models::llama
