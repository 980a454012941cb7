// CUDA conversions and fills against the CPU twin: bit-exact, specials and f16 subnormals included.

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/convert.hpp"
#include "qlora/cuda/convert.hpp"

using qlora::bf16;
using qlora::f16;
using qlora::test::DeviceBuffer;

namespace {

// Values over the whole f32 range that matters for bf16 and f16: random signs, mantissas and exponents from
// 2^-30 (below f16's smallest subnormal) to 2^20 (beyond f16's largest finite), plus the special values and
// exact rounding ties.
std::vector<float> conversion_inputs(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-30, 20);
  std::vector<float> x(n);
  for (auto& v : x) v = (gen() & 1 ? -1.0f : 1.0f) * std::ldexp(mantissa(gen), exponent(gen));
  const float specials[] = {0.0f,
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::bit_cast<float>(0x7f800001u),  // signalling NaN
                            65504.0f,                           // f16 max
                            65520.0f,                           // rounds to f16 inf
                            std::ldexp(1.0f, -24),              // f16 smallest subnormal
                            std::ldexp(1.0f, -25),              // tie to zero in f16
                            std::ldexp(3.0f, -25),              // tie between subnormals
                            1.0f + std::ldexp(1.0f, -8),        // bf16 tie, rounds to even (down)
                            1.0f + std::ldexp(3.0f, -8),        // bf16 tie, rounds to even (up)
                            1.0f + std::ldexp(1.0f, -11),       // f16 tie
                            std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::denorm_min()};
  for (float s : specials) x.push_back(s);
  return x;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class Src, class Dst>
void check_convert(const std::vector<float>& values) {
  CAPTURE(qlora::test::type_name<Src>());
  CAPTURE(qlora::test::type_name<Dst>());
  const auto n = std::int64_t(values.size());
  std::vector<Src> x(values.size());
  qlora::cpu::convert(values.data(), x.data(), n);  // the inputs themselves, rounded by the reference

  std::vector<Dst> expected(values.size());
  qlora::cpu::convert(x.data(), expected.data(), n);

  DeviceBuffer<Src> x_dev(x);
  DeviceBuffer<Dst> y_dev(values.size());
  y_dev.poison();
  qlora::cuda::convert(x_dev.data(), y_dev.data(), n, nullptr);
  CHECK(same_bits(y_dev.download(), expected));
}

template <class Src>
void check_convert_from(const std::vector<float>& values) {
  check_convert<Src, float>(values);
  check_convert<Src, bf16>(values);
  check_convert<Src, f16>(values);
}

template <class T>
void check_fill(float value) {
  CAPTURE(qlora::test::type_name<T>());
  CAPTURE(value);
  constexpr std::int64_t n = 4099;
  std::vector<T> expected(n);
  qlora::cpu::fill(expected.data(), n, value);
  DeviceBuffer<T> y(n);
  y.poison();
  qlora::cuda::fill(y.data(), n, value, nullptr);
  CHECK(same_bits(y.download(), expected));
}

}  // namespace

TEST_CASE("cuda convert: every pair of f32, bf16 and f16 is bit-identical to the CPU twin") {
  const auto values = conversion_inputs(100003, 11);
  check_convert_from<float>(values);
  check_convert_from<bf16>(values);
  check_convert_from<f16>(values);
}

TEST_CASE("cuda convert: empty input launches nothing") {
  DeviceBuffer<float> x(1);
  DeviceBuffer<bf16> y(1);
  qlora::cuda::convert(x.data(), y.data(), 0, nullptr);
  CHECK_NOTHROW(y.download());
}

TEST_CASE("cuda fill: f32, bf16 and f16 are bit-identical to the CPU twin") {
  for (float value : {0.3f, -1.0f / 3.0f, 70000.0f}) {
    check_fill<float>(value);
    check_fill<bf16>(value);
    check_fill<f16>(value);
  }
}
