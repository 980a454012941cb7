// CUDA softmax forward and backward against the CPU twin, in f32 and bf16.

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/softmax.hpp"
#include "qlora/cuda/softmax.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

TEST_CASE_TEMPLATE("cuda softmax: forward and backward match the CPU twin", T, float, qlora::bf16) {
  constexpr double tolerance = qlora::test::output_tolerance<T>;
  for (const std::int64_t cols : {7, 1000, 5003}) {
    CAPTURE(cols);
    const std::int64_t rows = 19;
    const auto x = random_exact<T>(rows * cols, 40 + cols, -6.0, 6.0);
    DeviceBuffer<T> x_dev(to_storage<T>(x)), y_dev(rows * cols);

    std::vector<float> y(rows * cols);
    qlora::cpu::softmax_forward(x.data(), y.data(), rows, cols);
    y_dev.poison();
    qlora::cuda::softmax_forward(x_dev.data(), y_dev.data(), rows, cols, nullptr);
    CHECK(rel_error(to_floats(y_dev.download()), y) < tolerance);

    // The backward gets the same y on both sides: the reference's, rounded to T.
    const auto y_in = to_floats(to_storage<T>(y));
    const auto dy = random_exact<T>(rows * cols, 50 + cols);
    DeviceBuffer<T> y_in_dev(to_storage<T>(y_in)), dy_dev(to_storage<T>(dy)), dx_dev(rows * cols);
    std::vector<float> dx(rows * cols);
    qlora::cpu::softmax_backward(y_in.data(), dy.data(), dx.data(), rows, cols);
    dx_dev.poison();
    qlora::cuda::softmax_backward(y_in_dev.data(), dy_dev.data(), dx_dev.data(), rows, cols, nullptr);
    CHECK(rel_error(to_floats(dx_dev.download()), dx) < tolerance);

    // In place: dx overwrites dy.
    qlora::cuda::softmax_backward(y_in_dev.data(), dy_dev.data(), dy_dev.data(), rows, cols, nullptr);
    CHECK(rel_error(to_floats(dy_dev.download()), dx) < tolerance);
  }
}
