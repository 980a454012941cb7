#pragma once
// Device-side reading of the packed quantized formats, shared by the dequantization and GEMV kernels
// (cuda/quant/*.cu only): 16-byte loads of packed codes, the per-group grid (scale, zero), and the f32
// value of one code, each step the same f32 operation as the CPU twins (cpu/quant_int.hpp,
// cpu/quant_nf4.hpp), so that the kernels are bit-exact with them.

#include <cstdint>
#include <string>

#include "common.cuh"
#include "qlora/cpu/quant_nf4.hpp"
#include "qlora/cpu/quant_pack.hpp"
#include "qlora/cuda/quant.hpp"

namespace qlora::cuda::detail {

// What the kernels receive by value: the weight, its derived sizes, and the NF4 table (copied from
// cpu::kNf4Levels, the one definition, into shared memory by each block).
struct QuantParams {
  PackedWeight w;
  std::int64_t groups_per_row = 0;
  std::int64_t row_bytes = 0;  // packed_row_bytes(cols, bits)
  int group_shift = 0;         // group index of column j = j >> group_shift (see make_quant_params)
  float nf4_levels[16] = {};
};

// Checks what the kernels rely on and derives the sizes. Throws qlora::Error naming the problem.
inline QuantParams make_quant_params(const PackedWeight& w, const char* who) {
  const std::string name = std::string(who) + ": ";
  const bool int_scheme = w.scheme != PackedScheme::nf4;
  if (!(w.bits == 2 || w.bits == 3 || w.bits == 4 || w.bits == 8) || (!int_scheme && w.bits != 4) ||
      (w.scheme == PackedScheme::dint && w.bits != 3 && w.bits != 4))
    throw Error(name + "unsupported bit width " + std::to_string(w.bits) + " for this scheme");
  if (w.rows < 1 || w.cols < 1 || w.cols >= (std::int64_t(1) << 30))
    throw Error(name + "bad shape " + std::to_string(w.rows) + " x " + std::to_string(w.cols));
  const bool power_of_two = w.group > 0 && (w.group & (w.group - 1)) == 0;
  // A group that is not a power of two must be the whole row (group 0 = cols): then j >> 30 = 0 for every j.
  if (!power_of_two && w.group != w.cols)
    throw Error(name + "group " + std::to_string(w.group) + " is neither a power of two nor the row length");
  if (power_of_two && w.group < 16 && w.group < w.cols)
    throw Error(name + "group " + std::to_string(w.group) + " is below 16");
  if (reinterpret_cast<std::uintptr_t>(w.codes) % 16 != 0)
    throw Error(name + "packed codes are not 16-byte aligned (the kernels use 16-byte loads)");
  const bool dq = !int_scheme && w.absmax == nullptr;
  if (!int_scheme && dq && (w.absmax_codes == nullptr || w.absmax_scales == nullptr))
    throw Error(name + "NF4 needs either block absmax or the double-quantization constants");
  if (int_scheme && w.scales == nullptr) throw Error(name + "integer formats need their f16 scales");
  if (w.scheme != PackedScheme::int_sym && int_scheme && w.zeros_u8 == nullptr && w.zeros_f32 == nullptr)
    throw Error(name + "asymmetric int and dint need their zeros");

  QuantParams p;
  p.w = w;
  p.groups_per_row = (w.cols + w.group - 1) / w.group;
  p.row_bytes = cpu::packed_row_bytes(w.cols, w.bits);
  int shift = 30;
  if (power_of_two)
    for (shift = 0; (std::int64_t(1) << shift) < w.group; ++shift) {
    }
  p.group_shift = shift;
  for (int i = 0; i < 16; ++i) p.nf4_levels[i] = cpu::kNf4Levels[i];
  return p;
}

// The codes one thread loads at once: 16 bytes, or for 3-bit codes three 16-byte loads (48 bytes = 128
// codes exactly), so that a unit never splits a code. Units past the row's padded end read as zero.
template <int kBits>
struct PackedUnit {
  static constexpr int kLoads = kBits == 3 ? 3 : 1;
  static constexpr int kBytes = 16 * kLoads;
  static constexpr int kCodes = kBytes * 8 / kBits;  // 2-bit: 64, 3-bit: 128, 4-bit: 32, 8-bit: 16
  std::uint32_t words[kBytes / 4];

  __device__ __forceinline__ void load(const std::uint8_t* row, std::int64_t unit, std::int64_t row_bytes) {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const std::int64_t offset = unit * kBytes + 16 * l;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (offset < row_bytes) v = __ldg(reinterpret_cast<const uint4*>(row + offset));
      words[4 * l + 0] = v.x;
      words[4 * l + 1] = v.y;
      words[4 * l + 2] = v.z;
      words[4 * l + 3] = v.w;
    }
  }

  // Code i of the unit (i a compile-time constant after unrolling): bits [i*b, i*b + b) of the
  // little-endian stream (cpu/quant_pack.hpp), which is bit (k % 32) of word k / 32.
  __device__ __forceinline__ unsigned code(int i) const {
    const int bit = i * kBits, word = bit / 32, shift = bit % 32;
    unsigned v = words[word] >> shift;
    if (shift + kBits > 32) v |= words[word + 1] << (32 - shift);
    return v & ((1u << kBits) - 1u);
  }
};

// The grid of one group: w = scale * level(code). For NF4 scale is the (decoded) block constant.
struct GroupGrid {
  float scale;
  float zero;
};

// c_hat = ((float(q) / 127) * absmax2) + mean: three separately rounded operations, as
// cpu::double_quant_decode_one (the _rn intrinsics forbid FMA contraction).
__device__ __forceinline__ float double_quant_decode(std::uint8_t code, float block_scale, float mean) {
  const float unit = __fdiv_rn(float(int(code) - int(cpu::kDoubleQuantCodeOffset)), 127.f);
  return __fadd_rn(__fmul_rn(unit, block_scale), mean);
}

// Grid of the constant at `index` = row * groups_per_row + group.
__device__ __forceinline__ GroupGrid load_grid(const QuantParams& p, std::int64_t index) {
  const PackedWeight& w = p.w;
  if (w.scheme == PackedScheme::nf4) {
    if (w.absmax != nullptr) return {w.absmax[index], 0.f};
    return {double_quant_decode(w.absmax_codes[index], w.absmax_scales[index / cpu::kNf4DoubleQuantBlock],
                                w.absmax_mean),
            0.f};
  }
  const float scale = __half2float(reinterpret_cast<const __half*>(w.scales)[index]);
  if (w.zeros_f32 != nullptr) return {scale, w.zeros_f32[index]};
  if (w.zeros_u8 != nullptr) return {scale, float(w.zeros_u8[index])};
  return {scale, float(1 << (w.bits - 1))};  // symmetric
}

// The f32 value of one code: NF4 level * c; int scale * (code - zero); dINT's two extra codes +-scale/2.
// levels: the NF4 table in shared memory.
__device__ __forceinline__ float decode_code(const QuantParams& p, const float* levels, unsigned code, GroupGrid g) {
  if (p.w.scheme == PackedScheme::nf4) return __fmul_rn(levels[code], g.scale);
  float level;
  const unsigned qmax = (1u << p.w.bits) - 3u;
  if (p.w.scheme == PackedScheme::dint && code > qmax) level = code == qmax + 1 ? 0.5f : -0.5f;
  else level = __fsub_rn(float(code), g.zero);
  return __fmul_rn(g.scale, level);
}

}  // namespace qlora::cuda::detail
