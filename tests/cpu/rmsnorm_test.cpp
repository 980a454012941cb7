#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "qlora/cpu/rmsnorm.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

TEST_CASE("rmsnorm: forward matches x / sqrt(mean(x^2) + eps) * w") {
  const std::int64_t rows = 6, cols = 129;
  const float eps = 1e-5f;
  const auto x = random_vector<float>(rows * cols, 1, -2.0, 2.0);
  const auto w = random_vector<float>(cols, 2, 0.5, 1.5);
  std::vector<double> expected_y(rows * cols), expected_rstd(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    double mean_sq = 0;
    for (std::int64_t j = 0; j < cols; ++j) mean_sq += double(x[r * cols + j]) * double(x[r * cols + j]) / cols;
    expected_rstd[r] = 1.0 / std::sqrt(mean_sq + double(eps));
    for (std::int64_t j = 0; j < cols; ++j) {
      expected_y[r * cols + j] = double(x[r * cols + j]) * expected_rstd[r] * double(w[j]);
    }
  }
  std::vector<float> y(rows * cols), rstd(rows);
  qlora::cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, cols, eps);
  CHECK(qlora::test::rel_error(y, expected_y) < 1e-6);
  CHECK(qlora::test::rel_error(rstd, expected_rstd) < 1e-6);
}

TEST_CASE("rmsnorm: backward (dx and dw) matches float64 finite differences") {
  const std::int64_t rows = 4, cols = 9;
  const float eps = 1e-5f;
  const auto inputs = random_vector<double>(rows * cols + cols, 3, -2.0, 2.0);  // [x; w]
  const auto c = random_vector<double>(rows * cols, 4);                          // L = c . y
  auto loss = [&](std::span<const double> in) {
    std::vector<double> y(rows * cols), rstd(rows);
    qlora::cpu::rmsnorm_forward(in.data(), in.data() + rows * cols, y.data(), rstd.data(), rows, cols, eps);
    return dot(c, y);
  };
  const double* x = inputs.data();
  const double* w = inputs.data() + rows * cols;
  std::vector<double> y(rows * cols), rstd(rows);
  qlora::cpu::rmsnorm_forward(x, w, y.data(), rstd.data(), rows, cols, eps);
  std::vector<double> grad(rows * cols + cols, 0.0);  // [dx; dw], dw starts at 0 since it accumulates
  qlora::cpu::rmsnorm_backward(x, w, rstd.data(), c.data(), grad.data(), grad.data() + rows * cols, rows, cols);
  CHECK(relative_error(grad, numerical_gradient(loss, inputs)) < 1e-6);

  SUBCASE("dw accumulates into what is there, and a null dw leaves dx unchanged") {
    std::vector<double> dx(rows * cols), dw(cols, 1.0);
    qlora::cpu::rmsnorm_backward(x, w, rstd.data(), c.data(), dx.data(), dw.data(), rows, cols);
    for (std::int64_t j = 0; j < cols; ++j) CHECK(dw[j] == doctest::Approx(1.0 + grad[rows * cols + j]));
    std::vector<double> dx_only(rows * cols);
    qlora::cpu::rmsnorm_backward(x, w, rstd.data(), c.data(), dx_only.data(), static_cast<double*>(nullptr), rows,
                                 cols);
    CHECK(dx_only == dx);
  }
}
