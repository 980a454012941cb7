#pragma once
// The training loop: micro-batches with gradient accumulation, clipping, the schedule, AdamW, periodic
// evaluation and checkpoints, metrics, and exact resumption. The model is a template parameter (any type
// with forward_backward(ctx, ids, targets), evaluate_loss(ids, targets), params(), zero_grad(): the Llama
// model of models/llama/ is one), so this layer does not depend on a model definition.
//
// One optimizer step = grad_accum = batch / micro_batch micro-batches. As in Hugging Face's Trainer, the
// step's loss is the mean of the micro-batches' mean losses and the gradient is the sum of theirs divided by
// grad_accum (folded into the optimizer step together with the clipping coefficient: no extra pass).
// Dropout masks are keyed by (seed, micro-batch index), the data order by (seed, epoch), so a run resumed from
// a checkpoint takes exactly the steps the uninterrupted run would have taken (bit for bit on the CPU).

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/nn/context.hpp"
#include "qlora/train/adamw.hpp"
#include "qlora/train/checkpoint.hpp"
#include "qlora/train/data_loader.hpp"
#include "qlora/train/grad_clip.hpp"
#include "qlora/train/metrics.hpp"
#include "qlora/train/schedule.hpp"

namespace qlora::train {

struct TrainerConfig {
  std::int64_t steps = 100;
  std::int64_t batch = 16;        // examples per optimizer step (QLoRA: 16)
  std::int64_t micro_batch = 4;   // examples per forward/backward
  double lr = 2e-4;
  std::string schedule = "constant";
  std::int64_t warmup_steps = 0;
  double weight_decay = 0.0;
  double max_grad_norm = kQloraMaxGradNorm;  // <= 0: no clipping
  std::int64_t save_every = 0;    // 0: only at the end
  std::int64_t eval_every = 0;    // 0: only at the end (when there is evaluation data)
  std::int64_t log_every = 1;
  int keep_checkpoints = 2;
  bool skip_nonfinite = false;    // skip a step whose loss or gradient is NaN/Inf instead of stopping
  std::uint64_t seed = 0;
  std::filesystem::path out;      // the run directory (must exist)
  nlohmann::json run = nlohmann::json::object();  // recorded in checkpoints; a resume must match it
  std::function<void(const std::string&)> print = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
  std::function<std::size_t()> peak_memory = [] { return std::size_t(0); };
};

struct TrainSummary {
  std::int64_t steps = 0, resumed_from = 0, skipped_steps = 0, tokens = 0;
  double final_loss = NAN, eval_loss = NAN, seconds = 0;
  nlohmann::json to_json() const {
    auto number = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
    return {{"steps", steps},           {"resumed_from", resumed_from}, {"skipped_steps", skipped_steps},
            {"tokens", tokens},         {"final_loss", number(final_loss)}, {"eval_loss", number(eval_loss)},
            {"seconds", seconds}};
  }
};

template <class Model>
class Trainer {
 public:
  Trainer(Model& model, DataLoader& data, const std::vector<Example>* eval_set, TrainerConfig config)
      : model_(model), data_(data), eval_(eval_set), cfg_(std::move(config)), params_(model.params()),
        optimizer_(params_, AdamWOptions{cfg_.lr, 0.9, 0.999, 1e-8, cfg_.weight_decay}),
        schedule_(LrSchedule::parse(ScheduleOptions{cfg_.schedule, cfg_.lr, cfg_.steps, cfg_.warmup_steps, 0.0, 0.0})) {
    if (cfg_.batch < 1 || cfg_.micro_batch < 1 || cfg_.batch % cfg_.micro_batch != 0)
      throw Error("--batch " + std::to_string(cfg_.batch) + " must be a positive multiple of --micro-batch " +
                  std::to_string(cfg_.micro_batch));
    if (cfg_.steps < 1) throw Error("--steps must be >= 1, got " + std::to_string(cfg_.steps));
    grad_accum_ = cfg_.batch / cfg_.micro_batch;
  }

  AdamW& optimizer() { return optimizer_; }

  // Continues from the newest complete checkpoint under `dir` (a run directory). The run configuration must
  // match the one recorded there, except for the number of steps.
  void resume(const std::filesystem::path& dir) {
    const auto latest = latest_checkpoint(dir);
    if (!latest) throw Error("--resume " + dir.string() + ": no complete checkpoint under " + (dir / "checkpoints").string());
    const TrainerState state = load_checkpoint(*latest, params_, optimizer_);
    nlohmann::json saved = state.run, wanted = cfg_.run;
    saved.erase("steps");
    wanted.erase("steps");
    if (!saved.empty() && saved != wanted)
      throw Error("--resume " + latest->string() + ": the checkpoint was written by a run configured as " + saved.dump() +
                  ", this run is " + wanted.dump());
    data_.set_position(state.data);
    start_step_ = state.step;
    cfg_.print("resumed from " + latest->string() + " at step " + std::to_string(start_step_));
  }

