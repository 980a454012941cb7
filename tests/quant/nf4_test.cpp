// NF4 block quantization and QLoRA double quantization (baselines.md section 2), through the CPU twin.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "qlora/cpu/quant_nf4.hpp"
#include "qlora/quant/quant.hpp"
#include "support/random.hpp"

using qlora::Tensor;
using qlora::cpu::kNf4Levels;
using qlora::cpu::kNf4Midpoints;
using qlora::cpu::nf4_encode;
using qlora::quant::QuantConfig;

namespace {

using qlora::test::gaussian;

}  // namespace

TEST_CASE("quant nf4: the table is QLoRA's, sorted, with an exact zero") {
  // The 16 values as printed in baselines.md section 2 (from bitsandbytes / QLoRA), as doubles.
  const double table[16] = {-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};
  for (int k = 0; k < 16; ++k) {
    CHECK(kNf4Levels[k] == float(table[k]));
    CHECK(double(kNf4Levels[k]) == doctest::Approx(table[k]).epsilon(1e-7));
    if (k > 0) CHECK(kNf4Levels[k - 1] < kNf4Levels[k]);
  }
  CHECK(kNf4Levels[qlora::cpu::kNf4ZeroCode] == 0.f);
  CHECK(std::signbit(kNf4Levels[qlora::cpu::kNf4ZeroCode]) == false);
  for (int k = 0; k < 15; ++k) CHECK(kNf4Midpoints[k] == (kNf4Levels[k] + kNf4Levels[k + 1]) * 0.5f);
}

TEST_CASE("quant nf4: encode picks the nearest level, ties go to the lower level") {
  for (int k = 0; k < 16; ++k) CHECK(nf4_encode(kNf4Levels[k]) == k);
  for (int k = 0; k < 15; ++k) {
    CHECK(nf4_encode(kNf4Midpoints[k]) == k);  // exactly on the midpoint: lower level
    CHECK(nf4_encode(std::nextafter(kNf4Midpoints[k], 2.f)) == k + 1);
  }
  const auto xs = qlora::test::random_vector<float>(2000, 21, -1.0, 1.0);
  for (float x : xs) {
    const int code = nf4_encode(x);
    for (int k = 0; k < 16; ++k) REQUIRE(std::fabs(x - kNf4Levels[code]) <= std::fabs(x - kNf4Levels[k]));
  }
}

TEST_CASE("quant nf4: dequant(quant(NF4[k] * c)) == NF4[k] * c exactly") {
  for (float c : {1.f, 0.037f, 3.5f, 1e-3f}) {
    CAPTURE(c);
    std::vector<float> w(4 * 64);
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = kNf4Levels[(i * 7) % 16] * c;  // each block holds +-c
    const auto q = qlora::quant::quantize(Tensor::from(w, {4, 64}), QuantConfig::parse("nf4-nodq"));
    CHECK(q.scales.to_vector<float>() == std::vector<float>(4, c));
    CHECK(qlora::quant::dequantize(q).to_vector<float>() == w);
  }
}

TEST_CASE("quant nf4: double quantization round trip of the block constants is within 1e-2") {
  // Realistic weights: Gaussian, sigma 0.02, 256 x 1024 with blocks of 64: 4096 constants, 16 DQ blocks.
  const std::int64_t rows = 256, cols = 1024;
  const auto w = gaussian(std::size_t(rows * cols), 22);
  const Tensor wt = Tensor::from(w, {rows, cols});
  const auto exact = qlora::quant::quantize(wt, QuantConfig::parse("nf4-nodq"));
  const auto dq = qlora::quant::quantize(wt, QuantConfig::parse("nf4"));
  const auto c = exact.scales.to_vector<float>();
  const std::int64_t n = std::int64_t(c.size());
  REQUIRE(n == rows * cols / 64);
  // The mean, computed independently in double.
  double sum = 0;
  for (float v : c) sum += v;
  CHECK(dq.absmax_mean == float(sum / double(n)));
  std::vector<float> c_hat(c.size());
  qlora::cpu::double_quant_decode(dq.absmax_codes.data<std::uint8_t>(), dq.absmax_scales.data<float>(),
                                  dq.absmax_mean, n, c_hat.data());
  CHECK(qlora::test::rel_error(c_hat, c) < 1e-2);
  const auto block_scales = dq.absmax_scales.to_vector<float>();
  for (std::int64_t i = 0; i < n; ++i) {
    // Each constant is within half an 8-bit step (absmax2 / 127 / 2) of the original, and relatively close.
    REQUIRE(std::fabs(double(c_hat[i]) - double(c[i])) <= double(block_scales[i / 256]) / 254 * 1.001 + 1e-9);
    REQUIRE(std::fabs(double(c_hat[i]) - double(c[i])) < 1e-2 * double(c[i]));
  }
  // The 4-bit codes are the same with and without DQ (they use the exact constant), the values differ little.
  CHECK(dq.codes.to_vector<std::uint8_t>() == exact.codes.to_vector<std::uint8_t>());
  CHECK(qlora::test::rel_error(qlora::quant::dequantize(dq).to_vector<float>(),
                               qlora::quant::dequantize(exact).to_vector<float>()) < 1e-2);
}

