#pragma once
// CPU twin of the fused dequantize-and-multiply GEMV / skinny GEMM for generation:
//   y[b, r] = sum_c x[b, c] * deq(W)[r, c]      x [batch, cols], y [batch, rows]
// read straight from the packed codes (no dequantized copy of W).
//
// Every format dequantizes as w = multiplier(group) * level(code) with a per-group table of levels
// (NF4: kNf4Levels and the block constant; INT: code - zero and the f16 scale; dINT: its LUT m[code] and
// the scale), so the sum is organised per group. Accumulation order (in T: f32 on the f32 path):
//   y[b, r] = sum over groups g, in order, of  multiplier_g * ( sum over the group's columns j, in order,
//             of level(code_j) * x[b, j] )
// The CUDA twin sums in another order and is compared with a tolerance, not bit-exactly.

#include <algorithm>
#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cpu/parallel.hpp"
#include "qlora/cpu/quant_int.hpp"
#include "qlora/cpu/quant_nf4.hpp"
#include "qlora/cpu/quant_pack.hpp"

namespace qlora::cpu {

inline constexpr int kGemvMaxBatch = 16;

// decode_group(r, g, levels) fills levels[0 .. 2^bits) for group g of row r and returns its multiplier.
template <class T, class GroupDecoder>
void gemv_packed(const std::uint8_t* codes, int bits, std::int64_t rows, std::int64_t cols, std::int64_t group,
                 GroupDecoder decode_group, const T* x, std::int64_t batch, T* y) {
  const std::int64_t gpr = (cols + group - 1) / group;
  const std::int64_t stride = packed_row_bytes(cols, bits);
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols * batch))
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint8_t* row = codes + r * stride;
    float levels[256];
    T acc[kGemvMaxBatch], part[kGemvMaxBatch];
    for (std::int64_t b0 = 0; b0 < batch; b0 += kGemvMaxBatch) {  // chunks of 16 rows of x
      const std::int64_t nb = std::min<std::int64_t>(kGemvMaxBatch, batch - b0);
      std::fill(acc, acc + nb, T(0));
      for (std::int64_t g = 0; g < gpr; ++g) {
        const float multiplier = decode_group(r, g, levels);
        std::fill(part, part + nb, T(0));
        const std::int64_t end = std::min((g + 1) * group, cols);
        for (std::int64_t j = g * group; j < end; ++j) {
          const T level = T(levels[unpack_code(row, j, bits)]);
          for (std::int64_t b = 0; b < nb; ++b) part[b] += level * x[(b0 + b) * cols + j];
        }
        for (std::int64_t b = 0; b < nb; ++b) acc[b] += T(multiplier) * part[b];
      }
      for (std::int64_t b = 0; b < nb; ++b) y[(b0 + b) * rows + r] = acc[b];
    }
  }
}

// INT (asym: zeros u8 or f32; sym: zeros == nullptr) and dINT, scales f16 [rows, groups_per_row].
template <class T, class ZeroT>
void gemv_int(IntKind kind, int bits, const std::uint8_t* codes, const f16* scales, const ZeroT* zeros,
              std::int64_t rows, std::int64_t cols, std::int64_t group, const T* x, std::int64_t batch, T* y) {
  const std::int64_t gpr = (cols + group - 1) / group;
  auto decode_group = [&](std::int64_t r, std::int64_t g, float* levels) {
    const IntGrid grid = stored_grid(scales, zeros, r * gpr + g, bits);
    for (int code = 0; code < (1 << bits); ++code) levels[code] = int_level(kind, bits, std::uint8_t(code), grid.zero);
    return grid.scale;
  };
  gemv_packed(codes, bits, rows, cols, group, decode_group, x, batch, y);
}

// NF4 with the decoded block constants absmax [rows, groups_per_row] (double_quant_decode first for DQ).
template <class T>
void gemv_nf4(const std::uint8_t* codes, const float* absmax, std::int64_t rows, std::int64_t cols, std::int64_t group,
              const T* x, std::int64_t batch, T* y) {
  const std::int64_t gpr = (cols + group - 1) / group;
  auto decode_group = [&](std::int64_t r, std::int64_t g, float* levels) {
    std::copy(kNf4Levels, kNf4Levels + 16, levels);
    return absmax[r * gpr + g];
  };
  gemv_packed(codes, 4, rows, cols, group, decode_group, x, batch, y);
}

// NF4 with double quantization: the block constants are decoded per group on the fly
// (double_quant_decode_one), as a fused kernel would.
template <class T>
void gemv_nf4_double_quant(const std::uint8_t* codes, const std::uint8_t* absmax_codes, const float* absmax_scales,
                           float absmax_mean, std::int64_t rows, std::int64_t cols, std::int64_t group, const T* x,
                           std::int64_t batch, T* y) {
  const std::int64_t gpr = (cols + group - 1) / group;
  auto decode_group = [&](std::int64_t r, std::int64_t g, float* levels) {
    std::copy(kNf4Levels, kNf4Levels + 16, levels);
    const std::int64_t i = r * gpr + g;
    return double_quant_decode_one(absmax_codes[i], absmax_scales[i / kNf4DoubleQuantBlock], absmax_mean);
  };
  gemv_packed(codes, 4, rows, cols, group, decode_group, x, batch, y);
}

}  // namespace qlora::cpu
