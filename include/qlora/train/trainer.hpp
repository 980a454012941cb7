#pragma once
// The training loop: micro-batches with gradient accumulation, data parallelism over the ranks of a
// dist::Communicator, clipping, the schedule, AdamW, periodic evaluation and checkpoints, metrics, and exact
// resumption. The model is a template parameter (any type with forward_backward(ctx, ids, targets),
// evaluate_loss(ids, targets), params(), zero_grad(): the Llama model of models/llama/ is one), so this layer
// does not depend on a model definition.
//
// One optimizer step takes `batch` examples (the GLOBAL batch, whatever the world size) in batch /
// micro_batch micro-batches. Every rank draws all of them from the same seeded order and computes micro-batch
// j when j % world_size == its rank: the micro-batches are the ones one process would form, and the loader's
// position (hence every checkpoint) is the same on every rank and in one process.
//
// The step's loss is the mean over the valid target tokens of the whole global batch (sum of the
// micro-batches' summed losses / their total target count), as transformers >= 4.46 computes it with
// gradient accumulation (num_items_in_batch): it does not depend on how the batch is cut into micro-batches
// or ranks. The model returns the gradient of each micro-batch's MEAN loss, g_j, with n_j targets; the step
// needs sum_j n_j g_j / N. The gradients accumulate in place, so before micro-batch j the accumulated sum is
// rescaled by n_prev / n_j (nothing to do when the counts are equal, as for text windows); afterwards it
// holds sum_j (n_j / n_last) g_j. Each rank scales that by n_last / n_ref (n_ref: a count every rank knows)
// before the all-reduce SUM, and n_ref / N is folded into the optimizer step with the clipping coefficient.
// The gradient norm for clipping is the reduced gradient's, so clipping is the same on every rank.
//
// The all-reduce runs in buckets (dist::GradientBucketer). A model with an `after_block_backward` hook
// (the Llama model) hands over each block's parameters as soon as its backward is done in the last
// micro-batch, so on a GPU the reduction overlaps the rest of the backward; other models reduce after it.
//
// Dropout masks are keyed by (seed, step * micro-batches per step + j): different on every rank, and the
// same as one process's for the same micro-batch. The data order is keyed by (seed, epoch), so a run resumed
// from a checkpoint takes exactly the steps the uninterrupted run would have taken (bit for bit on the CPU
// with the same world size). Rank 0 alone prints and writes (metrics, checkpoints); the others wait for each
// checkpoint at a collective that also propagates a failure (dist::fail_together).
//
// A ParameterReshaper (RA-LoRA, train/rank_adaptive.hpp) may change the trainable parameters' shapes after an
// optimizer step; the trainer then rebuilds its optimizer (with the state the reshaper maps over) and its
// gradient buckets, and checkpoints carry the reshaper's own tensors beside the adapter.

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/dist/communicator.hpp"
#include "qlora/dist/fail_together.hpp"
#include "qlora/dist/gradient_bucketer.hpp"
#include "qlora/dist/sharded_rows.hpp"
#include "qlora/dist/single_process.hpp"
#include "qlora/nn/context.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/train/adamw.hpp"
#include "qlora/train/checkpoint.hpp"
#include "qlora/train/data_loader.hpp"
#include "qlora/train/grad_clip.hpp"
#include "qlora/train/metrics.hpp"
#include "qlora/train/schedule.hpp"

