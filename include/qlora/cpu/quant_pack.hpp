#pragma once
// CPU twin of the code packing used by every quantized format (docs/quant.md, "Packed layouts").
//
// One layout for every bit width b in {2, 3, 4, 8}: the codes of a row form a little-endian bit stream,
// code i occupying bits [i*b, i*b + b) of the row, where bit k of the stream is bit (k % 8) of byte k / 8.
// So for b = 4 code 2j is the low nibble of byte j; for b = 3 eight codes fill three bytes exactly
// (codes 8j..8j+7 are the 24-bit little-endian word of bytes 3j..3j+2) and code 2 straddles bytes 0 and 1.
// Each row starts at a multiple of 16 bytes (packed_row_bytes) so that a CUDA kernel can use 16-byte
// loads; the padding bytes are zero.

#include <cstdint>

#include "qlora/core/half.hpp"  // QLORA_HD: the per-element helpers are callable from CUDA kernels
#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

inline constexpr std::int64_t kPackedRowAlignment = 16;

// Bytes of one packed row of `cols` codes of `bits` bits, padded to a multiple of 16.
constexpr QLORA_HD std::int64_t packed_row_bytes(std::int64_t cols, int bits) {
  const std::int64_t payload = (cols * bits + 7) / 8;
  return (payload + kPackedRowAlignment - 1) / kPackedRowAlignment * kPackedRowAlignment;
}

// Code i of a packed row. Reads the (at most two) bytes that hold it, so 3-bit codes that straddle a
// byte boundary need no special case; the second byte is only read when the code reaches into it.
QLORA_HD std::uint8_t unpack_code(const std::uint8_t* row, std::int64_t i, int bits) {
  const std::int64_t bit = i * bits;
  const std::int64_t byte = bit >> 3;
  const int shift = int(bit & 7);
  unsigned word = row[byte];
  if (shift + bits > 8) word |= unsigned(row[byte + 1]) << 8;
  return std::uint8_t((word >> shift) & ((1u << bits) - 1u));
}

// Writes codes[0..cols) into one packed row of packed_row_bytes(cols, bits) bytes (zeroing the padding).
inline void pack_codes_row(const std::uint8_t* codes, std::int64_t cols, int bits, std::uint8_t* row) {
  const std::int64_t row_bytes = packed_row_bytes(cols, bits);
  for (std::int64_t b = 0; b < row_bytes; ++b) row[b] = 0;
  for (std::int64_t i = 0; i < cols; ++i) {
    const std::int64_t bit = i * bits;
    const std::int64_t byte = bit >> 3;
    const int shift = int(bit & 7);
    const unsigned word = unsigned(codes[i]) << shift;
    row[byte] = std::uint8_t(row[byte] | (word & 0xffu));
    if (shift + bits > 8) row[byte + 1] = std::uint8_t(row[byte + 1] | (word >> 8));
  }
}

// The inverse of pack_codes_row: codes[0..cols) from one packed row.
inline void unpack_codes_row(const std::uint8_t* row, std::int64_t cols, int bits, std::uint8_t* codes) {
  for (std::int64_t i = 0; i < cols; ++i) codes[i] = unpack_code(row, i, bits);
}

// Packs a [rows, cols] matrix of codes into [rows, packed_row_bytes(cols, bits)] bytes.
inline void pack_codes(const std::uint8_t* codes, std::int64_t rows, std::int64_t cols, int bits,
                       std::uint8_t* packed) {
  const std::int64_t stride = packed_row_bytes(cols, bits);
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) pack_codes_row(codes + r * cols, cols, bits, packed + r * stride);
}

inline void unpack_codes(const std::uint8_t* packed, std::int64_t rows, std::int64_t cols, int bits,
                         std::uint8_t* codes) {
  const std::int64_t stride = packed_row_bytes(cols, bits);
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) unpack_codes_row(packed + r * stride, cols, bits, codes + r * cols);
}

}  // namespace qlora::cpu
