// The residual add fused with RMSNorm (cpu/rmsnorm.hpp): the unfused composition bit for bit, and the
// backward against float64 finite differences.

#include <doctest/doctest.h>

#include <cstdint>
#include <span>
#include <vector>

#include "qlora/cpu/elementwise.hpp"
#include "qlora/cpu/rmsnorm.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

TEST_CASE("add_rmsnorm: forward is add then rmsnorm, bit for bit") {
  const std::int64_t rows = 7, cols = 131;
  const float eps = 1e-5f;
  const auto x = random_vector<float>(rows * cols, 11, -2.0, 2.0);
  const auto residual = random_vector<float>(rows * cols, 12, -2.0, 2.0);
  const auto w = random_vector<float>(cols, 13, 0.5, 1.5);

  std::vector<float> h(rows * cols), y(rows * cols), rstd(rows);  // unfused
  qlora::cpu::add(x.data(), residual.data(), h.data(), rows * cols);
  qlora::cpu::rmsnorm_forward(h.data(), w.data(), y.data(), rstd.data(), rows, cols, eps);

  std::vector<float> sum(rows * cols), y_fused(rows * cols), rstd_fused(rows);
  qlora::cpu::add_rmsnorm_forward(x.data(), residual.data(), w.data(), sum.data(), y_fused.data(), rstd_fused.data(),
                                  rows, cols, eps);
  CHECK(sum == h);
  CHECK(y_fused == y);
  CHECK(rstd_fused == rstd);

  SUBCASE("the sum may overwrite x") {
    std::vector<float> in_place = x;
    qlora::cpu::add_rmsnorm_forward(in_place.data(), residual.data(), w.data(), in_place.data(), y_fused.data(),
                                    rstd_fused.data(), rows, cols, eps);
    CHECK(in_place == h);
    CHECK(y_fused == y);
  }
}

TEST_CASE("add_rmsnorm: backward is rmsnorm_backward plus the residual gradient, bit for bit") {
  const std::int64_t rows = 5, cols = 67;
  const auto sum = random_vector<float>(rows * cols, 21, -2.0, 2.0);
  const auto w = random_vector<float>(cols, 22, 0.5, 1.5);
  const auto dy = random_vector<float>(rows * cols, 23);
  const auto dsum = random_vector<float>(rows * cols, 24);
  std::vector<float> y(rows * cols), rstd(rows);
  qlora::cpu::rmsnorm_forward(sum.data(), w.data(), y.data(), rstd.data(), rows, cols, 1e-5f);

  std::vector<float> dx(rows * cols), dw(cols, 0.5f);  // unfused: rmsnorm_backward, then axpy
  qlora::cpu::rmsnorm_backward(sum.data(), w.data(), rstd.data(), dy.data(), dx.data(), dw.data(), rows, cols);
  qlora::cpu::axpy(1.0f, dsum.data(), dx.data(), rows * cols);

  std::vector<float> dx_fused(rows * cols), dw_fused(cols, 0.5f);
  qlora::cpu::add_rmsnorm_backward(sum.data(), w.data(), rstd.data(), dy.data(), dsum.data(), dx_fused.data(),
                                   dw_fused.data(), rows, cols);
  CHECK(dx_fused == dx);
  CHECK(dw_fused == dw);

  SUBCASE("dx may overwrite dy; a null dw skips the weight gradient") {
    std::vector<float> in_place = dy;
    qlora::cpu::add_rmsnorm_backward(sum.data(), w.data(), rstd.data(), in_place.data(), dsum.data(), in_place.data(),
                                     static_cast<float*>(nullptr), rows, cols);
    CHECK(in_place == dx);
  }
}

TEST_CASE("add_rmsnorm: gradients of x, residual and w match float64 finite differences") {
  const std::int64_t rows = 3, cols = 8, n = rows * cols;
  const float eps = 1e-5f;
  const auto inputs = random_vector<double>(2 * n + cols, 31, -2.0, 2.0);  // [x; residual; w]
  const auto c_sum = random_vector<double>(n, 32);                           // L = c_sum . sum + c_y . y
  const auto c_y = random_vector<double>(n, 33);
  auto loss = [&](std::span<const double> in) {
    std::vector<double> sum(n), y(n), rstd(rows);
    qlora::cpu::add_rmsnorm_forward(in.data(), in.data() + n, in.data() + 2 * n, sum.data(), y.data(), rstd.data(),
                                    rows, cols, eps);
    return dot(c_sum, sum) + dot(c_y, y);
  };
  const double* w = inputs.data() + 2 * n;
  std::vector<double> sum(n), y(n), rstd(rows);
  qlora::cpu::add_rmsnorm_forward(inputs.data(), inputs.data() + n, w, sum.data(), y.data(), rstd.data(), rows, cols,
                                  eps);
  std::vector<double> dsum(n), dw(cols, 0.0);
  qlora::cpu::add_rmsnorm_backward(sum.data(), w, rstd.data(), c_y.data(), c_sum.data(), dsum.data(), dw.data(), rows,
                                   cols);
  std::vector<double> grad = dsum;  // d/dx = d/dresidual = d/dsum
  grad.insert(grad.end(), dsum.begin(), dsum.end());
  grad.insert(grad.end(), dw.begin(), dw.end());
  CHECK(relative_error(grad, numerical_gradient(loss, inputs)) < 1e-6);
}
