// CUDA row reductions and sum of squares against the CPU twin (f32 results, so f32 tolerances for bf16 inputs).

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/reduce.hpp"
#include "qlora/cuda/reduce.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_storage;

TEST_CASE_TEMPLATE("cuda reduce: row sum, max and mean match the CPU twin", T, float, qlora::bf16) {
  // Short rows (fewer columns than threads), a typical row, a long odd row.
  for (const std::int64_t cols : {5, 1000, 32003}) {
    CAPTURE(cols);
    const std::int64_t rows = 37;
    const auto x = random_exact<T>(rows * cols, 20 + cols, -2.0, 2.0);
    DeviceBuffer<T> x_dev(to_storage<T>(x));
    DeviceBuffer<float> y_dev(rows);
    std::vector<float> expected(rows);

    y_dev.poison();
    qlora::cuda::row_sum(x_dev.data(), y_dev.data(), rows, cols, nullptr);
    qlora::cpu::row_sum(x.data(), expected.data(), rows, cols);
    CHECK(rel_error(y_dev.download(), expected) < 1e-5);

    y_dev.poison();
    qlora::cuda::row_max(x_dev.data(), y_dev.data(), rows, cols, nullptr);
    qlora::cpu::row_max(x.data(), expected.data(), rows, cols);
    CHECK(rel_error(y_dev.download(), expected) == 0.0);  // a max is exact

    y_dev.poison();
    qlora::cuda::row_mean(x_dev.data(), y_dev.data(), rows, cols, nullptr);
    qlora::cpu::row_mean(x.data(), expected.data(), rows, cols);
    CHECK(rel_error(y_dev.download(), expected) < 1e-5);
  }
}

TEST_CASE_TEMPLATE("cuda reduce: sum_squares accumulates like the CPU twin", T, float, qlora::bf16) {
  for (const std::int64_t n : {1, 1000, 3000017}) {
    CAPTURE(n);
    const auto x = random_exact<T>(n, 30 + n);
    DeviceBuffer<T> x_dev(to_storage<T>(x));
    DeviceBuffer<float> acc_dev(std::vector<float>{0.75f});  // accumulates onto what is there
    float expected = 0.75f;
    qlora::cuda::sum_squares(x_dev.data(), n, acc_dev.data(), nullptr);
    qlora::cpu::sum_squares(x.data(), n, &expected);
    CHECK(rel_error(acc_dev.download(), std::vector<float>{expected}) < 1e-5);
  }
}
