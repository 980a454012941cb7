// CUDA activation fake quantization (cuda/quant/activation.cu) against its CPU twin
// (cpu/quant_activation.hpp): bit-exact in f32; in bf16 equal to the twin's f32 result on the widened
// inputs, rounded once. Inputs are random, non-zero, with outlier channels; outputs are poisoned first.

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/quant_activation.hpp"
#include "qlora/cuda/quant_activation.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

namespace {

template <class T>
std::vector<float> outlier_activations(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::vector<float> x = qlora::test::random_vector<float>(std::size_t(rows * cols), seed, -1.0, 1.0);
  for (std::int64_t i = 0; i < rows * cols; i += 13) x[std::size_t(i)] *= 30.f;
  return to_floats(to_storage<T>(x));
}

}  // namespace

TEST_CASE_TEMPLATE("cuda activation quant: per token matches the CPU twin", T, float, qlora::bf16) {
  for (const std::int64_t cols : {7, 256, 1031, 4096}) {
    for (int bits : {4, 8}) {
      CAPTURE(cols);
      CAPTURE(bits);
      const std::int64_t rows = cols > 1000 ? 37 : 300;
      const auto x = outlier_activations<T>(rows, cols, 70 + cols);
      std::vector<float> y(x.size());
      qlora::cpu::fake_quantize_per_token(x.data(), y.data(), rows, cols, bits);
      const std::vector<float> expected = to_floats(to_storage<T>(y));  // the f32 result rounded once to T

      DeviceBuffer<T> x_dev(to_storage<T>(x)), y_dev(x.size());
      y_dev.poison();
      qlora::cuda::fake_quantize_per_token(x_dev.data(), y_dev.data(), rows, cols, bits, nullptr);
      CHECK(to_floats(y_dev.download()) == expected);
      // In place.
      qlora::cuda::fake_quantize_per_token(x_dev.data(), x_dev.data(), rows, cols, bits, nullptr);
      CHECK(to_floats(x_dev.download()) == expected);
      CHECK(rel_error(expected, x) < (bits == 8 ? 0.05 : 0.5));  // and the twin did quantize, coarsely
    }
  }
}

TEST_CASE_TEMPLATE("cuda activation quant: static scale matches the CPU twin", T, float, qlora::bf16) {
  const std::int64_t n = 100003;
  const auto x = outlier_activations<T>(1, n, 81);
  for (int bits : {4, 8}) {
    CAPTURE(bits);
    const float scale = 0.05f;  // 8-bit saturates at 6.35, 4-bit at 0.35: both clip the outliers
    std::vector<float> y(x.size());
    qlora::cpu::fake_quantize_with_scale(x.data(), y.data(), n, scale, bits);
    DeviceBuffer<T> x_dev(to_storage<T>(x)), y_dev(x.size());
    y_dev.poison();
    qlora::cuda::fake_quantize_with_scale(x_dev.data(), y_dev.data(), n, scale, bits, nullptr);
    CHECK(to_floats(y_dev.download()) == to_floats(to_storage<T>(y)));
  }
}
