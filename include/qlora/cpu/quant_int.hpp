#pragma once
// CPU twin of the group-wise integer quantizers: INT-b with GPTQ's grid (asymmetric or symmetric,
// baselines.md section 1) and dINT-b (w4a8-aqas-slac-dint.md section 3), quantize and dequantize.
//
// Every step is one f32 operation in the order written here (round to nearest even: std::nearbyint,
// which a CUDA kernel mirrors with rintf / __float2int_rn; divisions are IEEE __fdiv_rn), so a CUDA
// twin reproduces the codes and the dequantized values bit-exactly. The scale is rounded to f16 before
// any code is computed, so a dequantized value is exactly float(scale_f16) * (code - zero).
//
// The per-group and per-element helpers are QLORA_HD (host and device), so a CUDA kernel calls the very
// same functions; only the row loops differ.
//
// Layout: w, out are [rows, cols] row-major; group g of row r covers columns [g*group, min((g+1)*group,
// cols)) (the last group of a row may be shorter); scales, zeros are [rows, groups_per_row]; codes are
// packed rows of packed_row_bytes(cols, bits) bytes (cpu/quant_pack.hpp).

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

// The grid of one group: value(code) = scale * (code - zero). zero holds an integer at quantization
// time; it may be fractional after an adapter merge (float zeros).
struct IntGrid {
  float scale = 1.f;  // exactly representable in f16
  float zero = 0.f;
};

enum class IntKind { asym, sym, dint };

constexpr QLORA_HD int int_qmax(IntKind kind, int bits) { return kind == IntKind::dint ? (1 << bits) - 3 : (1 << bits) - 1; }

// Rounds a positive scale to f16 and back. A scale below f16's smallest subnormal would round to 0 and
// make every code a division by zero: it becomes 2^-24 instead (such a group holds values below ~1e-7).
// Overflow (inf) is rejected before quantization, at the Tensor level.
QLORA_HD float round_scale_to_f16(float scale) {
  const float s = to_float(to_f16(scale));
  return s > 0.f ? s : 0x1p-24f;
}

// The range [lo, hi] that GPTQ's find_params uses for a group with minimum `min` and maximum `max`:
// widened to contain 0; symmetric: hi = max(|lo|, hi), lo = -hi; an all-zero group gets [-1, 1].
// dINT keeps the raw min and max (its max(hi - lo, 1e-5) floor is in int_grid_from_range).
QLORA_HD void int_range(IntKind kind, float min, float max, float& lo, float& hi) {
  if (kind == IntKind::dint) {
    lo = min;
    hi = max;
    return;
  }
  lo = std::min(min, 0.f);
  hi = std::max(max, 0.f);
  if (kind == IntKind::sym) {
    hi = std::max(-lo, hi);
    lo = -hi;
  }
  if (lo == 0.f && hi == 0.f) {
    lo = -1.f;
    hi = 1.f;
  }
}

// Scale and zero of a group with range [lo, hi] (from int_range, possibly shrunk by the MSE search).
//   asym: scale = (hi - lo) / qmax,               zero = clamp(round(-lo / scale), 0, qmax)
//   sym:  scale = (hi - lo) / qmax,               zero = (qmax + 1) / 2 = 2^(bits-1)
//   dint: scale = max(hi - lo, 1e-5) / (2^b - 3), zero = clamp(-round(lo / scale), 0, 2^b - 3)
// The scale is rounded to f16 first; zero uses the rounded scale.
QLORA_HD IntGrid int_grid_from_range(IntKind kind, int bits, float lo, float hi) {
  const int qmax = int_qmax(kind, bits);
  IntGrid g;
  const float range = kind == IntKind::dint ? std::max(hi - lo, 1e-5f) : hi - lo;
  g.scale = round_scale_to_f16(div_rn(range, float(qmax)));
  if (kind == IntKind::sym) {
    g.zero = float(1 << (bits - 1));
  } else if (kind == IntKind::asym) {
    g.zero = std::clamp(std::nearbyint(div_rn(-lo, g.scale)), 0.f, float(qmax)) + 0.f;  // + 0.f: -0 becomes +0
  } else {
    g.zero = std::clamp(-std::nearbyint(div_rn(lo, g.scale)), 0.f, float(qmax)) + 0.f;
  }
  return g;
}

