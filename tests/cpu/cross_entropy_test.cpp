#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "qlora/cpu/cross_entropy.hpp"
#include "support/random.hpp"

using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

TEST_CASE("cross_entropy: forward is -log softmax at the target and 0 for ignored rows") {
  const std::int64_t rows = 5, vocab = 50;
  const auto logits = random_vector<float>(rows * vocab, 1, -4.0, 4.0);
  const std::vector<std::int32_t> targets = {3, 49, -100, 0, 17};
  std::vector<float> losses(rows, 7.0f), lse(rows);
  qlora::cpu::cross_entropy_forward(logits.data(), targets.data(), losses.data(), lse.data(), rows, vocab);
  for (std::int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (std::int64_t j = 0; j < vocab; ++j) sum += std::exp(double(logits[r * vocab + j]));
    CHECK(lse[r] == doctest::Approx(std::log(sum)).epsilon(1e-6));
    if (targets[r] == -100) {
      CHECK(losses[r] == 0.0f);
    } else {
      const double log_softmax = double(logits[r * vocab + targets[r]]) - std::log(sum);
      CHECK(losses[r] == doctest::Approx(-log_softmax).epsilon(1e-6));
    }
  }
}

TEST_CASE("cross_entropy: large logits do not overflow") {
  const std::vector<double> logits = {1000.0, 1001.0, 999.0};
  const std::vector<std::int32_t> target = {1};
  double loss = 0, lse = 0;
  qlora::cpu::cross_entropy_forward(logits.data(), target.data(), &loss, &lse, 1, 3);
  CHECK(loss == doctest::Approx(std::log(std::exp(-1.0) + 1.0 + std::exp(-2.0))).epsilon(1e-12));
}

TEST_CASE("cross_entropy: backward matches float64 finite differences of the mean loss") {
  const std::int64_t rows = 4, vocab = 7;
  const std::vector<std::int32_t> targets = {2, -100, 6, 0};
  const float grad_scale = 1.0f / 3.0f;  // mean over the 3 rows that are not ignored
  const auto logits = random_vector<double>(rows * vocab, 2, -3.0, 3.0);
  // L = grad_scale * sum_r loss_r: the kernel's upstream gradient is that one scalar.
  auto loss = [&](std::span<const double> z) {
    std::vector<double> losses(rows), lse(rows);
    qlora::cpu::cross_entropy_forward(z.data(), targets.data(), losses.data(), lse.data(), rows, vocab);
    double sum = 0;
    for (double l : losses) sum += l;
    return double(grad_scale) * sum;
  };
  std::vector<double> losses(rows), lse(rows), dlogits(rows * vocab, 9.0);
  qlora::cpu::cross_entropy_forward(logits.data(), targets.data(), losses.data(), lse.data(), rows, vocab);
  qlora::cpu::cross_entropy_backward(logits.data(), targets.data(), lse.data(), grad_scale, dlogits.data(), rows,
                                     vocab);
  CHECK(relative_error(dlogits, numerical_gradient(loss, logits)) < 1e-6);
  for (std::int64_t j = 0; j < vocab; ++j) CHECK(dlogits[1 * vocab + j] == 0.0);  // the ignored row

  SUBCASE("in place: dlogits aliasing logits gives the same gradient") {
    std::vector<double> in_place = logits;
    qlora::cpu::cross_entropy_backward(in_place.data(), targets.data(), lse.data(), grad_scale, in_place.data(),
                                       rows, vocab);
    CHECK(in_place == dlogits);
  }
}