TEST_CASE("quant nf4: DQ decode is divide, multiply, add in f32") {
  // Code 127 + 64 -> q = 64: ((64 / 127) * 0.5) + 0.25, each step rounded to f32.
  const float unit = 64.f / 127.f;
  const float scaled = unit * 0.5f;
  CHECK(qlora::cpu::double_quant_decode_one(191, 0.5f, 0.25f) == scaled + 0.25f);
  CHECK(qlora::cpu::double_quant_decode_one(127, 0.5f, 0.25f) == 0.25f);
  CHECK(qlora::cpu::double_quant_decode_one(254, 0.5f, 0.25f) == 0.75f);
  CHECK(qlora::cpu::double_quant_decode_one(0, 0.5f, 0.25f) == -0.25f);
}

TEST_CASE("quant nf4: dequantized values are NF4[code] * c and errors are bounded") {
  const std::int64_t rows = 6, cols = 200;  // 200 = 3 * 64 + 8: a short last block
  const auto w = gaussian(std::size_t(rows * cols), 23);
  for (const char* name : {"nf4", "nf4-nodq", "nf4-g32", "nf4-g0"}) {
    CAPTURE(std::string(name));
    const auto q = qlora::quant::quantize(Tensor::from(w, {rows, cols}), QuantConfig::parse(name));
    const auto w_hat = qlora::quant::dequantize(q).to_vector<float>();
    std::vector<std::uint8_t> codes(std::size_t(rows * cols));
    qlora::cpu::unpack_codes(q.codes.data<std::uint8_t>(), rows, cols, 4, codes.data());
    const std::int64_t group = q.group_size(), gpr = q.groups_per_row();
    std::vector<float> c(std::size_t(rows * gpr));
    if (q.config.double_quant)
      qlora::cpu::double_quant_decode(q.absmax_codes.data<std::uint8_t>(), q.absmax_scales.data<float>(), q.absmax_mean,
                                      rows * gpr, c.data());
    else
      c = q.scales.to_vector<float>();
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t j = 0; j < cols; ++j) {
        const std::size_t i = std::size_t(r * cols + j);
        const float block_c = c[std::size_t(r * gpr + j / group)];
        REQUIRE(w_hat[i] == kNf4Levels[codes[i]] * block_c);
        // Half the widest gap between NF4 levels (-0.6962 - -1) / 2 < 0.152 of c, plus up to 1% of c for DQ.
        REQUIRE(std::fabs(double(w[i]) - double(w_hat[i])) <= (0.152 + 0.011) * double(block_c));
      }
    }
  }
}

TEST_CASE("quant nf4: all-zero weights and all-zero blocks give zeros, not NaN") {
  std::vector<float> w(3 * 128, 0.f);
  for (std::size_t j = 64; j < 128; ++j) w[j] = 0.01f * float(j % 5) - 0.02f;  // row 0, block 1 nonzero
  for (const char* name : {"nf4", "nf4-nodq"}) {
    const auto q = qlora::quant::quantize(Tensor::from(w, {3, 128}), QuantConfig::parse(name));
    const auto w_hat = qlora::quant::dequantize(q).to_vector<float>();
    for (std::size_t i = 0; i < w.size(); ++i) {
      REQUIRE(std::isfinite(w_hat[i]));
      if (w[i] == 0.f && (i < 64 || i >= 128) && !q.config.double_quant) REQUIRE(w_hat[i] == 0.f);
    }
    const auto zero = qlora::quant::quantize(Tensor::zeros({2, 64}), QuantConfig::parse(name));
    CHECK(qlora::quant::dequantize(zero).to_vector<float>() == std::vector<float>(128, 0.f));
  }
}