// The code of w on an asym/sym grid: clamp(round(w / scale) + zero, 0, qmax).
QLORA_HD std::uint8_t int_code(float w, IntGrid g, int qmax) {
  const float q = std::nearbyint(div_rn(w, g.scale)) + g.zero;
  return std::uint8_t(std::clamp(q, 0.f, float(qmax)));
}

// dINT codes: 0..qmax uniform (qmax = 2^b - 3), qmax + 1 = +scale/2, qmax + 2 = -scale/2.
// Nearest value with the thresholds of the method file (strict <): |w| < s/4 -> 0 (the code `zero`),
// |w| < 3s/4 -> sign(w) * s/2, otherwise the uniform code. s/4 and 3s/4 are exact in f32 (s is an f16 value).
QLORA_HD std::uint8_t dint_code(float w, IntGrid g, int bits) {
  const int qmax = (1 << bits) - 3;
  const float a = std::fabs(w);
  if (a < 0.25f * g.scale) return std::uint8_t(g.zero);
  if (a < 0.75f * g.scale) return std::uint8_t(w > 0.f ? qmax + 1 : qmax + 2);
  return int_code(w, g, qmax);
}

QLORA_HD std::uint8_t encode_int(IntKind kind, int bits, float w, IntGrid g) {
  return kind == IntKind::dint ? dint_code(w, g, bits) : int_code(w, g, int_qmax(kind, bits));
}

// m[code] of the dequantization w = scale * m[code]: code - zero, or +-1/2 for dINT's two extra codes
// (which do not depend on the zero point).
QLORA_HD float int_level(IntKind kind, int bits, std::uint8_t code, float zero) {
  if (kind == IntKind::dint) {
    const int qmax = (1 << bits) - 3;
    if (code == qmax + 1) return 0.5f;
    if (code == qmax + 2) return -0.5f;
  }
  return float(code) - zero;
}

QLORA_HD float decode_int(IntKind kind, int bits, std::uint8_t code, IntGrid g) {
  return g.scale * int_level(kind, bits, code, g.zero);
}

// GPTQ's find_params(mse=True): for p = 1 - i/100, i = 0..79 (grid 100, maxshrink 0.8), the grid of
// [p*lo, p*hi]; keeps the first one with the smallest sum |w - w_hat|^2.4 (error summed in double, in
// element order). i = 0 is the plain grid, so the search never increases that error.
QLORA_HD IntGrid int_grid_mse_search(IntKind kind, int bits, const float* w, std::int64_t n, float lo, float hi) {
  constexpr int kGrid = 100, kSteps = 80;  // kSteps = maxshrink 0.8 * grid
  constexpr double kNorm = 2.4;
  IntGrid best;
  double best_err = INFINITY;
  for (int i = 0; i < kSteps; ++i) {
    const float p = 1.f - div_rn(float(i), float(kGrid));
    const IntGrid g = int_grid_from_range(kind, bits, mul_rn(p, lo), mul_rn(p, hi));  // no FMA into hi - lo
    double err = 0;
    for (std::int64_t j = 0; j < n; ++j)
      err += std::pow(std::fabs(double(w[j]) - double(decode_int(kind, bits, encode_int(kind, bits, w[j], g), g))), kNorm);
    if (err < best_err) {
      best_err = err;
      best = g;
    }
  }
  return best;
}

// The grid of one group of n values: what RTN and GPTQ fit to a group. Plain; MSE-searched; or, with
// range_shrink = beta < 1, MagR's grid (magr.md, its quant.py): the top of [lo, hi] moved to
// lo + beta (hi - lo), i.e. scale = beta (hi - lo) / qmax and zero = round(-lo / scale), values above the
// new top clamping to the last code. The search and the shrink are alternatives (callers refuse both);
// beta = 1 is the plain grid exactly (lo + (hi - lo) need not round back to hi, so it is not computed).
QLORA_HD IntGrid int_group_grid(IntKind kind, int bits, bool mse_search, const float* w, std::int64_t n,
                                float range_shrink = 1.f) {
  float min = w[0], max = w[0];
  for (std::int64_t j = 1; j < n; ++j) {
    min = std::min(min, w[j]);
    max = std::max(max, w[j]);
  }
  float lo, hi;
  int_range(kind, min, max, lo, hi);
  if (mse_search) return int_grid_mse_search(kind, bits, w, n, lo, hi);
  if (range_shrink != 1.f) hi = add_rn(lo, mul_rn(range_shrink, hi - lo));
  return int_grid_from_range(kind, bits, lo, hi);
}