namespace qlora::train {

// Changes the shapes of trainable parameters between optimizer steps (RA-LoRA's rank reallocation). The Param
// objects stay the same; their values change shape (and lose their gradients). Runs on every rank in lockstep
// and must be deterministic, so that the ranks stay identical and a resumed run repeats the uninterrupted one.
class ParameterReshaper {
 public:
  virtual ~ParameterReshaper() = default;
  struct Report {
    bool reshaped = false;                     // some parameter changed shape
    nlohmann::json record;                     // for metrics.jsonl (null: nothing to log)
    std::string line;                          // for the progress output (empty: nothing to print)
  };
  // After `steps_done` optimizer steps.
  virtual Report after_step(std::int64_t steps_done) = 0;
  // The optimizer state for the parameters as they are now, from the state before the change (the optimizer's
  // state_tensors(), "<param>.<state>").
  virtual std::vector<std::pair<std::string, Tensor>> remap_optimizer_state(
      const std::vector<std::pair<std::string, Tensor>>& before) = 0;
  // Tensors saved in every checkpoint beside the parameters (frozen Params with unique names) and restored on
  // resume.
  virtual std::vector<Param*> checkpoint_state() = 0;
  // Before the checkpoint in `dir` is loaded: gives the parameters and checkpoint_state() the shapes stored there.
  virtual void prepare_resume(const std::filesystem::path& dir) = 0;
};

struct TrainerConfig {
  std::int64_t steps = 100;
  std::int64_t batch = 16;        // examples per optimizer step over all ranks (QLoRA: 16)
  std::int64_t micro_batch = 4;   // examples per forward/backward (on one rank)
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
  std::filesystem::path out;      // the run directory (must exist; rank 0 writes there, every rank reads on resume)
  std::size_t bucket_bytes = dist::GradientBucketer::kDefaultBucketBytes;  // all-reduce bucket size
  nlohmann::json run = nlohmann::json::object();  // recorded in checkpoints; a resume must match it
  std::function<void(const std::string&)> print = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
  std::function<std::size_t()> peak_memory = [] { return std::size_t(0); };
  ParameterReshaper* reshaper = nullptr;  // not owned; RA-LoRA (--rank-adaptive), else none
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
  Trainer(Model& model, DataLoader& data, const std::vector<Example>* eval_set, TrainerConfig config,
          dist::Communicator& comm = dist::single_process())
      : model_(model), data_(data), eval_(eval_set), cfg_(std::move(config)), comm_(comm), params_(model.params()),
        optimizer_(std::make_unique<AdamW>(params_, AdamWOptions{cfg_.lr, 0.9, 0.999, 1e-8, cfg_.weight_decay})),
        schedule_(LrSchedule::parse(ScheduleOptions{cfg_.schedule, cfg_.lr, cfg_.steps, cfg_.warmup_steps, 0.0, 0.0})) {
    const std::int64_t world = comm_.size();
    if (cfg_.batch < 1 || cfg_.micro_batch < 1 || cfg_.batch % (cfg_.micro_batch * world) != 0)
      throw Error("--batch " + std::to_string(cfg_.batch) + " must be a positive multiple of --micro-batch " +
                  std::to_string(cfg_.micro_batch) +
                  (world > 1 ? " x " + std::to_string(world) + " processes (--batch is the global batch)" : ""));
    if (cfg_.steps < 1) throw Error("--steps must be >= 1, got " + std::to_string(cfg_.steps));
    micro_batches_ = cfg_.batch / cfg_.micro_batch;
    cfg_.run["world_size"] = world;
    if (!comm_.is_root()) cfg_.print = [](const std::string&) {};
    make_bucketer();
  }

  AdamW& optimizer() { return *optimizer_; }

