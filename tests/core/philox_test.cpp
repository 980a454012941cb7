// Philox4x32-10 against the Random123 known-answer vectors, and the uniform/normal streams built on it.

#include <doctest/doctest.h>

#include <cmath>
#include <numbers>
#include <vector>

#include "qlora/core/philox.hpp"
#include "qlora/cpu/random.hpp"

using namespace qlora;

TEST_CASE("philox: Random123 known-answer vectors (kat_vectors, philox4x32 10)") {
  struct Kat {
    std::uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const PhiloxBlock b = philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) CHECK(b.x[i] == k.out[i]);
  }
}

TEST_CASE("philox: the streams are pure functions of (seed, index)") {
  std::vector<float> whole(1000), tail(400);
  cpu::fill_normal(whole.data(), 1000, 42, 0, 0.f, 1.f);
  cpu::fill_normal(tail.data(), 400, 42, 600, 0.f, 1.f);
  for (int i = 0; i < 400; ++i) CHECK(tail[i] == whole[600 + i]);
  std::vector<float> other(1000);
  cpu::fill_normal(other.data(), 1000, 43, 0, 0.f, 1.f);
  int equal = 0;
  for (int i = 0; i < 1000; ++i) equal += other[i] == whole[i];
  CHECK(equal < 5);
}

TEST_CASE("philox: uniform stream has the moments of a uniform distribution on lo..hi") {
  const int n = 1 << 20;
  std::vector<float> u(n);
  cpu::fill_uniform(u.data(), n, 7, 0, -2.f, 3.f);
  double mean = 0, var = 0;
  float lo = 1e9f, hi = -1e9f;
  for (float x : u) {
    mean += x;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  mean /= n;
  for (float x : u) var += (x - mean) * (x - mean);
  var /= n;
  // U[-2,3): mean 0.5, variance 25/12; standard error of the mean ~ 1.44/sqrt(n) = 1.4e-3.
  CHECK(mean == doctest::Approx(0.5).epsilon(0.01));
  CHECK(var == doctest::Approx(25.0 / 12).epsilon(0.01));
  CHECK(lo >= -2.f);
  CHECK(hi < 3.f);
}

TEST_CASE("philox: normal stream has the moments and tails of N(mean, std)") {
  const int n = 1 << 20;
  std::vector<float> z(n);
  cpu::fill_normal(z.data(), n, 11, 0, 1.f, 2.f);
  double mean = 0, m2 = 0, m4 = 0;
  int beyond_2sd = 0;
  for (float x : z) mean += x;
  mean /= n;
  for (float x : z) {
    const double d = (x - mean) / 2.0;
    m2 += d * d;
    m4 += d * d * d * d;
    beyond_2sd += std::abs(d) > 2;
  }
  m2 /= n;
  m4 /= n;
  CHECK(mean == doctest::Approx(1.0).epsilon(0.005));
  CHECK(m2 == doctest::Approx(1.0).epsilon(0.01));
  CHECK(m4 == doctest::Approx(3.0).epsilon(0.03));  // kurtosis of a normal
  // P(|Z| > 2) = 0.0455 (standard normal table).
  CHECK(double(beyond_2sd) / n == doctest::Approx(0.0455).epsilon(0.03));
}

TEST_CASE("philox: own log and sincos agree with libm to float accuracy") {
  for (std::uint32_t k = 1; k < (1u << 24); k += 977) {
    const float u = float(k) * 0x1p-24f;
    CHECK(double(detail::log_unit(u)) == doctest::Approx(std::log(double(u))).epsilon(3e-7));
    float s, c;
    detail::sincos_turn(u, &s, &c);
    const double angle = 2 * std::numbers::pi * double(u);
    CHECK(std::abs(double(s) - std::sin(angle)) < 3e-7);
    CHECK(std::abs(double(c) - std::cos(angle)) < 3e-7);
  }
  CHECK(detail::log_unit(1.0f) == 0.0f);
}
