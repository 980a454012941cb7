// Per-token and per-tensor activation fake quantization (quant/activation_quant.hpp) against the direct
// formula written out here in double (w4a8-aqas-slac-dint.md, "W4A8 forward": scale = absmax / 127): values
// on the grid, the codes' range, the error bound scale/2, idempotence, zero rows, and refusals.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "qlora/quant/activation_quant.hpp"
#include "support/files.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {

// Activations with per-channel spread and a few outlier channels (what makes per-token absmax coarse).
std::vector<double> activations(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::vector<double> x = test::random_vector<double>(std::size_t(rows * cols), seed, -1.0, 1.0);
  for (std::int64_t i = 0; i < rows * cols; ++i)
    if (i % cols == 3 || i % cols == 17) x[std::size_t(i)] *= 20.0;
  return x;
}

struct Reference {
  std::vector<double> y, scale;
};

// The formula, row by row, in double: scale = absmax / qmax, q = clamp(round-half-even(x / scale)).
Reference reference_per_token(const std::vector<double>& x, std::int64_t rows, std::int64_t cols, int bits) {
  const double qmax = std::pow(2.0, bits - 1) - 1;
  Reference r{std::vector<double>(x.size()), std::vector<double>(std::size_t(rows))};
  for (std::int64_t i = 0; i < rows; ++i) {
    double absmax = 0;
    for (std::int64_t j = 0; j < cols; ++j) absmax = std::max(absmax, std::fabs(x[std::size_t(i * cols + j)]));
    const double scale = absmax / qmax;
    r.scale[std::size_t(i)] = scale;
    for (std::int64_t j = 0; j < cols; ++j) {
      const double v = x[std::size_t(i * cols + j)];
      r.y[std::size_t(i * cols + j)] = scale == 0 ? 0.0 : std::clamp(std::nearbyint(v / scale), -qmax, qmax) * scale;
    }
  }
  return r;
}

}  // namespace

TEST_CASE("activation quant: per-token values equal the direct formula, f64 and f32, 4..8 bits") {
  const std::int64_t rows = 9, cols = 40;
  const std::vector<double> x = activations(rows, cols, 11);
  for (int bits = 4; bits <= 8; ++bits) {
    CAPTURE(bits);
    const Reference ref = reference_per_token(x, rows, cols, bits);
    // f64: the same formula in the same precision, so equal to the last bit.
    const Tensor y64 = quant::fake_quantize_per_token(Tensor::from(x, Shape{rows, cols}), bits);
    CHECK(y64.to_vector<double>() == ref.y);
    // f32 input: the reference on the f32 values. The scale and q * scale are rounded to f32 once each, so
    // the same code gives a value within 2 f32 roundings (2^-23 relative); another code would be a scale off.
    std::vector<float> xf(x.begin(), x.end());
    const Reference ref32 = reference_per_token(std::vector<double>(xf.begin(), xf.end()), rows, cols, bits);
    const std::vector<float> y32 = quant::fake_quantize_per_token(Tensor::from(xf, Shape{rows, cols}), bits).to_vector<float>();
    for (std::int64_t i = 0; i < rows * cols; ++i)
      REQUIRE(std::fabs(double(y32[std::size_t(i)]) - ref32.y[std::size_t(i)]) <= 0x1p-23 * std::fabs(ref32.y[std::size_t(i)]));
  }
}

TEST_CASE("activation quant: outputs lie on the grid, reach +-qmax, and are within scale/2 of the input") {
  const std::int64_t rows = 6, cols = 64;
  const std::vector<double> x = activations(rows, cols, 12);
  for (int bits : {4, 6, 8}) {
    CAPTURE(bits);
    const double qmax = std::pow(2.0, bits - 1) - 1;
    const std::vector<double> y = quant::fake_quantize_per_token(Tensor::from(x, Shape{3, 2, cols}), bits).to_vector<double>();
    for (std::int64_t r = 0; r < rows; ++r) {
      double absmax = 0;
      for (std::int64_t j = 0; j < cols; ++j) absmax = std::max(absmax, std::fabs(x[std::size_t(r * cols + j)]));
      const double scale = absmax / qmax;
      double max_code = 0;
      for (std::int64_t j = 0; j < cols; ++j) {
        const double v = x[std::size_t(r * cols + j)], q = y[std::size_t(r * cols + j)] / scale;
        CHECK(std::fabs(q - std::nearbyint(q)) < 1e-9);  // an integer multiple of the row's scale
        CHECK(std::fabs(q) <= qmax + 1e-9);
        CHECK(std::fabs(y[std::size_t(r * cols + j)] - v) <= 0.5 * scale * (1 + 1e-12));
        max_code = std::max(max_code, std::fabs(q));
      }
      CHECK(std::nearbyint(max_code) == qmax);  // the absmax element maps to +-qmax exactly
    }
  }
}