  // Continues from the newest complete checkpoint under `dir` (a run directory). The run configuration must
  // match the one recorded there, except for the number of steps.
  void resume(const std::filesystem::path& dir) {
    std::optional<std::filesystem::path> latest;
    TrainerState state;
    dist::fail_together(comm_, [&] {
      latest = latest_checkpoint(dir);
      if (!latest)
        throw Error("--resume " + dir.string() + ": no complete checkpoint under " + (dir / "checkpoints").string());
      if (cfg_.reshaper) {  // the checkpoint's shapes first, then an optimizer for them
        cfg_.reshaper->prepare_resume(*latest);
        rebuild_optimizer(nullptr);
      }
      state = load_checkpoint(*latest, checkpoint_params(), *optimizer_);
    });
    nlohmann::json saved = state.run, wanted = cfg_.run;
    // Checkpoints from before data parallelism were written by one process.
    const std::int64_t saved_world = saved.value("world_size", std::int64_t(1)), world = comm_.size();
    if (saved_world != world)
      throw Error("--resume " + latest->string() + ": the checkpoint was written by " + std::to_string(saved_world) +
                  " process" + (saved_world > 1 ? "es" : "") + ", this run has " + std::to_string(world) +
                  " (resume with the same world size: mpirun -np " + std::to_string(saved_world) + ")");
    for (auto* j : {&saved, &wanted}) {
      j->erase("steps");
      j->erase("world_size");
    }
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
    std::optional<MetricsLog> log;
    dist::fail_together(comm_, [&] {
      if (comm_.is_root()) log.emplace(cfg_.out / "metrics.jsonl", /*append=*/start_step_ > 0);
    });
    const auto t0 = std::chrono::steady_clock::now();
    std::int64_t tokens_since_start = 0;
    for (std::int64_t step = start_step_; step < cfg_.steps; ++step) {
      const StepResult r = forward_backward_step(step);
      const double loss = r.loss, norm = r.grad_norm;
      const double lr = schedule_.lr(step);
      if (!std::isfinite(loss) || !std::isfinite(norm)) {
        const std::string what = "step " + std::to_string(step + 1) + ": " +
                                 (r.targets == 0 ? std::string("the batch has no target tokens (every label is masked)")
                                  : !std::isfinite(loss) ? "the loss is " + std::to_string(loss)
                                                         : "the gradient of " + first_nonfinite_param() + " is not finite");
        if (!cfg_.skip_nonfinite)
          throw Error(what + "; stopping without writing a checkpoint (rerun with --skip-nonfinite to skip such steps)");
        cfg_.print(what + "; step skipped");
        ++summary.skipped_steps;
      } else {
        optimizer_->set_lr(lr);
        const double clip = cfg_.max_grad_norm > 0 ? clip_coefficient(norm, cfg_.max_grad_norm) : 1.0;
        optimizer_->step(clip * r.grad_scale);
      }
      if (cfg_.reshaper) {  // before the checkpoint of this step, so that a resume starts from the new shapes
        const ParameterReshaper::Report report = cfg_.reshaper->after_step(step + 1);
        if (!report.line.empty()) cfg_.print(report.line);
        if (log && !report.record.is_null()) log->write(report.record);
        if (report.reshaped) rebuild_optimizer(cfg_.reshaper);
      }
      tokens_since_start += r.tokens;
      summary.tokens += r.tokens;
      summary.final_loss = loss;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if ((step + 1) % cfg_.log_every == 0 || step + 1 == cfg_.steps) {
        StepMetrics m{step + 1, cfg_.steps, loss, lr, norm, double(tokens_since_start) / std::max(elapsed, 1e-9), 0.0,
                      cfg_.peak_memory()};
        // progress_line's ETA is elapsed / step * remaining: scale this process's time to all steps so far.
        m.elapsed_seconds = elapsed / double(step + 1 - start_step_) * double(step + 1);
        cfg_.print(progress_line(m));
        if (log)
          log->write({{"step", step + 1}, {"loss", loss}, {"lr", lr}, {"grad_norm", norm}, {"tokens", r.tokens},
                      {"tokens_per_s", m.tokens_per_second}, {"elapsed_s", elapsed}});
      }
      const bool last = step + 1 == cfg_.steps;
      if (eval_ && !eval_->empty() && ((cfg_.eval_every > 0 && (step + 1) % cfg_.eval_every == 0) || last)) {
        summary.eval_loss = evaluate();
        cfg_.print("step " + std::to_string(step + 1) + "  eval loss " + std::to_string(summary.eval_loss));
        if (log) log->write({{"step", step + 1}, {"eval_loss", summary.eval_loss}});
      }
      if ((cfg_.save_every > 0 && (step + 1) % cfg_.save_every == 0) || last)
        dist::fail_together(comm_, [&] {  // the other ranks wait here until the checkpoint is complete
          if (comm_.is_root())
            save_checkpoint(cfg_.out, checkpoint_params(), *optimizer_, TrainerState{step + 1, data_.position(), cfg_.run},
                            cfg_.keep_checkpoints);
        });
    }
    summary.steps = cfg_.steps;
    summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return summary;
  }