// Quantizes one group of n values: its grid (int_group_grid) and its n codes (unpacked).
QLORA_HD IntGrid quantize_int_group(IntKind kind, int bits, bool mse_search, const float* w, std::int64_t n,
                                  std::uint8_t* codes, float range_shrink = 1.f) {
  const IntGrid g = int_group_grid(kind, bits, mse_search, w, n, range_shrink);
  for (std::int64_t j = 0; j < n; ++j) codes[j] = encode_int(kind, bits, w[j], g);
  return g;
}

// Stores a zero point as u8 (integer zeros) or f32 (float zeros).
template <class ZeroT>
QLORA_HD ZeroT store_zero(float zero) {
  if constexpr (std::is_same_v<ZeroT, float>) return zero;
  else return ZeroT(zero);
}

// Quantizes w [rows, cols] into packed codes [rows, packed_row_bytes(cols, bits)], f16 scales and zeros
// [rows, groups_per_row] (ZeroT = uint8_t or float; zeros == nullptr for sym, whose zero is implicit).
// The input must be finite (checked at the Tensor level).
template <class ZeroT>
void quantize_int_rows(IntKind kind, int bits, bool mse_search, const float* w, std::int64_t rows, std::int64_t cols,
                       std::int64_t group, std::uint8_t* codes, f16* scales, ZeroT* zeros) {
  const std::int64_t gpr = (cols + group - 1) / group;
  const std::int64_t stride = packed_row_bytes(cols, bits);
#pragma omp parallel if (qlora::cpu::worth_parallel(rows * cols))
  {
    std::vector<std::uint8_t> row_codes(static_cast<std::size_t>(cols));
#pragma omp for
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t g = 0; g < gpr; ++g) {
        const std::int64_t begin = g * group, n = std::min(group, cols - begin);
        const IntGrid grid =
            quantize_int_group(kind, bits, mse_search, w + r * cols + begin, n, row_codes.data() + begin);
        scales[r * gpr + g] = to_f16(grid.scale);
        if (zeros != nullptr) zeros[r * gpr + g] = store_zero<ZeroT>(grid.zero);
      }
      pack_codes_row(row_codes.data(), cols, bits, codes + r * stride);
    }
  }
}

// The grid of group g of row r as stored: scale from f16; zero from u8/f32, or 2^(bits-1) when
// zeros == nullptr (symmetric).
template <class ZeroT>
QLORA_HD IntGrid stored_grid(const f16* scales, const ZeroT* zeros, std::int64_t index, int bits) {
  return IntGrid{to_float(scales[index]), zeros != nullptr ? float(zeros[index]) : float(1 << (bits - 1))};
}

// Dequantizes `rows` packed rows into out [rows, cols] (T in float, double, bf16, f16): each element is
// the f32 value scale * m[code] (one f32 multiply; m[code] = float(code) - zero, one f32 subtraction)
// then converted to T. Pointers may be offset to a row range: row r of codes, scales, zeros, out.
template <class T, class ZeroT>
void dequantize_int_rows(IntKind kind, int bits, const std::uint8_t* codes, const f16* scales, const ZeroT* zeros,
                         std::int64_t rows, std::int64_t cols, std::int64_t group, T* out) {
  const std::int64_t gpr = (cols + group - 1) / group;
  const std::int64_t stride = packed_row_bytes(cols, bits);
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint8_t* row = codes + r * stride;
    for (std::int64_t g = 0; g < gpr; ++g) {
      const IntGrid grid = stored_grid(scales, zeros, r * gpr + g, bits);
      const std::int64_t end = std::min((g + 1) * group, cols);
      for (std::int64_t j = g * group; j < end; ++j)
        out[r * cols + j] = detail::convert_one<T>(decode_int(kind, bits, unpack_code(row, j, bits), grid));
    }
  }
}

}  // namespace qlora::cpu
