// The INT-b group quantizer with GPTQ's grid (baselines.md section 1), through its CPU twin.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "qlora/core/half.hpp"
#include "qlora/cpu/quant_int.hpp"
#include "support/random.hpp"

using qlora::cpu::decode_int;
using qlora::cpu::encode_int;
using qlora::cpu::int_qmax;
using qlora::cpu::IntGrid;
using qlora::cpu::IntKind;
using qlora::cpu::quantize_int_group;

namespace {

using qlora::test::gaussian;

double f16_round(double x) { return double(qlora::to_float(qlora::to_f16(float(x)))); }

}  // namespace

TEST_CASE("quant int: a hand-computed asymmetric 4-bit group") {
  // lo = -0.3, hi = 0.45: scale = 0.75 / 15 = 0.05, which f16 stores as 1638/2^15 = 0.04998779296875;
  // zero = round(0.3 / 0.0499878) = round(6.0015) = 6; codes round(w / scale) + 6 = {0, 8, 15, 10}.
  const std::vector<float> w = {-0.3f, 0.1f, 0.45f, 0.2f};
  std::vector<std::uint8_t> codes(4);
  const IntGrid g = quantize_int_group(IntKind::asym, 4, false, w.data(), 4, codes.data());
  CHECK(g.scale == 0.04998779296875f);
  CHECK(g.zero == 6.f);
  CHECK(codes == std::vector<std::uint8_t>{0, 8, 15, 10});
  CHECK(decode_int(IntKind::asym, 4, 15, g) == float(0.04998779296875 * 9));
}

TEST_CASE("quant int: the range contains 0 (GPTQ), and the symmetric grid is centred") {
  // All positive: lo is widened to 0, so zero = 0 and the largest value gets code qmax.
  const std::vector<float> pos = {0.5f, 0.75f, 1.0f};
  std::vector<std::uint8_t> codes(3);
  IntGrid g = quantize_int_group(IntKind::asym, 3, false, pos.data(), 3, codes.data());
  CHECK(g.zero == 0.f);
  CHECK(g.scale == float(f16_round(1.0 / 7)));
  CHECK(codes[2] == 7);
  // Symmetric: hi = max(|lo|, hi) = 0.8, scale = 1.6 / 15 (f16: 0.10668945), zero = 8;
  // -0.8 / 0.10668945 = -7.498 rounds to -7: code 1. 0.4 / s = 3.749 -> 4: code 12.
  const std::vector<float> mixed = {-0.8f, 0.1f, 0.4f};
  g = quantize_int_group(IntKind::sym, 4, false, mixed.data(), 3, codes.data());
  CHECK(g.zero == 8.f);
  CHECK(g.scale == float(f16_round(1.6 / 15)));
  CHECK(codes == std::vector<std::uint8_t>{1, 9, 12});
}

TEST_CASE("quant int: dequantized values are on the grid and re-quantization is idempotent") {
  for (IntKind kind : {IntKind::asym, IntKind::sym, IntKind::dint}) {
    for (int bits : {2, 3, 4, 8}) {
      if (kind == IntKind::dint && bits != 3 && bits != 4) continue;
      CAPTURE(int(kind));
      CAPTURE(bits);
      const int qmax = int_qmax(kind, bits);
      for (std::uint64_t seed = 0; seed < 20; ++seed) {
        const auto w = gaussian(64, 100 + seed);
        std::vector<std::uint8_t> codes(64);
        const IntGrid g = quantize_int_group(kind, bits, false, w.data(), 64, codes.data());
        REQUIRE(g.scale > 0.f);
        REQUIRE(double(g.scale) == f16_round(g.scale));  // the scale is an f16 value
        REQUIRE(g.zero == std::nearbyint(g.zero));
        REQUIRE(g.zero >= 0.f);
        REQUIRE(g.zero <= float(qmax));
        for (std::size_t j = 0; j < w.size(); ++j) {
          const std::uint8_t c = codes[j];
          REQUIRE(int(c) < (1 << bits));
          // The grid, computed in double: scale * (code - zero), or +-scale/2 for dINT's extra codes.
          const double level = c <= qmax ? double(c) - double(g.zero) : (c == qmax + 1 ? 0.5 : -0.5);
          const float w_hat = decode_int(kind, bits, c, g);
          REQUIRE(double(w_hat) == double(g.scale) * level);
          REQUIRE(encode_int(kind, bits, w_hat, g) == c);
        }
      }
    }
  }
}

