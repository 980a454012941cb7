#pragma once
// IntCodes: the unpacked, editable form of an INT/dINT QuantizedTensor (format.hpp), for the quantizers
// that choose codes or grids of their own after quantize() has laid out the tensor: COMQ (comq.hpp) moves
// codes and scales on RTN's grid, MagR's shrunk RTN (magr.hpp) refits the grids. One code per byte, the
// grid of every (row, group) as f32 (cpu::IntGrid); store_int_codes packs them back into the tensor.

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/cpu/quant_int.hpp"
#include "qlora/cpu/quant_pack.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora::quant {

struct IntCodes {
  cpu::IntKind kind = cpu::IntKind::asym;
  int bits = 4;
  std::int64_t rows = 0, cols = 0, group = 0, groups_per_row = 0;
  std::vector<std::uint8_t> codes;   // [rows, cols]
  std::vector<cpu::IntGrid> grids;   // [rows, groups_per_row]
};

// q: an INT or dINT QuantizedTensor on the CPU (NF4 is refused, naming `who`).
inline IntCodes unpack_int_codes(const QuantizedTensor& q, const std::string& who) {
  QLORA_CHECK(q.config.scheme != Scheme::nf4,
              who + ": needs an integer grid (int or dint), not NF4 ('" + q.config.name() + "')");
  QLORA_CHECK(q.device().is_cpu(), who + ": runs on the CPU; the quantized tensor is on " + q.device().str());
  q.check(who);
  IntCodes u;
  u.kind = detail::int_kind(q.config.scheme);
  u.bits = q.config.bits;
  u.rows = q.rows;
  u.cols = q.cols;
  u.group = q.group_size();
  u.groups_per_row = q.groups_per_row();
  u.codes.resize(std::size_t(u.rows * u.cols));
  cpu::unpack_codes(q.codes.data<std::uint8_t>(), u.rows, u.cols, u.bits, u.codes.data());
  u.grids.resize(std::size_t(u.rows * u.groups_per_row));
  const f16* scales = q.scales.data<f16>();
  for (std::int64_t i = 0; i < u.rows * u.groups_per_row; ++i) {
    const std::size_t k = std::size_t(i);
    if (!q.zeros.defined()) u.grids[k] = cpu::stored_grid<float>(scales, nullptr, i, u.bits);
    else if (q.config.float_zeros) u.grids[k] = cpu::stored_grid(scales, q.zeros.data<float>(), i, u.bits);
    else u.grids[k] = cpu::stored_grid(scales, q.zeros.data<std::uint8_t>(), i, u.bits);
  }
  return u;
}

// Writes u's codes, scales and zeros into q (same shape and format as the tensor u came from). Scales must
// be f16 values, zeros integers in [0, 255] unless q has float zeros; a symmetric q keeps its implicit zero.
inline void store_int_codes(const IntCodes& u, QuantizedTensor& q) {
  QLORA_CHECK(q.rows == u.rows && q.cols == u.cols && q.groups_per_row() == u.groups_per_row,
              "store_int_codes: the codes do not match the tensor's shape");
  cpu::pack_codes(u.codes.data(), u.rows, u.cols, u.bits, q.codes.data<std::uint8_t>());
  f16* scales = q.scales.data<f16>();
  for (std::size_t i = 0; i < u.grids.size(); ++i) {
    scales[i] = to_f16(u.grids[i].scale);
    QLORA_CHECK(to_float(scales[i]) == u.grids[i].scale, "store_int_codes: a scale is not an f16 value");
    if (!q.zeros.defined()) continue;
    if (q.config.float_zeros) {
      q.zeros.data<float>()[i] = u.grids[i].zero;
    } else {
      QLORA_CHECK(u.grids[i].zero >= 0.f && u.grids[i].zero <= 255.f && std::nearbyint(u.grids[i].zero) == u.grids[i].zero,
                  "store_int_codes: an integer zero point is out of range");
      q.zeros.data<std::uint8_t>()[i] = std::uint8_t(u.grids[i].zero);
    }
  }
}

}  // namespace qlora::quant
