#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "qlora/cpu/convert.hpp"
#include "support/random.hpp"

namespace {

using qlora::bf16;
using qlora::f16;

std::uint16_t bf16_bits(float x) {
  bf16 y;
  qlora::cpu::convert(&x, &y, 1);
  return y.bits;
}

std::uint16_t f16_bits(float x) {
  f16 y;
  qlora::cpu::convert(&x, &y, 1);
  return y.bits;
}

template <class Half>
float half_to_float(std::uint16_t bits) {
  const Half h{bits};
  float y;
  qlora::cpu::convert(&h, &y, 1);
  return y;
}

// A float with the given sign, unbiased exponent and 23-bit mantissa.
float make_float(std::uint32_t sign, int exponent, std::uint32_t mantissa) {
  return std::bit_cast<float>((sign << 31) | (std::uint32_t(exponent + 127) << 23) | mantissa);
}

}  // namespace

TEST_CASE("convert: known bf16 and f16 bit patterns") {
  CHECK(bf16_bits(1.0f) == 0x3F80);
  CHECK(bf16_bits(-2.0f) == 0xC000);
  CHECK(bf16_bits(0.0f) == 0x0000);
  CHECK(bf16_bits(-0.0f) == 0x8000);
  CHECK(f16_bits(1.0f) == 0x3C00);
  CHECK(f16_bits(-2.0f) == 0xC000);
  CHECK(f16_bits(0.5f) == 0x3800);
  CHECK(f16_bits(65504.0f) == 0x7BFF);  // largest finite half
  CHECK(half_to_float<f16>(0x7BFF) == 65504.0f);
  CHECK(half_to_float<bf16>(0x3F80) == 1.0f);
  CHECK(f16_bits(1.0f / 3.0f) == 0x3555);
  CHECK(half_to_float<f16>(0x3555) == 0.333251953125f);
}

TEST_CASE("convert: rounding is to nearest, ties to even") {
  // bf16 keeps 7 mantissa bits: 1 + 2^-8 lies halfway between 0x3F80 (even) and 0x3F81.
  CHECK(bf16_bits(make_float(0, 0, 1u << 15)) == 0x3F80);
  // 1 + 3 * 2^-8 lies halfway between 0x3F81 and 0x3F82 (even).
  CHECK(bf16_bits(make_float(0, 0, 3u << 15)) == 0x3F82);
  // Just above the tie rounds up.
  CHECK(bf16_bits(make_float(0, 0, (1u << 15) + 1)) == 0x3F81);
  // f16 keeps 10 mantissa bits: 1 + 2^-11 ties to 0x3C00, 1 + 3 * 2^-11 ties to 0x3C02.
  CHECK(f16_bits(make_float(0, 0, 1u << 12)) == 0x3C00);
  CHECK(f16_bits(make_float(0, 0, 3u << 12)) == 0x3C02);
  CHECK(f16_bits(make_float(1, 0, (1u << 12) + 1)) == 0xBC01);
  // 65520 is halfway between 65504 and 65536 (which would be the next half): ties to even = infinity.
  CHECK(f16_bits(65519.0f) == 0x7BFF);
  CHECK(f16_bits(65520.0f) == 0x7C00);
  CHECK(f16_bits(-1e6f) == 0xFC00);
}