TEST_CASE("quant int: |w - w_hat| <= scale/2 inside the grid's range") {
  for (IntKind kind : {IntKind::asym, IntKind::sym}) {
    for (int bits : {2, 3, 4, 8}) {
      CAPTURE(int(kind));
      CAPTURE(bits);
      const int qmax = int_qmax(kind, bits);
      std::int64_t inside = 0, total = 0;
      for (std::uint64_t seed = 0; seed < 20; ++seed) {
        const auto w = qlora::test::random_vector<float>(128, 200 + seed, -0.05, 0.08);
        std::vector<std::uint8_t> codes(128);
        const IntGrid g = quantize_int_group(kind, bits, false, w.data(), 128, codes.data());
        const double s = g.scale, lowest = s * (0 - g.zero), highest = s * (qmax - g.zero);
        for (std::size_t j = 0; j < w.size(); ++j) {
          ++total;
          if (w[j] < lowest - s / 2 || w[j] > highest + s / 2) continue;
          ++inside;
          REQUIRE(std::fabs(double(w[j]) - double(decode_int(kind, bits, codes[j], g))) <= s / 2 * (1 + 1e-6));
        }
      }
      // The asymmetric grid spans [lo, hi] up to the f16 rounding of its scale: nearly every value is inside.
      if (kind == IntKind::asym) CHECK(double(inside) >= 0.99 * double(total));
    }
  }
}

TEST_CASE("quant int: constant and all-zero groups give finite grids") {
  for (IntKind kind : {IntKind::asym, IntKind::sym, IntKind::dint}) {
    for (int bits : {3, 4}) {
      for (float value : {0.f, 0.37f, -2.5f, 1e-6f, -1e-30f}) {
        CAPTURE(int(kind));
        CAPTURE(bits);
        CAPTURE(value);
        const std::vector<float> w(32, value);
        std::vector<std::uint8_t> codes(32);
        const IntGrid g = quantize_int_group(kind, bits, false, w.data(), 32, codes.data());
        CHECK(std::isfinite(g.scale));
        CHECK(g.scale > 0.f);
        CHECK(std::isfinite(g.zero));
        const float w_hat = decode_int(kind, bits, codes[0], g);
        CHECK(std::isfinite(w_hat));
        if (value == 0.f) CHECK(w_hat == 0.f);
        // GPTQ's grid contains the constant within half a step (its range is [min(c, 0), max(c, 0)]), as
        // long as the scale is a normal f16 (a range below ~1e-4 gets a subnormal, coarser scale).
        if (kind == IntKind::asym && std::fabs(value) >= 1e-3f) CHECK(std::fabs(double(w_hat) - double(value)) <= double(g.scale) / 2 * (1 + 1e-6));
      }
    }
  }
  // The all-zero group gets GPTQ's range [-1, 1]: scale 2 / qmax.
  const std::vector<float> zeros(16, 0.f);
  std::vector<std::uint8_t> codes(16);
  const IntGrid g = quantize_int_group(IntKind::asym, 4, false, zeros.data(), 16, codes.data());
  CHECK(g.scale == float(f16_round(2.0 / 15)));
  CHECK(g.zero == 8.f);  // round(1 / 0.1333) = round(7.5) = 8, half to even
}

TEST_CASE("quant int: the MSE range search never increases the 2.4-norm error and helps on Gaussian groups") {
  for (IntKind kind : {IntKind::asym, IntKind::sym, IntKind::dint}) {
    for (int bits : {2, 3, 4}) {
      if (kind == IntKind::dint && bits == 2) continue;
      CAPTURE(int(kind));
      CAPTURE(bits);
      double sq_plain = 0, sq_mse = 0;
      for (std::uint64_t seed = 0; seed < 30; ++seed) {
        const auto w = gaussian(128, 300 + seed);
        std::vector<std::uint8_t> plain(128), searched(128);
        const IntGrid gp = quantize_int_group(kind, bits, false, w.data(), 128, plain.data());
        const IntGrid gs = quantize_int_group(kind, bits, true, w.data(), 128, searched.data());
        double e_plain = 0, e_mse = 0;
        for (std::size_t j = 0; j < w.size(); ++j) {
          const double dp = double(w[j]) - double(decode_int(kind, bits, plain[j], gp));
          const double ds = double(w[j]) - double(decode_int(kind, bits, searched[j], gs));
          e_plain += std::pow(std::fabs(dp), 2.4);
          e_mse += std::pow(std::fabs(ds), 2.4);
          sq_plain += dp * dp;
          sq_mse += ds * ds;
        }
        REQUIRE(e_mse <= e_plain);
        REQUIRE(gs.scale <= gp.scale);  // the search only shrinks the range
      }
      // Gaussian tails make clipping worth it at low bits (a statistical check with fixed seeds).
      CHECK(sq_mse < sq_plain);
    }
  }
}
