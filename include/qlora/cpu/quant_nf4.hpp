#pragma once
// CPU twin of NF4 block quantization with QLoRA double quantization (baselines.md section 2).
//
//   c      = max |w| over the block (group) of a row                       (f32)
//   code   = number of NF4 midpoints strictly below w / c                  (nearest level; a tie goes to
//            the lower level, as bitsandbytes' `x > threshold` decision tree does); c == 0 -> code 7 (0.0)
//   w_hat  = kNf4Levels[code] * c                                          (one f32 multiply)
// Double quantization of the n = rows * groups_per_row block constants c (in row-major order):
//   mean   = (sum of c in double) / n, rounded to f32
//   d      = c - mean,  absmax2 = max |d| over each run of 256 constants   (one f32 per 256)
//   q      = clamp(round(d / absmax2 * 127), -127, 127), stored as u8 q + 127 (absmax2 == 0 -> q = 0)
//   c_hat  = ((float(q) / 127) * absmax2) + mean                           (divide, multiply, add: three
//            separately rounded f32 operations; CUDA must use __fdiv_rn, __fmul_rn, __fadd_rn so that
//            the multiply-add is not contracted into an FMA)
// The 4-bit codes are computed with the exact c (as bitsandbytes does), the dequantization uses c_hat.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "qlora/core/half.hpp"
#include "qlora/cpu/convert.hpp"
#include "qlora/cpu/parallel.hpp"
#include "qlora/cpu/quant_fp.hpp"
#include "qlora/cpu/quant_pack.hpp"

namespace qlora::cpu {

// The 16 NF4 levels (index = code), as f32 constants: QLoRA's table (baselines.md section 2). The macros
// let a CUDA file define bit-identical __constant__ / shared copies: `__constant__ float t[16] = {QLORA_NF4_LEVELS};`.
#define QLORA_NF4_LEVELS \
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                     \
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                    \
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,       \
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f

// kNf4Midpoints[k] = (kNf4Levels[k] + kNf4Levels[k+1]) * 0.5f evaluated in f32 (tests/quant checks it).
#define QLORA_NF4_MIDPOINTS \
    -0.8480963706970215f, -0.6106328964233398f, -0.4599952697753906f, -0.33967941999435425f,      \
    -0.23460739850997925f, -0.13791173696517944f, -0.045525018125772476f, 0.03979014977812767f,   \
    0.120255246758461f, 0.2035212516784668f, 0.2920137643814087f, 0.3893125355243683f,            \
    0.5016634464263916f, 0.6427869200706482f, 0.8614784479141235f

inline constexpr float kNf4Levels[16] = {QLORA_NF4_LEVELS};
inline constexpr float kNf4Midpoints[15] = {QLORA_NF4_MIDPOINTS};

inline constexpr std::uint8_t kNf4ZeroCode = 7;
inline constexpr int kNf4DoubleQuantBlock = 256;
inline constexpr std::uint8_t kDoubleQuantCodeOffset = 127;

// The NF4 code of a normalised value x = w / c in [-1, 1]: the count of midpoints strictly below x.
// (A local copy of the table, so that device code can call it too.)
QLORA_HD std::uint8_t nf4_encode(float x) {
  constexpr float midpoints[15] = {QLORA_NF4_MIDPOINTS};
  std::uint8_t code = 0;
  for (int k = 0; k < 15; ++k) code += std::uint8_t(x > midpoints[k]);
  return code;
}

QLORA_HD float nf4_decode(std::uint8_t code, float absmax) {
  constexpr float levels[16] = {QLORA_NF4_LEVELS};
  return levels[code] * absmax;
}

// One block of n values: returns its absmax c and writes n codes (unpacked).
QLORA_HD float quantize_nf4_block(const float* w, std::int64_t n, std::uint8_t* codes) {
  float c = 0.f;
  for (std::int64_t j = 0; j < n; ++j) c = std::max(c, std::fabs(w[j]));
  for (std::int64_t j = 0; j < n; ++j) codes[j] = c > 0.f ? nf4_encode(div_rn(w[j], c)) : kNf4ZeroCode;
  return c;
}

// w [rows, cols] -> packed 4-bit codes [rows, packed_row_bytes(cols, 4)] and absmax [rows, groups_per_row].
inline void quantize_nf4_rows(const float* w, std::int64_t rows, std::int64_t cols, std::int64_t group,
                              std::uint8_t* codes, float* absmax) {
  const std::int64_t gpr = (cols + group - 1) / group;
  const std::int64_t stride = packed_row_bytes(cols, 4);
#pragma omp parallel if (qlora::cpu::worth_parallel(rows * cols))
  {
    std::vector<std::uint8_t> row_codes(static_cast<std::size_t>(cols));
#pragma omp for
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t g = 0; g < gpr; ++g) {
        const std::int64_t begin = g * group, n = std::min(group, cols - begin);
        absmax[r * gpr + g] = quantize_nf4_block(w + r * cols + begin, n, row_codes.data() + begin);
      }
      pack_codes_row(row_codes.data(), cols, 4, codes + r * stride);
    }
  }
}