TEST_CASE("convert: subnormal halves, infinities and NaN") {
  CHECK(f16_bits(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal half
  CHECK(f16_bits(std::ldexp(1.0f, -15)) == 0x0200);
  CHECK(f16_bits(std::ldexp(1.0f, -14)) == 0x0400);  // smallest normal half
  CHECK(f16_bits(std::ldexp(3.0f, -26)) == 0x0001);  // 0.75 ulp rounds up
  CHECK(f16_bits(std::ldexp(1.0f, -25)) == 0x0000);  // half an ulp: ties to even (zero)
  CHECK(f16_bits(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 ulp: ties to even (2)
  CHECK(half_to_float<f16>(0x0001) == std::ldexp(1.0f, -24));
  CHECK(half_to_float<f16>(0x83FF) == -std::ldexp(1023.0f, -24));  // largest subnormal, negative

  const float inf = std::numeric_limits<float>::infinity();
  CHECK(bf16_bits(inf) == 0x7F80);
  CHECK(f16_bits(-inf) == 0xFC00);
  CHECK(half_to_float<f16>(0x7C00) == inf);

  // NaN stays NaN, including a signalling NaN whose payload lies only in the bits that get dropped
  // (plain truncation would turn it into infinity).
  const float nans[] = {std::numeric_limits<float>::quiet_NaN(), std::bit_cast<float>(0x7F800001u),
                        std::bit_cast<float>(0xFF800100u)};
  for (float x : nans) {
    CHECK(std::isnan(half_to_float<bf16>(bf16_bits(x))));
    CHECK(std::isnan(half_to_float<f16>(f16_bits(x))));
  }
}

TEST_CASE("convert: every bf16 and f16 value round-trips through float exactly") {
  std::vector<bf16> b(65536), b2(65536);
  std::vector<f16> h(65536), h2(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) {
    b[i].bits = std::uint16_t(i);
    h[i].bits = std::uint16_t(i);
  }
  std::vector<float> f(65536);
  qlora::cpu::convert(b.data(), f.data(), 65536);
  qlora::cpu::convert(f.data(), b2.data(), 65536);
  int bad_bf16 = 0;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    bad_bf16 += std::isnan(f[i]) ? !std::isnan(half_to_float<bf16>(b2[i].bits)) : b2[i].bits != i;
  }
  qlora::cpu::convert(h.data(), f.data(), 65536);
  qlora::cpu::convert(f.data(), h2.data(), 65536);
  int bad_f16 = 0;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    bad_f16 += std::isnan(f[i]) ? !std::isnan(half_to_float<f16>(h2[i].bits)) : h2[i].bits != i;
  }
  CHECK(bad_bf16 == 0);
  CHECK(bad_f16 == 0);
}

TEST_CASE("convert: f16 matches GCC's _Float16 on random floats from subnormal to overflow") {
  // Exponents from -30 (below the smallest subnormal half, 2^-24) to 17 (above the largest half),
  // every mantissa pattern equally likely, both signs.
  std::mt19937_64 gen(7);
  std::uniform_int_distribution<int> exponent(-30, 17);
  std::uniform_int_distribution<std::uint32_t> mantissa(0, (1u << 23) - 1), sign(0, 1);
  constexpr int n = 200000;
  std::vector<float> x(n);
  for (float& xi : x) xi = make_float(sign(gen), exponent(gen), mantissa(gen));
  std::vector<f16> y(n);
  qlora::cpu::convert(x.data(), y.data(), n);
  int bad_to_f16 = 0;
  for (int i = 0; i < n; ++i) bad_to_f16 += y[i].bits != std::bit_cast<std::uint16_t>(static_cast<_Float16>(x[i]));
  CHECK(bad_to_f16 == 0);

  // And every half back to float (NaN payloads aside).
  int bad_to_float = 0;
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const float expected = static_cast<float>(std::bit_cast<_Float16>(std::uint16_t(i)));
    const float got = half_to_float<f16>(std::uint16_t(i));
    bad_to_float += std::isnan(expected) ? !std::isnan(got) : std::bit_cast<std::uint32_t>(got) !=
                                                                   std::bit_cast<std::uint32_t>(expected);
  }
  CHECK(bad_to_float == 0);
}

TEST_CASE("convert: float and double convert both ways and through bf16") {
  const auto x = qlora::test::random_vector<double>(1000, 11, -100.0, 100.0);
  std::vector<float> f(x.size());
  std::vector<double> back(x.size());
  qlora::cpu::convert(x.data(), f.data(), std::int64_t(x.size()));
  qlora::cpu::convert(f.data(), back.data(), std::int64_t(x.size()));
  for (std::size_t i = 0; i < x.size(); ++i) {
    REQUIRE(f[i] == static_cast<float>(x[i]));
    REQUIRE(back[i] == double(f[i]));
  }
  // double -> bf16 goes through float; bf16 keeps 8 significant bits: half an ulp is <= 2^-8 relative.
  std::vector<bf16> b(x.size());
  qlora::cpu::convert(x.data(), b.data(), std::int64_t(x.size()));
  qlora::cpu::convert(b.data(), back.data(), std::int64_t(x.size()));
  for (std::size_t i = 0; i < x.size(); ++i) REQUIRE(std::abs(back[i] - x[i]) <= std::ldexp(std::abs(x[i]), -8));
  // bf16 -> f16 of values inside the f16 range is exact when bf16 has no more bits than f16 keeps.
  std::vector<f16> h(x.size());
  qlora::cpu::convert(b.data(), h.data(), std::int64_t(x.size()));
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (std::abs(back[i]) >= std::ldexp(1.0, -14)) REQUIRE(half_to_float<f16>(h[i].bits) == float(back[i]));
  }
}

TEST_CASE("convert: fill writes the rounded value everywhere") {
  std::vector<float> f(37, 1.0f);
  qlora::cpu::fill(f.data(), 37, -3.5f);
  for (float v : f) CHECK(v == -3.5f);
  std::vector<double> d(5);
  qlora::cpu::fill(d.data(), 5, 0.1f);
  for (double v : d) CHECK(v == double(0.1f));
  std::vector<bf16> b(9);
  qlora::cpu::fill(b.data(), 9, 1.0f);
  for (bf16 v : b) CHECK(v.bits == 0x3F80);
  std::vector<f16> h(9);
  qlora::cpu::fill(h.data(), 9, 65504.0f);
  for (f16 v : h) CHECK(v.bits == 0x7BFF);
}
