// Learning-rate schedules (train/schedule.hpp) at chosen steps against their closed forms, written out here
// from Hugging Face transformers' optimization.py lambdas (step = updates already taken).

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <numbers>

#include "qlora/train/schedule.hpp"

using qlora::Error;
using qlora::train::LrSchedule;
using qlora::train::ScheduleKind;
using qlora::train::ScheduleOptions;

TEST_CASE("schedule constant: the peak lr at every step") {
  const LrSchedule s = LrSchedule::parse({.name = "constant", .lr = 2e-4});
  for (const std::int64_t step : {0, 1, 17, 10000}) CHECK(s.lr(step) == 2e-4);
  CHECK(s.kind() == ScheduleKind::constant);
}

TEST_CASE("schedule constant_with_warmup: linear from 0 over the warm-up, then constant") {
  const LrSchedule s = LrSchedule::parse({.name = "constant_with_warmup", .lr = 1e-3, .warmup_steps = 10});
  CHECK(s.lr(0) == 0.0);
  CHECK(s.lr(1) == doctest::Approx(1e-4).epsilon(1e-15));
  CHECK(s.lr(5) == doctest::Approx(5e-4).epsilon(1e-15));
  CHECK(s.lr(9) == doctest::Approx(9e-4).epsilon(1e-15));
  CHECK(s.lr(10) == 1e-3);
  CHECK(s.lr(1000000) == 1e-3);
}

TEST_CASE("schedule linear: warm-up, then linear decay to 0 at total_steps") {
  // W = 10, N = 110: after the warm-up lr = L (N - s) / (N - W) = L (110 - s) / 100.
  const LrSchedule s = LrSchedule::parse({.name = "linear", .lr = 3e-4, .total_steps = 110, .warmup_steps = 10});
  CHECK(s.lr(0) == 0.0);
  CHECK(s.lr(4) == doctest::Approx(3e-4 * 0.4).epsilon(1e-15));
  CHECK(s.lr(10) == doctest::Approx(3e-4).epsilon(1e-15));
  CHECK(s.lr(35) == doctest::Approx(3e-4 * 0.75).epsilon(1e-15));
  CHECK(s.lr(60) == doctest::Approx(1.5e-4).epsilon(1e-15));
  CHECK(s.lr(109) == doctest::Approx(3e-6).epsilon(1e-12));
  CHECK(s.lr(110) == 0.0);
  CHECK(s.lr(500) == 0.0);
}

TEST_CASE("schedule cosine: warm-up, L after it, (L + min) / 2 half-way, min at the end and after") {
  const double L = 2e-4, M = 2e-5;
  // W = 20, N = 220: decay over 200 steps; half-way is s = 120.
  const LrSchedule s =
      LrSchedule::parse({.name = "cosine", .lr = L, .total_steps = 220, .warmup_steps = 20, .min_lr = M});
  CHECK(s.lr(0) == 0.0);
  CHECK(s.lr(10) == doctest::Approx(L / 2).epsilon(1e-15));
  CHECK(s.lr(20) == doctest::Approx(L).epsilon(1e-15));
  CHECK(s.lr(120) == doctest::Approx((L + M) / 2).epsilon(1e-14));
  // A quarter of the way: cos(pi / 4) = sqrt(2) / 2.
  CHECK(s.lr(70) == doctest::Approx(M + (L - M) * (1 + std::numbers::sqrt2 / 2) / 2).epsilon(1e-14));
  CHECK(s.lr(220) == doctest::Approx(M).epsilon(1e-14));
  CHECK(s.lr(1000) == doctest::Approx(M).epsilon(1e-14));  // stays at the floor (HF's cosine would rise again)

  // Without min_lr: decays to 0, as HF's get_cosine_schedule_with_warmup.
  const LrSchedule zero_floor = LrSchedule::parse({.name = "cosine", .lr = L, .total_steps = 100});
  CHECK(zero_floor.lr(0) == L);
  CHECK(zero_floor.lr(50) == doctest::Approx(L / 2).epsilon(1e-14));
  CHECK(zero_floor.lr(100) == doctest::Approx(0.0).epsilon(1e-20));
}

TEST_CASE("schedule: warmup_ratio gives ceil(ratio * total_steps) warm-up steps, as HF") {
  CHECK(LrSchedule::parse({.name = "linear", .lr = 1, .total_steps = 1000, .warmup_ratio = 0.03}).warmup_steps() == 30);
  CHECK(LrSchedule::parse({.name = "cosine", .lr = 1, .total_steps = 101, .warmup_ratio = 0.03}).warmup_steps() == 4);
  // warmup_steps wins over warmup_ratio.
  CHECK(LrSchedule::parse({.name = "linear", .lr = 1, .total_steps = 1000, .warmup_steps = 7, .warmup_ratio = 0.5})
            .warmup_steps() == 7);
}

TEST_CASE("schedule: unknown names and inconsistent options are refused") {
  CHECK_THROWS_WITH_AS(LrSchedule::parse({.name = "cosine_annealing"}),
                       "unknown lr schedule 'cosine_annealing' (expected constant, constant_with_warmup, linear, "
                       "cosine or cosine_with_min_lr)",
                       Error);
  CHECK_THROWS_AS(LrSchedule::parse({.name = "linear", .lr = 1e-3}), Error);                             // no total
  CHECK_THROWS_AS(LrSchedule::parse({.name = "constant", .lr = 1e-3, .warmup_steps = 5}), Error);        // HF ignores
  CHECK_THROWS_AS(LrSchedule::parse({.name = "linear", .lr = 1e-3, .total_steps = 10, .min_lr = 1e-4}), Error);
  CHECK_THROWS_AS(LrSchedule::parse({.name = "cosine", .lr = 1e-3, .total_steps = 10, .min_lr = 1e-2}), Error);
  CHECK_THROWS_AS(LrSchedule::parse({.name = "cosine", .lr = 1e-3, .total_steps = 10, .warmup_steps = 11}), Error);
  CHECK_THROWS_AS(LrSchedule::parse({.name = "cosine", .lr = 1e-3, .total_steps = 10, .warmup_ratio = 1.5}), Error);
  CHECK_THROWS_AS(LrSchedule::parse({.name = "constant", .lr = -1.0}), Error);
  const LrSchedule s = LrSchedule::parse({.name = "constant", .lr = 1e-3});
  CHECK_THROWS_AS(s.lr(-1), Error);
}