  // Mean loss over the evaluation examples (without dropout), in micro-batches dealt to the ranks round
  // robin; the per-micro-batch sums are added in order, so the result is one process's, bit for bit.
  double evaluate() {
    const std::int64_t chunks = (std::int64_t(eval_->size()) + cfg_.micro_batch - 1) / cfg_.micro_batch;
    dist::ShardedRows rows(comm_, chunks, 2);
    dist::fail_together(comm_, [&] {
      for (std::int64_t c = 0; c < chunks; ++c) {
        if (!rows.mine(c)) continue;
        std::vector<const Example*> chunk;
        const std::size_t start = std::size_t(c * cfg_.micro_batch);
        for (std::size_t i = start; i < std::min(eval_->size(), start + std::size_t(cfg_.micro_batch)); ++i)
          chunk.push_back(&(*eval_)[i]);
        const Batch b = make_batch(chunk, 0);
        const auto r = model_.evaluate_loss(b.tokens, b.targets);
        rows.row(c)[0] = r.loss_sum;
        rows.row(c)[1] = double(r.valid_tokens);
      }
    });
    rows.exchange();
    const std::vector<double> sums = rows.column_sums();
    return sums[1] > 0 ? sums[0] / sums[1] : NAN;
  }

 private:
  struct StepResult {
    double loss = NAN;        // mean over the global batch's target tokens
    double grad_norm = NAN;   // of the reduced gradient, sum_j n_j g_j / N
    double grad_scale = 1;    // what the accumulated gradients still need to be multiplied by
    std::int64_t targets = 0, tokens = 0;  // over the global batch
  };

  // The summed loss of a micro-batch with n targets, from whatever the model reports.
  template <class R>
  static double loss_sum_of(const R& r, std::int64_t n) {
    if constexpr (requires { r.terms; }) return r.loss * double(n);  // an objective (RILQ, TI): its whole loss
    else if constexpr (requires { r.loss_sum; }) return r.loss_sum;
    else return r.loss * double(n);
  }

  // Forward and backward of this rank's micro-batches of the step, then the all-reduce (see the top).
  StepResult forward_backward_step(std::int64_t step) {
    const int world = comm_.size(), rank = comm_.rank();
    struct Micro {
      Batch batch;
      std::int64_t index;
    };
    std::vector<Micro> mine;
    std::vector<std::int64_t> last_count(std::size_t(world), 0);  // per rank: its last micro-batch with targets
    StepResult r;
    for (std::int64_t j = 0; j < micro_batches_; ++j) {
      Batch b = data_.next();
      r.targets += b.target_count;
      r.tokens += b.tokens.numel();
      const int owner = int(j % world);
      if (b.target_count > 0) last_count[std::size_t(owner)] = b.target_count;
      if (owner == rank) mine.push_back({std::move(b), j});
    }
    std::int64_t reference = 0;  // n_ref: the first rank's last count (every rank computes the same)
    for (std::int64_t c : last_count)
      if (reference == 0) reference = c;

    model_.zero_grad();
    std::size_t final_micro = mine.size();  // the last of this rank's micro-batches with targets
    for (std::size_t k = 0; k < mine.size(); ++k)
      if (mine[k].batch.target_count > 0) final_micro = k;
    const double to_reference = reference > 0 ? double(last_count[std::size_t(rank)]) / double(reference) : 0.0;
    std::unordered_set<Param*> handed_over;
    // Scales a finished gradient to this rank's share of sum_j n_j g_j / n_ref and starts its reduction.
    const auto hand_over = [&](Param* p) {
      if (!handed_over.insert(p).second) return;
      if (to_reference != 1.0 && p->grad.defined()) ops::scale_(p->grad, float(to_reference));
      if (bucketer_) bucketer_->mark_ready(p);
    };

    double loss_sum = 0;
    std::int64_t previous = 0;
    for (std::size_t k = 0; k < mine.size(); ++k) {
      const Batch& b = mine[k].batch;
      if (b.target_count == 0) continue;  // no loss, no gradient
      if (previous > 0 && previous != b.target_count) scale_grads(double(previous) / double(b.target_count));
      nn::Context ctx;
      ctx.seed = cfg_.seed;
      ctx.step = std::uint64_t(step * micro_batches_ + mine[k].index);
      const auto forward_backward = [&] { return loss_sum_of(model_.forward_backward(ctx, b.tokens, b.targets), b.target_count); };
      if constexpr (requires(Model& m) { m.after_block_backward; }) {
        if (bucketer_ && k == final_micro)  // hand each block over as its backward finishes
          model_.after_block_backward = [&](const std::vector<Param*>& done) {
            for (Param* p : done) hand_over(p);
          };
        struct Unhook {
          Model& m;
          ~Unhook() { m.after_block_backward = nullptr; }
        } unhook{model_};
        loss_sum += forward_backward();
      } else {
        loss_sum += forward_backward();
      }
      previous = b.target_count;
    }
    for (Param* p : params_) hand_over(p);  // what no hook handed over (or everything, without a hook)
    if (bucketer_) bucketer_->finish();

    const double global_loss_sum = comm_.all_reduce_sum(loss_sum);
    r.loss = r.targets > 0 ? global_loss_sum / double(r.targets) : NAN;
    r.grad_scale = r.targets > 0 ? double(reference) / double(r.targets) : 0.0;
    r.grad_norm = r.targets > 0 ? global_grad_norm(params_) * r.grad_scale : NAN;
    return r;
  }

