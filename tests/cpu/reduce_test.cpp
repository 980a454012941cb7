#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "qlora/cpu/reduce.hpp"
#include "support/random.hpp"

using qlora::test::random_vector;

TEST_CASE("reduce: row_sum, row_max and row_mean match direct loops") {
  const std::int64_t rows = 7, cols = 301;
  const auto x = random_vector<float>(rows * cols, 1, -3.0, 3.0);
  std::vector<double> sum(rows), max(rows);
  for (std::int64_t r = 0; r < rows; ++r) {
    max[r] = x[r * cols];
    for (std::int64_t j = 0; j < cols; ++j) {
      sum[r] += x[r * cols + j];
      max[r] = std::max(max[r], double(x[r * cols + j]));
    }
  }
  std::vector<float> y(rows);
  qlora::cpu::row_sum(x.data(), y.data(), rows, cols);
  for (std::int64_t r = 0; r < rows; ++r) CHECK(y[r] == doctest::Approx(sum[r]).epsilon(1e-6));
  qlora::cpu::row_max(x.data(), y.data(), rows, cols);
  for (std::int64_t r = 0; r < rows; ++r) CHECK(y[r] == max[r]);
  qlora::cpu::row_mean(x.data(), y.data(), rows, cols);
  for (std::int64_t r = 0; r < rows; ++r) CHECK(y[r] == doctest::Approx(sum[r] / cols).epsilon(1e-6));
}

TEST_CASE("reduce: row_max finds a maximum at either end of the row") {
  const std::vector<double> x = {5, -1, 2, -7, -3, 9};  // (2, 3)
  std::vector<double> y(2);
  qlora::cpu::row_max(x.data(), y.data(), 2, 3);
  CHECK(y[0] == 5);
  CHECK(y[1] == 9);
}

TEST_CASE("reduce: sum_squares accumulates into acc") {
  const std::int64_t n = 1001;
  const auto x = random_vector<double>(n, 2);
  double expected = 1.5;  // acc starts non-zero: the call adds, it does not overwrite
  for (double v : x) expected += v * v;
  double acc = 1.5;
  qlora::cpu::sum_squares(x.data(), n, &acc);
  CHECK(acc == doctest::Approx(expected).epsilon(1e-14));

  const auto xf = random_vector<float>(n, 3);
  float accf = 0;
  qlora::cpu::sum_squares(xf.data(), n, &accf);
  qlora::cpu::sum_squares(xf.data(), n, &accf);
  double twice = 0;
  for (float v : xf) twice += 2.0 * double(v) * double(v);
  CHECK(accf == doctest::Approx(twice).epsilon(1e-6));
}