TEST_CASE("activation quant: idempotent, and an all-zero row stays zero") {
  const std::int64_t rows = 5, cols = 33;
  std::vector<double> x = activations(rows, cols, 13);
  for (std::int64_t j = 0; j < cols; ++j) x[std::size_t(2 * cols + j)] = 0.0;  // row 2: all zeros
  for (int bits : {4, 8}) {
    CAPTURE(bits);
    const Tensor once = quant::fake_quantize_per_token(Tensor::from(x, Shape{rows, cols}), bits);
    const Tensor twice = quant::fake_quantize_per_token(once, bits);
    const std::vector<double> a = once.to_vector<double>(), b = twice.to_vector<double>();
    // The second pass finds absmax = qmax * scale again: the same codes, the same scale up to one rounding.
    for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(std::fabs(a[i] - b[i]) <= 1e-15 * 20.0);
    for (std::int64_t j = 0; j < cols; ++j) CHECK(a[std::size_t(2 * cols + j)] == 0.0);
    // f32 as well.
    std::vector<float> xf(x.begin(), x.end());
    const Tensor once32 = quant::fake_quantize_per_token(Tensor::from(xf, Shape{rows, cols}), bits);
    const std::vector<float> a32 = once32.to_vector<float>(),
                             b32 = quant::fake_quantize_per_token(once32, bits).to_vector<float>();
    for (std::size_t i = 0; i < a32.size(); ++i) REQUIRE(std::fabs(a32[i] - b32[i]) <= 4e-6f * 20.f);
  }
}

TEST_CASE("activation quant: per-tensor static scale saturates beyond qmax * scale") {
  const std::vector<double> x = {-3.0, -0.26, 0.0, 0.1, 0.24, 0.76, 1.27, 5.0};
  const float scale = quant::per_tensor_scale(1.27, 8);  // 1.27 / 127 = 0.01
  CHECK(scale == doctest::Approx(0.01).epsilon(1e-6));
  const std::vector<double> y = quant::fake_quantize_per_tensor(Tensor::from(x, Shape{2, 4}), scale, 8).to_vector<double>();
  const double s = double(scale);
  const std::vector<double> expected = {-127 * s, -26 * s, 0.0, 10 * s, 24 * s, 76 * s, 127 * s, 127 * s};
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(y[i] == doctest::Approx(expected[i]).epsilon(1e-12));
  // 4 bits: qmax 7.
  const std::vector<double> y4 = quant::fake_quantize_per_tensor(Tensor::from(x, Shape{8}), 0.25f, 4).to_vector<double>();
  CHECK(y4 == std::vector<double>{-1.75, -0.25, 0.0, 0.0, 0.25, 0.75, 1.25, 1.75});
}

TEST_CASE("activation quant: bad bit widths and scales are refused with a message") {
  const Tensor x = Tensor::from(std::vector<float>{1.f, 2.f}, Shape{1, 2});
  CHECK(test::error_of([&] { quant::fake_quantize_per_token(x, 3); }).find("activation bits must be 4..8, got 3") !=
        std::string::npos);
  CHECK(test::error_of([&] { quant::fake_quantize_per_token(x, 9); }).find("got 9") != std::string::npos);
  CHECK(test::error_of([&] { quant::fake_quantize_per_tensor(x, 0.f); }).find("scale must be finite and positive") !=
        std::string::npos);
  CHECK(test::error_of([&] { quant::fake_quantize_per_token(Tensor()); }).find("undefined") != std::string::npos);
}
