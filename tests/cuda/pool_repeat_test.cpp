// CUDA adapter pooling / repetition and dropout against their CPU twins, in f32 and bf16.

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/dropout.hpp"
#include "qlora/cpu/pool_repeat.hpp"
#include "qlora/cuda/dropout.hpp"
#include "qlora/cuda/pool_repeat.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

TEST_CASE_TEMPLATE("cuda pool_repeat: group_sum and repeat_add match the CPU twin", T, float, qlora::bf16) {
  // f32: same f32 sum in the same order, exact. bf16: the twin rounds only at the end as well.
  const double tolerance = std::is_same_v<T, float> ? 1e-7 : qlora::test::output_tolerance<T>;
  const std::int64_t rows = 300;
  for (const std::int64_t group : {2, 8, 32, 128}) {
    CAPTURE(group);
    const std::int64_t cols = group * 37;
    const auto x = random_exact<T>(rows * cols, 70 + group);
    DeviceBuffer<T> x_dev(to_storage<T>(x)), pooled_dev(rows * cols / group);
    pooled_dev.poison();
    qlora::cuda::group_sum(x_dev.data(), pooled_dev.data(), rows, cols, group, 1.0f / float(group), nullptr);
    std::vector<float> pooled(rows * cols / group);
    qlora::cpu::group_sum(x.data(), pooled.data(), rows, cols, group, 1.0f / float(group));
    CHECK(rel_error(to_floats(pooled_dev.download()), pooled) <= tolerance);

    const auto h = random_exact<T>(rows * cols / group, 80 + group);
    DeviceBuffer<T> h_dev(to_storage<T>(h)), y_dev(to_storage<T>(x));
    std::vector<float> y = x;
    qlora::cuda::repeat_add(h_dev.data(), y_dev.data(), rows, cols, group, 0.25f, nullptr);
    qlora::cpu::repeat_add(h.data(), y.data(), rows, cols, group, 0.25f);
    CHECK(rel_error(to_floats(y_dev.download()), y) <= qlora::test::output_tolerance<T>);
  }
}

TEST_CASE_TEMPLATE("cuda dropout: drops the same elements as the CPU twin", T, float, qlora::bf16) {
  const std::int64_t n = 100003;
  const auto x = random_exact<T>(n, 90, 0.5, 1.5);
  DeviceBuffer<T> x_dev(to_storage<T>(x)), y_dev(n);
  y_dev.poison();
  qlora::cuda::dropout(x_dev.data(), y_dev.data(), n, 0.3f, 1234, 77, nullptr);
  std::vector<float> y(n);
  qlora::cpu::dropout(x.data(), y.data(), n, 0.3f, 1234, 77);
  const auto got = to_floats(y_dev.download());
  std::int64_t mask_mismatches = 0;
  for (std::int64_t i = 0; i < n; ++i) mask_mismatches += (got[i] == 0.f) != (y[i] == 0.f);
  CHECK(mask_mismatches == 0);
  CHECK(rel_error(got, y) <= qlora::test::output_tolerance<T>);
}
