// dINT: INT plus two half-step levels (w4a8-aqas-slac-dint.md section 3), through its CPU twin.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "qlora/cpu/quant_int.hpp"

using qlora::cpu::decode_int;
using qlora::cpu::dint_code;
using qlora::cpu::int_grid_from_range;
using qlora::cpu::IntGrid;
using qlora::cpu::IntKind;
using qlora::cpu::quantize_int_group;

namespace {

// A 4-bit group whose grid is exact: lo = -1.5, hi = 1.75 -> s = 3.25 / 13 = 0.25 (an f16 value),
// z = -round(-1.5 / 0.25) = 6. Levels 0.25 * (k - 6) for k = 0..13, code 14 = +0.125, code 15 = -0.125.
std::vector<float> exact_group() {
  std::vector<float> w;
  for (float v = -1.5f; v <= 1.75f; v += 0.125f) w.push_back(v);
  return w;
}

}  // namespace

TEST_CASE("quant dint: the grid follows the method file's rule") {
  const auto w = exact_group();
  std::vector<std::uint8_t> codes(w.size());
  const IntGrid g = quantize_int_group(IntKind::dint, 4, false, w.data(), std::int64_t(w.size()), codes.data());
  CHECK(g.scale == 0.25f);
  CHECK(g.zero == 6.f);
  // The raw min/max is used (no widening to 0): an all-positive group has zero 0.
  const IntGrid pos = int_grid_from_range(IntKind::dint, 4, 0.5f, 1.8f);
  CHECK(pos.zero == 0.f);
  CHECK(pos.scale == qlora::to_float(qlora::to_f16((1.8f - 0.5f) / 13.f)));
  // A constant group uses the 1e-5 floor of the range.
  const IntGrid flat = int_grid_from_range(IntKind::dint, 4, 0.3f, 0.3f);
  CHECK(flat.scale == qlora::to_float(qlora::to_f16(1e-5f / 13.f)));
}

TEST_CASE("quant dint: thresholds at s/4 and 3s/4 are strict") {
  IntGrid g{0.25f, 6.f};  // s/4 = 0.0625, 3s/4 = 0.1875
  const float below = std::nextafter(0.0625f, 0.f);
  CHECK(dint_code(0.f, g, 4) == 6);
  CHECK(dint_code(below, g, 4) == 6);
  CHECK(dint_code(-below, g, 4) == 6);
  CHECK(dint_code(0.0625f, g, 4) == 14);   // |w| = s/4 is not < s/4: +s/2
  CHECK(dint_code(-0.0625f, g, 4) == 15);  // -s/2
  CHECK(dint_code(std::nextafter(0.1875f, 0.f), g, 4) == 14);
  CHECK(dint_code(0.1875f, g, 4) == 7);    // |w| = 3s/4: uniform, round(0.75) + 6
  CHECK(dint_code(-0.1875f, g, 4) == 5);
  CHECK(decode_int(IntKind::dint, 4, 14, g) == 0.125f);
  CHECK(decode_int(IntKind::dint, 4, 15, g) == -0.125f);
  // The extra levels do not depend on the zero point (a merged, fractional zero leaves them alone).
  CHECK(decode_int(IntKind::dint, 4, 14, IntGrid{0.25f, 3.7f}) == 0.125f);
  // 3 bits: uniform codes 0..5 (qmax = 2^3 - 3), code 6 = +s/2, code 7 = -s/2.
  CHECK(dint_code(0.1f, IntGrid{0.25f, 2.f}, 3) == 6);
  CHECK(dint_code(-0.1f, IntGrid{0.25f, 2.f}, 3) == 7);
}

TEST_CASE("quant dint: 4 bits use 16 distinct codes and the value set of the method file") {
  const auto w = exact_group();
  std::vector<std::uint8_t> codes(w.size());
  const IntGrid g = quantize_int_group(IntKind::dint, 4, false, w.data(), std::int64_t(w.size()), codes.data());
  std::set<int> used(codes.begin(), codes.end());
  CHECK(used.size() == 16);
  std::set<double> allowed = {0.125, -0.125};
  for (int k = 0; k <= 13; ++k) allowed.insert(0.25 * (k - 6));
  for (std::size_t j = 0; j < w.size(); ++j) {
    const float w_hat = decode_int(IntKind::dint, 4, codes[j], g);
    CHECK(allowed.count(double(w_hat)) == 1);
    // Inputs on the grid come back exactly; the others (odd multiples of 0.125 away from 0) are ties.
    if (allowed.count(double(w[j])) == 1) CHECK(w_hat == w[j]);
    else CHECK(std::fabs(double(w_hat) - double(w[j])) == 0.125);
  }
}

TEST_CASE("quant dint: idempotence and error bounds on random groups") {
  std::mt19937_64 gen(7);
  std::normal_distribution<double> gauss(0.0, 1.0);
  std::student_t_distribution<double> heavy(3.0);
  for (int bits : {3, 4}) {
    const int qmax = (1 << bits) - 3;
    for (int trial = 0; trial < 40; ++trial) {
      std::vector<float> w(128);
      for (auto& x : w) x = float(trial % 2 ? gauss(gen) : heavy(gen));
      std::vector<std::uint8_t> codes(w.size());
      const IntGrid g = quantize_int_group(IntKind::dint, bits, false, w.data(), 128, codes.data());
      const double s = g.scale, lowest = s * (0 - g.zero), highest = s * (qmax - g.zero);
      for (std::size_t j = 0; j < w.size(); ++j) {
        const float w_hat = decode_int(IntKind::dint, bits, codes[j], g);
        REQUIRE(dint_code(w_hat, g, bits) == codes[j]);  // q(q(w)) == q(w) on the same (s, z)
        const double err = std::fabs(double(w[j]) - double(w_hat));
        if (w[j] >= lowest - s / 2 && w[j] <= highest + s / 2) REQUIRE(err <= s / 2 * (1 + 1e-6));
        if (std::fabs(w[j]) < 0.75 * s) REQUIRE(err <= s / 4 * (1 + 1e-6));  // near zero the step is s/2
      }
    }
  }
}
