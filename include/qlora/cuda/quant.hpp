#pragma once
// CUDA kernels of the quantized weight formats (kernel layer; CPU twins: qlora/cpu/quant_int.hpp,
// qlora/cpu/quant_nf4.hpp, qlora/cpu/quant_gemv.hpp; formats and layouts: docs/quant.md).
//
// A PackedWeight names the device arrays of one quantized 2-D weight W [rows, cols] (the members of a
// quant::QuantizedTensor, which is one layer up and fills it). Codes are packed rows of
// cpu::packed_row_bytes(cols, bits) bytes, each starting at a 16-byte aligned offset: the kernels read
// them with 16-byte loads. The caller checks shapes and dtypes; the launchers check only what a kernel
// relies on (16-byte alignment, bit width, group size) and throw qlora::Error otherwise. Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

enum class PackedScheme { nf4, int_asym, int_sym, dint };

struct PackedWeight {
  PackedScheme scheme = PackedScheme::nf4;
  int bits = 4;                 // nf4: 4; int: 2, 3, 4, 8; dint: 3, 4
  std::int64_t rows = 0, cols = 0;
  std::int64_t group = 64;      // elements per group (config.group, or cols for one group per row)
  const std::uint8_t* codes = nullptr;  // [rows, packed_row_bytes(cols, bits)], 16-byte aligned
  // nf4 without double quantization: f32 block absmax [rows, groups_per_row].
  const float* absmax = nullptr;
  // nf4 with double quantization: u8 codes q + 127 [rows * groups_per_row], f32 absmax per 256 codes, mean.
  const std::uint8_t* absmax_codes = nullptr;
  const float* absmax_scales = nullptr;
  float absmax_mean = 0.f;
  // int / dint: f16 scales [rows, groups_per_row]; zeros as u8 or f32 (both null: symmetric, 2^(bits-1)).
  const f16* scales = nullptr;
  const std::uint8_t* zeros_u8 = nullptr;
  const float* zeros_f32 = nullptr;
};

// out [row_end - row_begin, cols] = deq(W)[row_begin:row_end] (T in {float, bf16}): bit-exact with
// cpu::dequantize_int_rows / cpu::dequantize_nf4_rows in f32; bf16 is the f32 value rounded (RNE).
template <class T>
void dequantize_rows(const PackedWeight& w, std::int64_t row_begin, std::int64_t row_end, T* out, Stream stream);

// y [batch, rows] (f32) = x [batch, cols] deq(W)^T for 1 <= batch <= 16 (TX in {float, bf16}), reading the
// packed codes once; f32 accumulation in another order than cpu::gemv_packed (compare with a tolerance).
template <class TX>
void gemv(const PackedWeight& w, const TX* x, std::int64_t batch, float* y, Stream stream);

inline constexpr int kGemvMaxBatch = 16;

}  // namespace qlora::cuda
