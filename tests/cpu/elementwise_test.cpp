#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "qlora/cpu/elementwise.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

TEST_CASE("elementwise: add, mul, scale, axpy match direct formulas, also in place") {
  const std::int64_t n = 1000;
  const auto a = random_vector<float>(n, 1), b = random_vector<float>(n, 2);
  std::vector<float> y(n);
  qlora::cpu::add(a.data(), b.data(), y.data(), n);
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(y[i] == a[i] + b[i]);
  qlora::cpu::mul(a.data(), b.data(), y.data(), n);
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(y[i] == a[i] * b[i]);
  qlora::cpu::scale(a.data(), -2.5f, y.data(), n);
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(y[i] == -2.5f * a[i]);
  std::vector<float> acc = b;
  qlora::cpu::axpy(0.75f, a.data(), acc.data(), n);
  // Approx, not ==: a compiler may fuse this multiply-add (FMA) in one place and not the other.
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(acc[i] == doctest::Approx(b[i] + 0.75f * a[i]).epsilon(1e-6));

  // Output aliasing an input: y = a + y, y = y * y.
  std::vector<float> z = b;
  qlora::cpu::add(a.data(), z.data(), z.data(), n);
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(z[i] == a[i] + b[i]);
  z = b;
  qlora::cpu::mul(z.data(), z.data(), z.data(), n);
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(z[i] == b[i] * b[i]);
}

TEST_CASE("elementwise: silu and swiglu forward match x / (1 + exp(-x)) computed in double") {
  const std::int64_t n = 1000;
  auto x = random_vector<float>(n, 3, -8.0, 8.0);
  const auto up = random_vector<float>(n, 4);
  x[0] = -100.0f;  // sigmoid underflows to 0: silu must be -0, not NaN
  x[1] = 100.0f;
  std::vector<float> y(n), s(n);
  std::vector<double> expected_silu(n), expected_swiglu(n);
  for (std::int64_t i = 0; i < n; ++i) {
    expected_silu[i] = double(x[i]) / (1.0 + std::exp(-double(x[i])));
    expected_swiglu[i] = expected_silu[i] * double(up[i]);
  }
  qlora::cpu::silu_forward(x.data(), y.data(), n);
  qlora::cpu::swiglu_forward(x.data(), up.data(), s.data(), n);
  CHECK(qlora::test::rel_error(y, expected_silu) < 1e-6);
  CHECK(qlora::test::rel_error(s, expected_swiglu) < 1e-6);
  CHECK(y[0] == 0.0f);
  CHECK(y[1] == 100.0f);
}

TEST_CASE("elementwise: silu backward matches float64 finite differences") {
  const std::int64_t n = 64;
  const auto x = random_vector<double>(n, 5, -4.0, 4.0);
  const auto c = random_vector<double>(n, 6);  // L = c . silu(x), so dL/dy = c
  auto loss = [&](std::span<const double> xs) {
    std::vector<double> y(n);
    qlora::cpu::silu_forward(xs.data(), y.data(), n);
    return dot(c, y);
  };
  std::vector<double> dx(n);
  qlora::cpu::silu_backward(x.data(), c.data(), dx.data(), n);
  CHECK(relative_error(dx, numerical_gradient(loss, x)) < 1e-6);
}

TEST_CASE("elementwise: swiglu backward matches float64 finite differences") {
  const std::int64_t n = 64;
  const auto inputs = random_vector<double>(2 * n, 7, -4.0, 4.0);  // [gate; up]
  const auto c = random_vector<double>(n, 8);
  auto loss = [&](std::span<const double> in) {
    std::vector<double> y(n);
    qlora::cpu::swiglu_forward(in.data(), in.data() + n, y.data(), n);
    return dot(c, y);
  };
  std::vector<double> grad(2 * n);  // [dgate; dup]
  qlora::cpu::swiglu_backward(inputs.data(), inputs.data() + n, c.data(), grad.data(), grad.data() + n, n);
  CHECK(relative_error(grad, numerical_gradient(loss, inputs)) < 1e-6);

  // In place: dgate over gate and dup over up gives the same values.
  std::vector<double> in_place = inputs;
  qlora::cpu::swiglu_backward(in_place.data(), in_place.data() + n, c.data(), in_place.data(), in_place.data() + n,
                              n);
  CHECK(in_place == grad);
}
