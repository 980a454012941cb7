#pragma once
// Learning-rate schedules as functions lr(step), with Hugging Face transformers' semantics
// (optimization.py: get_constant_schedule, get_constant_schedule_with_warmup, get_linear_schedule_with_warmup,
// get_cosine_with_min_lr_schedule_with_warmup with num_cycles 0.5).
//
// `step` is the number of updates already taken, HF's `current_step`: the first update uses lr(0), so a
// warm-up starts from 0. A trainer calls optimizer.set_lr(schedule.lr(optimizer.step_count())) before each
// optimizer.step(). With peak lr L, minimum M, W warm-up steps and N total steps:
//   warm-up (s < W, all but "constant"):  L * s / max(1, W)
//   constant, constant_with_warmup:       L
//   linear:                               L * max(0, (N - s) / max(1, N - W))
//   cosine:                               M + (L - M) * (1 + cos(pi * p)) / 2,  p = min(1, (s - W) / max(1, N - W))
// so cosine is L right after the warm-up, (L + M) / 2 half-way through the decay and M at N. One deliberate
// difference: HF's cosine keeps following the cosine past N (the lr rises again); ours stays at M.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>

#include "qlora/core/error.hpp"

namespace qlora::train {

enum class ScheduleKind { constant, constant_with_warmup, linear, cosine };

// What a command line or config gives. warmup_ratio is used when warmup_steps is 0: W = ceil(ratio * N), as
// HF's TrainingArguments.get_warmup_steps (warmup_steps wins when both are set, as there).
struct ScheduleOptions {
  std::string name = "constant";  // constant | constant_with_warmup | linear | cosine | cosine_with_min_lr
  double lr = 1e-3;               // the peak learning rate L
  std::int64_t total_steps = 0;   // N, needed by linear and cosine
  std::int64_t warmup_steps = 0;
  double warmup_ratio = 0.0;
  double min_lr = 0.0;  // M, the cosine floor (cosine only)
};

class LrSchedule {
 public:
  LrSchedule(ScheduleKind kind, double lr, std::int64_t warmup_steps = 0, std::int64_t total_steps = 0,
             double min_lr = 0.0)
      : kind_(kind), lr_(lr), warmup_steps_(warmup_steps), total_steps_(total_steps), min_lr_(min_lr) {
    const std::string what = "lr schedule '" + std::string(kind_name(kind)) + "': ";
    if (!std::isfinite(lr) || lr < 0) throw Error(what + "learning rate " + std::to_string(lr) + " is not >= 0");
    if (warmup_steps < 0) throw Error(what + "warmup_steps " + std::to_string(warmup_steps) + " is negative");
    if (kind == ScheduleKind::constant && warmup_steps > 0)
      throw Error(what + "has no warm-up (Hugging Face's 'constant' ignores warmup_steps/warmup_ratio): use "
                         "'constant_with_warmup' for a warm-up, or drop it");
    const bool decays = kind == ScheduleKind::linear || kind == ScheduleKind::cosine;
    if (decays && total_steps < 1)
      throw Error(what + "needs total_steps >= 1, got " + std::to_string(total_steps));
    if (total_steps < 0) throw Error(what + "total_steps " + std::to_string(total_steps) + " is negative");
    if (total_steps > 0 && warmup_steps > total_steps)
      throw Error(what + "warmup_steps " + std::to_string(warmup_steps) + " exceed total_steps " +
                  std::to_string(total_steps));
    if (!std::isfinite(min_lr) || min_lr < 0 || min_lr > lr)
      throw Error(what + "min_lr " + std::to_string(min_lr) + " is not in [0, lr = " + std::to_string(lr) + "]");
    if (min_lr > 0 && kind != ScheduleKind::cosine) throw Error(what + "min_lr applies to 'cosine' only");
  }

  // Parses ScheduleOptions::name and resolves warmup_ratio; unknown names and bad values throw.
  static LrSchedule parse(const ScheduleOptions& o) {
    ScheduleKind kind;
    if (o.name == "constant") kind = ScheduleKind::constant;
    else if (o.name == "constant_with_warmup") kind = ScheduleKind::constant_with_warmup;
    else if (o.name == "linear") kind = ScheduleKind::linear;
    else if (o.name == "cosine" || o.name == "cosine_with_min_lr") kind = ScheduleKind::cosine;
    else
      throw Error("unknown lr schedule '" + o.name +
                  "' (expected constant, constant_with_warmup, linear, cosine or cosine_with_min_lr)");
    if (!(o.warmup_ratio >= 0 && o.warmup_ratio <= 1))
      throw Error("lr schedule '" + o.name + "': warmup_ratio " + std::to_string(o.warmup_ratio) + " is not in [0, 1]");
    std::int64_t warmup = o.warmup_steps;
    if (warmup == 0 && o.warmup_ratio > 0) {
      if (o.total_steps < 1)
        throw Error("lr schedule '" + o.name + "': warmup_ratio needs total_steps >= 1, got " +
                    std::to_string(o.total_steps));
      warmup = std::int64_t(std::ceil(o.warmup_ratio * double(o.total_steps)));
    }
    return LrSchedule(kind, o.lr, warmup, o.total_steps, o.min_lr);
  }

  // The learning rate of update number step + 1 (step = updates already taken, >= 0).
  double lr(std::int64_t step) const {
    if (step < 0) throw Error("lr schedule: step " + std::to_string(step) + " is negative");
    const double s = double(step), w = double(warmup_steps_), n = double(total_steps_);
    if (kind_ != ScheduleKind::constant && step < warmup_steps_) return lr_ * s / std::max(1.0, w);
    switch (kind_) {
      case ScheduleKind::constant:
      case ScheduleKind::constant_with_warmup:
        return lr_;
      case ScheduleKind::linear:
        return lr_ * std::max(0.0, (n - s) / std::max(1.0, n - w));
      case ScheduleKind::cosine: {
        const double progress = std::min(1.0, (s - w) / std::max(1.0, n - w));
        return min_lr_ + (lr_ - min_lr_) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
      }
    }
    return lr_;
  }

  ScheduleKind kind() const { return kind_; }
  double peak_lr() const { return lr_; }
  double min_lr() const { return min_lr_; }
  std::int64_t warmup_steps() const { return warmup_steps_; }
  std::int64_t total_steps() const { return total_steps_; }

  static constexpr std::string_view kind_name(ScheduleKind kind) {
    switch (kind) {
      case ScheduleKind::constant: return "constant";
      case ScheduleKind::constant_with_warmup: return "constant_with_warmup";
      case ScheduleKind::linear: return "linear";
      case ScheduleKind::cosine: return "cosine";
    }
    return "?";
  }

  // "cosine lr 0.0002 warmup 30 total 1000 min_lr 0": for logs.
  std::string str() const {
    return std::string(kind_name(kind_)) + " lr " + std::to_string(lr_) + " warmup " + std::to_string(warmup_steps_) +
           " total " + std::to_string(total_steps_) + (kind_ == ScheduleKind::cosine ? " min_lr " + std::to_string(min_lr_) : "");
  }

 private:
  ScheduleKind kind_;
  double lr_;
  std::int64_t warmup_steps_;
  std::int64_t total_steps_;
  double min_lr_;
};

}  // namespace qlora::train
