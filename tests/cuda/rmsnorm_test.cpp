// CUDA RMSNorm forward and backward against the CPU twin, in f32 and bf16; the weight gradient accumulates.

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/rmsnorm.hpp"
#include "qlora/cuda/rmsnorm.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

TEST_CASE_TEMPLATE("cuda rmsnorm: forward and backward match the CPU twin", T, float, qlora::bf16) {
  constexpr double tolerance = qlora::test::output_tolerance<T>;
  constexpr float eps = 1e-5f;
  // cols = 16384 needs 64 KiB of shared memory for the weight gradient: the kernel must opt in above 48 KiB.
  for (const std::int64_t cols : {7, 1031, 4096, 16384}) {
    CAPTURE(cols);
    const std::int64_t rows = cols > 4096 ? 9 : 1000;
    const auto x = random_exact<T>(rows * cols, 60 + cols, -2.0, 2.0);
    const auto w = random_exact<T>(cols, 61 + cols, 0.5, 1.5);
    DeviceBuffer<T> x_dev(to_storage<T>(x)), w_dev(to_storage<T>(w)), y_dev(rows * cols);
    DeviceBuffer<float> rstd_dev(rows);

    std::vector<float> y(rows * cols), rstd(rows);
    qlora::cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, cols, eps);
    y_dev.poison();
    rstd_dev.poison();
    qlora::cuda::rmsnorm_forward(x_dev.data(), w_dev.data(), y_dev.data(), rstd_dev.data(), rows, cols, eps, nullptr);
    CHECK(rel_error(to_floats(y_dev.download()), y) < tolerance);
    CHECK(rel_error(rstd_dev.download(), rstd) < 1e-5);  // f32 output

    // Backward from the reference's rstd; dw starts non-zero to check that it accumulates.
    const auto dy = random_exact<T>(rows * cols, 62 + cols);
    const auto dw_start = qlora::test::random_vector<float>(cols, 63 + cols);
    DeviceBuffer<T> dy_dev(to_storage<T>(dy)), dx_dev(rows * cols);
    DeviceBuffer<float> rstd_in_dev(rstd), dw_dev(dw_start);
    std::vector<float> dx(rows * cols), dw = dw_start;
    qlora::cpu::rmsnorm_backward(x.data(), w.data(), rstd.data(), dy.data(), dx.data(), dw.data(), rows, cols);
    dx_dev.poison();
    qlora::cuda::rmsnorm_backward(x_dev.data(), w_dev.data(), rstd_in_dev.data(), dy_dev.data(), dx_dev.data(),
                                  dw_dev.data(), rows, cols, nullptr);
    CHECK(rel_error(to_floats(dx_dev.download()), dx) < tolerance);
    CHECK(rel_error(dw_dev.download(), dw) < 1e-5);  // f32 accumulator

    // Without a weight gradient, and in place (dx overwrites dy).
    qlora::cuda::rmsnorm_backward(x_dev.data(), w_dev.data(), rstd_in_dev.data(), dy_dev.data(), dy_dev.data(),
                                  static_cast<float*>(nullptr), rows, cols, nullptr);
    CHECK(rel_error(to_floats(dy_dev.download()), dx) < tolerance);
  }
}
