// Tests of cpu/gguf_blocks.hpp (kept with the io suite, whose readers and writer are its only users).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "qlora/cpu/gguf_blocks.hpp"
#include "support/random.hpp"

using qlora::to_f16;
using qlora::to_float;
namespace cpu = qlora::cpu;

TEST_CASE("gguf_blocks: Q8_0 blocks built by hand decode to d * q") {
  std::vector<cpu::BlockQ8_0> blocks(2);
  blocks[0].d = to_f16(0.5f);
  blocks[1].d = to_f16(-0.03125f);
  for (int j = 0; j < 32; ++j) {
    blocks[0].q[j] = std::int8_t(j - 16);
    blocks[1].q[j] = std::int8_t(j % 2 ? 127 : -128);
  }
  std::vector<float> y(64);
  cpu::dequantize_q8_0(blocks.data(), y.data(), 2);
  for (int j = 0; j < 32; ++j) {
    CHECK(y[j] == 0.5f * float(j - 16));
    CHECK(y[32 + j] == -0.03125f * float(j % 2 ? 127 : -128));
  }
}

TEST_CASE("gguf_blocks: Q4_0 blocks decode low nibbles to values 0..15 and high nibbles to 16..31") {
  cpu::BlockQ4_0 b{};
  b.d = to_f16(0.25f);
  for (int j = 0; j < 16; ++j) b.q[j] = std::uint8_t((j & 0x0f) | ((15 - j) << 4));  // low j, high 15 - j
  std::vector<float> y(32);
  cpu::dequantize_q4_0(&b, y.data(), 1);
  for (int j = 0; j < 16; ++j) {
    CHECK(y[j] == 0.25f * float(j - 8));
    CHECK(y[16 + j] == 0.25f * float(15 - j - 8));
  }
}

TEST_CASE("gguf_blocks: Q4_1 blocks decode to d * nibble + m") {
  cpu::BlockQ4_1 b{};
  b.d = to_f16(0.125f);
  b.m = to_f16(-1.5f);
  for (int j = 0; j < 16; ++j) b.q[j] = std::uint8_t(((j * 7) % 16) | (((j * 3 + 1) % 16) << 4));
  std::vector<float> y(32);
  cpu::dequantize_q4_1(&b, y.data(), 1);
  for (int j = 0; j < 16; ++j) {
    CHECK(y[j] == 0.125f * float((j * 7) % 16) - 1.5f);
    CHECK(y[16 + j] == 0.125f * float((j * 3 + 1) % 16) - 1.5f);
  }
}

TEST_CASE("gguf_blocks: Q8_0 quantization follows ggml's reference and round-trips within half a step") {
  const std::int64_t n_blocks = 5;
  auto x = qlora::test::random_vector<float>(n_blocks * 32, 21, -2.0, 2.0);
  x[3] = 0.0f;
  std::vector<cpu::BlockQ8_0> blocks(n_blocks);
  cpu::quantize_q8_0(x.data(), blocks.data(), n_blocks);
  std::vector<float> y(x.size());
  cpu::dequantize_q8_0(blocks.data(), y.data(), n_blocks);
  for (std::int64_t b = 0; b < n_blocks; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    CHECK(to_float(blocks[b].d) == to_float(to_f16(amax / 127.0f)));  // d = max|x| / 127, stored as f16
    const float d = to_float(blocks[b].d);
    for (int j = 0; j < 32; ++j) {
      CHECK(std::abs(int(blocks[b].q[j])) <= 127);
      // Error: half a step, plus the f16 rounding of d (relative 2^-11) times the code (|q| <= 128).
      CHECK(std::fabs(y[b * 32 + j] - x[b * 32 + j]) <= 0.5f * d + 128.0f * d * 0x1p-10f);
    }
  }
  CHECK(y[3] == 0.0f);
  // An all-zero block has d = 0 and decodes to zeros (no division by zero).
  std::vector<float> zeros(32, 0.0f), back(32, 1.0f);
  cpu::BlockQ8_0 zb{};
  cpu::quantize_q8_0(zeros.data(), &zb, 1);
  cpu::dequantize_q8_0(&zb, back.data(), 1);
  CHECK(back == zeros);
}

TEST_CASE("gguf_blocks: Q4_1 quantization: m = min, d = (max - min) / 15, codes in 0..15") {
  const std::int64_t n_blocks = 4;
  const auto x = qlora::test::random_vector<float>(n_blocks * 32, 22, -1.0, 3.0);
  std::vector<cpu::BlockQ4_1> blocks(n_blocks);
  cpu::quantize_q4_1(x.data(), blocks.data(), n_blocks);
  std::vector<float> y(x.size());
  cpu::dequantize_q4_1(blocks.data(), y.data(), n_blocks);
  for (std::int64_t b = 0; b < n_blocks; ++b) {
    float lo = x[b * 32], hi = x[b * 32];
    for (int j = 0; j < 32; ++j) {
      lo = std::min(lo, x[b * 32 + j]);
      hi = std::max(hi, x[b * 32 + j]);
    }
    CHECK(to_float(blocks[b].m) == to_float(to_f16(lo)));
    CHECK(to_float(blocks[b].d) == to_float(to_f16((hi - lo) / 15.0f)));
    const float d = to_float(blocks[b].d);
    // Half a step, plus the f16 rounding (relative 2^-11) of m and of d times the code (<= 16).
    const float tol = 0.5f * d + std::fabs(lo) * 0x1p-10f + 16.0f * d * 0x1p-10f;
    for (int j = 0; j < 32; ++j) CHECK(std::fabs(y[b * 32 + j] - x[b * 32 + j]) <= tol);
  }
}
