#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "qlora/cpu/softmax.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

TEST_CASE("softmax: rows sum to 1 and equal exp(x) / sum exp(x)") {
  const std::int64_t rows = 5, cols = 97;
  const auto x = random_vector<float>(rows * cols, 1, -5.0, 5.0);
  std::vector<double> expected(rows * cols);
  for (std::int64_t r = 0; r < rows; ++r) {
    double sum = 0;  // no max subtraction needed for |x| <= 5
    for (std::int64_t j = 0; j < cols; ++j) sum += std::exp(double(x[r * cols + j]));
    for (std::int64_t j = 0; j < cols; ++j) expected[r * cols + j] = std::exp(double(x[r * cols + j])) / sum;
  }
  std::vector<float> y(rows * cols);
  qlora::cpu::softmax_forward(x.data(), y.data(), rows, cols);
  CHECK(qlora::test::rel_error(y, expected) < 1e-6);
  for (std::int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (std::int64_t j = 0; j < cols; ++j) sum += y[r * cols + j];
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
  }
}

TEST_CASE("softmax: large logits do not overflow") {
  // exp(1000) overflows even a double; subtracting the row max makes this [e^-2, e^-1, 1] / sum.
  const std::vector<float> x = {998.0f, 999.0f, 1000.0f};
  std::vector<float> y(3);
  qlora::cpu::softmax_forward(x.data(), y.data(), 1, 3);
  const double sum = std::exp(-2.0) + std::exp(-1.0) + 1.0;
  CHECK(y[0] == doctest::Approx(std::exp(-2.0) / sum).epsilon(1e-6));
  CHECK(y[2] == doctest::Approx(1.0 / sum).epsilon(1e-6));
}

TEST_CASE("softmax: backward matches float64 finite differences") {
  const std::int64_t rows = 3, cols = 11;
  const auto x = random_vector<double>(rows * cols, 2, -3.0, 3.0);
  const auto c = random_vector<double>(rows * cols, 3);  // L = c . softmax(x)
  auto loss = [&](std::span<const double> xs) {
    std::vector<double> y(rows * cols);
    qlora::cpu::softmax_forward(xs.data(), y.data(), rows, cols);
    return dot(c, y);
  };
  std::vector<double> y(rows * cols), dx(rows * cols);
  qlora::cpu::softmax_forward(x.data(), y.data(), rows, cols);
  qlora::cpu::softmax_backward(y.data(), c.data(), dx.data(), rows, cols);
  CHECK(relative_error(dx, numerical_gradient(loss, x)) < 1e-6);
}