  TrainSummary run() {
    TrainSummary summary;
    summary.resumed_from = start_step_;
    MetricsLog log(cfg_.out / "metrics.jsonl", /*append=*/start_step_ > 0);
    const auto t0 = std::chrono::steady_clock::now();
    std::int64_t tokens_since_start = 0;
    for (std::int64_t step = start_step_; step < cfg_.steps; ++step) {
      model_.zero_grad();
      double loss = 0;
      std::int64_t tokens = 0;
      for (std::int64_t a = 0; a < grad_accum_; ++a) {
        const Batch b = data_.next();
        nn::Context ctx;
        ctx.seed = cfg_.seed;
        ctx.step = std::uint64_t(step * grad_accum_ + a);
        const auto r = model_.forward_backward(ctx, b.tokens, b.targets);
        loss += r.loss / double(grad_accum_);
        tokens += b.tokens.numel();
      }
      const double norm = global_grad_norm(params_) / double(grad_accum_);
      const double lr = schedule_.lr(step);
      if (!std::isfinite(loss) || !std::isfinite(norm)) {
        const std::string what = "step " + std::to_string(step + 1) + ": " +
                                 (!std::isfinite(loss) ? "the loss is " + std::to_string(loss)
                                                       : "the gradient of " + first_nonfinite_param() + " is not finite");
        if (!cfg_.skip_nonfinite)
          throw Error(what + "; stopping without writing a checkpoint (rerun with --skip-nonfinite to skip such steps)");
        cfg_.print(what + "; step skipped");
        ++summary.skipped_steps;
      } else {
        optimizer_.set_lr(lr);
        const double clip = cfg_.max_grad_norm > 0 ? clip_coefficient(norm, cfg_.max_grad_norm) : 1.0;
        optimizer_.step(clip / double(grad_accum_));
      }
      tokens_since_start += tokens;
      summary.tokens += tokens;
      summary.final_loss = loss;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if ((step + 1) % cfg_.log_every == 0 || step + 1 == cfg_.steps) {
        StepMetrics m{step + 1, cfg_.steps, loss, lr, norm, double(tokens_since_start) / std::max(elapsed, 1e-9), 0.0,
                      cfg_.peak_memory()};
        // progress_line's ETA is elapsed / step * remaining: scale this process's time to all steps so far.
        m.elapsed_seconds = elapsed / double(step + 1 - start_step_) * double(step + 1);
        cfg_.print(progress_line(m));
        log.write({{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm}, {"tokens", tokens},
                   {"tokens_per_s", m.tokens_per_second}, {"elapsed_s", elapsed}});
      }
      const bool last = step + 1 == cfg_.steps;
      if (eval_ && !eval_->empty() && ((cfg_.eval_every > 0 && (step + 1) % cfg_.eval_every == 0) || last)) {
        summary.eval_loss = evaluate();
        cfg_.print("step " + std::to_string(step + 1) + "  eval loss " + std::to_string(summary.eval_loss));
        log.write({{"step", step + 1}, {"eval_loss", summary.eval_loss}});
      }
      if ((cfg_.save_every > 0 && (step + 1) % cfg_.save_every == 0) || last)
        save_checkpoint(cfg_.out, params_, optimizer_, TrainerState{step + 1, data_.position(), cfg_.run},
                        cfg_.keep_checkpoints);
    }
    summary.steps = cfg_.steps;
    summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return summary;
  }

  // Mean loss over the evaluation examples, in micro-batches, without dropout.
  double evaluate() {
    double nll = 0;
    std::int64_t count = 0;
    for (std::size_t start = 0; start < eval_->size(); start += std::size_t(cfg_.micro_batch)) {
      std::vector<const Example*> chunk;
      for (std::size_t i = start; i < std::min(eval_->size(), start + std::size_t(cfg_.micro_batch)); ++i)
        chunk.push_back(&(*eval_)[i]);
      const Batch b = make_batch(chunk, 0);
      const auto r = model_.evaluate_loss(b.tokens, b.targets);
      nll += r.loss_sum;
      count += r.valid_tokens;
    }
    return count > 0 ? nll / double(count) : NAN;
  }

 private:
  std::string first_nonfinite_param() const {
    for (Param* p : params_)
      if (!all_finite(std::span<Param* const>(&p, 1))) return "'" + p->name + "'";
    return "an adapter";
  }

  Model& model_;
  DataLoader& data_;
  const std::vector<Example>* eval_;
  TrainerConfig cfg_;
  std::vector<Param*> params_;
  AdamW optimizer_;
  LrSchedule schedule_;
  std::int64_t grad_accum_ = 1;
  std::int64_t start_step_ = 0;
};

}  // namespace qlora::train
