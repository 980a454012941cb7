#pragma once
// The block formats of ggml (ggml-common.h) that GGUF files store, as pure functions over pointers:
// dequantization to float, and the reference quantizers of ggml-quants.c (quantize_row_*_ref) for the
// GGUF writer. A block covers 32 consecutive values of a row; the scales are IEEE half floats.
//   Q8_0: {f16 d; int8 q[32]}            x = d * q
//   Q4_0: {f16 d; uint8 q[16]}           x = d * (nibble - 8)
//   Q4_1: {f16 d; f16 m; uint8 q[16]}    x = d * nibble + m
// Nibble order: byte j holds value j in its low nibble and value j + 16 in its high nibble.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "qlora/core/half.hpp"
#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

inline constexpr std::int64_t kGgufBlockValues = 32;

struct BlockQ8_0 {
  f16 d;
  std::int8_t q[32];
};
struct BlockQ4_0 {
  f16 d;
  std::uint8_t q[16];
};
struct BlockQ4_1 {
  f16 d;
  f16 m;
  std::uint8_t q[16];
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20,
              "ggml block layouts are packed");

// y[0, n_blocks * 32) from n_blocks blocks.
inline void dequantize_q8_0(const BlockQ8_0* blocks, float* y, std::int64_t n_blocks) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n_blocks * 32))
  for (std::int64_t b = 0; b < n_blocks; ++b) {
    const float d = to_float(blocks[b].d);
    for (int j = 0; j < 32; ++j) y[b * 32 + j] = d * float(blocks[b].q[j]);
  }
}

inline void dequantize_q4_0(const BlockQ4_0* blocks, float* y, std::int64_t n_blocks) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n_blocks * 32))
  for (std::int64_t b = 0; b < n_blocks; ++b) {
    const float d = to_float(blocks[b].d);
    for (int j = 0; j < 16; ++j) {
      y[b * 32 + j] = d * float(int(blocks[b].q[j] & 0x0f) - 8);
      y[b * 32 + j + 16] = d * float(int(blocks[b].q[j] >> 4) - 8);
    }
  }
}

inline void dequantize_q4_1(const BlockQ4_1* blocks, float* y, std::int64_t n_blocks) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n_blocks * 32))
  for (std::int64_t b = 0; b < n_blocks; ++b) {
    const float d = to_float(blocks[b].d), m = to_float(blocks[b].m);
    for (int j = 0; j < 16; ++j) {
      y[b * 32 + j] = d * float(blocks[b].q[j] & 0x0f) + m;
      y[b * 32 + j + 16] = d * float(blocks[b].q[j] >> 4) + m;
    }
  }
}

// Symmetric 8-bit: d = max|x| / 127, q = round(x / d) (ggml quantize_row_q8_0_ref).
inline void quantize_q8_0(const float* x, BlockQ8_0* blocks, std::int64_t n_blocks) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n_blocks * 32))
  for (std::int64_t b = 0; b < n_blocks; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    blocks[b].d = to_f16(d);
    for (int j = 0; j < 32; ++j) blocks[b].q[j] = std::int8_t(std::round(xb[j] * id));
  }
}

// Asymmetric 4-bit: m = min x, d = (max - min) / 15, q = min(15, trunc((x - m) / d + 0.5))
// (ggml quantize_row_q4_1_ref).
inline void quantize_q4_1(const float* x, BlockQ4_1* blocks, std::int64_t n_blocks) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n_blocks * 32))
  for (std::int64_t b = 0; b < n_blocks; ++b) {
    const float* xb = x + b * 32;
    float lo = std::numeric_limits<float>::max(), hi = -std::numeric_limits<float>::max();
    for (int j = 0; j < 32; ++j) {
      lo = std::min(lo, xb[j]);
      hi = std::max(hi, xb[j]);
    }
    const float d = (hi - lo) / 15.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    blocks[b].d = to_f16(d);
    blocks[b].m = to_f16(lo);
    for (int j = 0; j < 16; ++j) {
      const int q0 = std::min(15, int(std::int8_t((xb[j] - lo) * id + 0.5f)));
      const int q1 = std::min(15, int(std::int8_t((xb[j + 16] - lo) * id + 0.5f)));
      blocks[b].q[j] = std::uint8_t(q0 | (q1 << 4));
    }
  }
}

}  // namespace qlora::cpu