// The mean subtracted before double quantization: the double sum of the n constants, divided, to f32.
inline float double_quant_mean(const float* absmax, std::int64_t n) {
  double sum = 0;
  for (std::int64_t i = 0; i < n; ++i) sum += absmax[i];
  return n > 0 ? float(sum / double(n)) : 0.f;
}

// Quantizes n block constants to 8-bit codes [n] and per-256 scales [ceil(n / 256)] around `mean`.
inline void double_quant_encode(const float* absmax, std::int64_t n, float mean, std::uint8_t* codes,
                                float* block_scales) {
  const std::int64_t blocks = (n + kNf4DoubleQuantBlock - 1) / kNf4DoubleQuantBlock;
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t begin = b * kNf4DoubleQuantBlock, end = std::min(begin + kNf4DoubleQuantBlock, n);
    float scale = 0.f;
    for (std::int64_t i = begin; i < end; ++i) scale = std::max(scale, std::fabs(absmax[i] - mean));
    block_scales[b] = scale;
    for (std::int64_t i = begin; i < end; ++i) {
      const float q = scale > 0.f ? std::clamp(std::nearbyint(div_rn(absmax[i] - mean, scale) * 127.f), -127.f, 127.f) : 0.f;
      codes[i] = std::uint8_t(int(q) + kDoubleQuantCodeOffset);
    }
  }
}

// c_hat of constant i: ((float(q) / 127) * absmax2) + mean, three separately rounded f32 operations.
QLORA_HD float double_quant_decode_one(std::uint8_t code, float block_scale, float mean) {
  const float unit = div_rn(float(int(code) - int(kDoubleQuantCodeOffset)), 127.f);
  return add_rn(mul_rn(unit, block_scale), mean);
}

inline void double_quant_decode(const std::uint8_t* codes, const float* block_scales, float mean, std::int64_t n,
                                float* absmax) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i)
    absmax[i] = double_quant_decode_one(codes[i], block_scales[i / kNf4DoubleQuantBlock], mean);
}

// Dequantizes `rows` packed rows into out [rows, cols] given the (decoded) block constants
// absmax [rows, groups_per_row]: out = T(kNf4Levels[code] * c). Pointers may be offset to a row range.
template <class T>
void dequantize_nf4_rows(const std::uint8_t* codes, const float* absmax, std::int64_t rows, std::int64_t cols,
                         std::int64_t group, T* out) {
  const std::int64_t gpr = (cols + group - 1) / group;
  const std::int64_t stride = packed_row_bytes(cols, 4);
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint8_t* row = codes + r * stride;
    for (std::int64_t g = 0; g < gpr; ++g) {
      const float c = absmax[r * gpr + g];
      const std::int64_t end = std::min((g + 1) * group, cols);
      for (std::int64_t j = g * group; j < end; ++j)
        out[r * cols + j] = detail::convert_one<T>(nf4_decode(unpack_code(row, j, 4), c));
    }
  }
}

}  // namespace qlora::cpu