  // Buckets in the order the gradients become final: the last block's first (several ranks only).
  void make_bucketer() {
    if (comm_.size() == 1) return;
    std::vector<Param*> reverse(params_.rbegin(), params_.rend());
    bucketer_ = std::make_unique<dist::GradientBucketer>(comm_, std::move(reverse), cfg_.bucket_bytes,
                                                         dist::GradientBucketer::Reduction::sum);
  }

  // After the parameters changed shape: a new optimizer over them, with the state `reshaper` maps over from the
  // old one (nullptr: zero state, to be loaded from a checkpoint), its step count and learning rate kept; new
  // gradient buckets.
  void rebuild_optimizer(ParameterReshaper* reshaper) {
    const nlohmann::json scalars = optimizer_->scalar_state();
    std::vector<std::pair<std::string, Tensor>> state;
    if (reshaper) state = reshaper->remap_optimizer_state(optimizer_->state_tensors());
    auto fresh = std::make_unique<AdamW>(params_, optimizer_->options());
    if (reshaper) fresh->load_state(scalars, state);
    optimizer_ = std::move(fresh);
    bucketer_.reset();
    make_bucketer();
  }

  // What a checkpoint holds: the parameters, and the reshaper's own tensors.
  std::vector<Param*> checkpoint_params() {
    std::vector<Param*> all = params_;
    if (cfg_.reshaper)
      for (Param* p : cfg_.reshaper->checkpoint_state()) all.push_back(p);
    return all;
  }

  void scale_grads(double factor) {
    for (Param* p : params_)
      if (p->grad.defined()) ops::scale_(p->grad, float(factor));
  }

  std::string first_nonfinite_param() const {
    for (Param* p : params_)
      if (!all_finite(std::span<Param* const>(&p, 1))) return "'" + p->name + "'";
    return "an adapter";
  }

  Model& model_;
  DataLoader& data_;
  const std::vector<Example>* eval_;
  TrainerConfig cfg_;
  dist::Communicator& comm_;
  std::vector<Param*> params_;
  std::unique_ptr<AdamW> optimizer_;
  LrSchedule schedule_;
  std::int64_t micro_batches_ = 1;  // per step, over all ranks
  std::int64_t start_step_ = 0;
  std::unique_ptr<dist::GradientBucketer> bucketer_;  // with more than one rank
};

}  // namespace qlora::train
