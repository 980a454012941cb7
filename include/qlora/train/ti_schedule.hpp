#pragma once
// Teacher Intervention's schedule (methods/teacher-intervention.md, "Schedules", from MarsJacobs/ti-kd-qat
// main.py): which attention signal of the student is replaced by the teacher's at a given optimizer step.
// Step 1 lasts `intervention_steps` = s steps; afterwards nothing is replaced (plain distillation).
//   gradual (TI-G, the proposed one): output for t < s/6, context for s/6 <= t < s/3, map for t >= s/3
//   inverted:                         map for t < s/3, context for s/3 <= t < 2s/3, output afterwards
//   stochastic:                       each step one of output / context / map, uniformly at random
//   map | context | output:           that single mode for all s steps (TI-M, TI-C, TI-O)
// The thresholds compare exactly (6t < s, not t < floor(s/6)), so s = 60 gives output for steps 0-9,
// context 10-19, map 20-59, as the method file's test states.

#include <cstdint>
#include <string>
#include <string_view>

#include "qlora/core/error.hpp"
#include "qlora/core/philox.hpp"

namespace qlora::train {

// The student signal replaced by the teacher's in every decoder block (docs/objectives.md):
//   map:     attention probabilities, realised as attention(q_T, k_T, v_S) (teacher's post-RoPE q, k)
//   context: the attention context, o_proj's input
//   output:  o_proj's output, before the residual add
enum class InterventionPoint { none, map, context, output };

inline std::string_view intervention_point_name(InterventionPoint p) {
  switch (p) {
    case InterventionPoint::none: return "none";
    case InterventionPoint::map: return "map";
    case InterventionPoint::context: return "context";
    case InterventionPoint::output: return "output";
  }
  return "none";
}

enum class TiScheduleKind { gradual, inverted, stochastic, map, context, output };

inline std::string_view ti_schedule_kind_name(TiScheduleKind k) {
  switch (k) {
    case TiScheduleKind::gradual: return "gradual";
    case TiScheduleKind::inverted: return "inverted";
    case TiScheduleKind::stochastic: return "stochastic";
    case TiScheduleKind::map: return "map";
    case TiScheduleKind::context: return "context";
    case TiScheduleKind::output: return "output";
  }
  return "gradual";
}

struct TiSchedule {
  TiScheduleKind kind = TiScheduleKind::gradual;
  std::int64_t intervention_steps = 60;  // s: the reference's 60 (120 for CoLA / TinyBERT-4L)
  std::uint64_t seed = 0;                // stochastic: the Philox stream of the draws

  // "gradual" | "inverted" | "stochastic" | "map" | "context" | "output".
  static TiSchedule parse(std::string_view name, std::int64_t intervention_steps, std::uint64_t seed = 0) {
    QLORA_CHECK(intervention_steps >= 0,
                "--ti-steps must be >= 0, got " + std::to_string(intervention_steps));
    TiSchedule s;
    s.intervention_steps = intervention_steps;
    s.seed = seed;
    if (name == "gradual") s.kind = TiScheduleKind::gradual;
    else if (name == "inverted") s.kind = TiScheduleKind::inverted;
    else if (name == "stochastic") s.kind = TiScheduleKind::stochastic;
    else if (name == "map") s.kind = TiScheduleKind::map;
    else if (name == "context") s.kind = TiScheduleKind::context;
    else if (name == "output") s.kind = TiScheduleKind::output;
    else
      throw Error("--ti-schedule '" + std::string(name) +
                  "' is not one of gradual, inverted, stochastic, map, context, output");
    return s;
  }

  // The intervention at optimizer step t (0-based).
  InterventionPoint at(std::int64_t t) const {
    const std::int64_t s = intervention_steps;
    if (t < 0 || t >= s) return InterventionPoint::none;
    switch (kind) {
      case TiScheduleKind::gradual:
        if (6 * t < s) return InterventionPoint::output;
        if (3 * t < s) return InterventionPoint::context;
        return InterventionPoint::map;
      case TiScheduleKind::inverted:
        if (3 * t < s) return InterventionPoint::map;
        if (3 * t < 2 * s) return InterventionPoint::context;
        return InterventionPoint::output;
      case TiScheduleKind::stochastic: {
        const int pick = int(double(philox_uniform(seed, std::uint64_t(t))) * 3.0);  // uniform in {0, 1, 2}
        return pick == 0 ? InterventionPoint::output : pick == 1 ? InterventionPoint::context : InterventionPoint::map;
      }
      case TiScheduleKind::map: return InterventionPoint::map;
      case TiScheduleKind::context: return InterventionPoint::context;
      case TiScheduleKind::output: return InterventionPoint::output;
    }
    return InterventionPoint::none;
  }
};

}  // namespace qlora::train
