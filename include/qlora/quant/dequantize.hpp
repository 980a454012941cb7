#pragma once
// dequantize / dequantize_rows_into: the dense weight deq(W) of a QuantizedTensor, whole or a row range
// (the tile-by-tile path of the operator layer). Each element is computed in f32 exactly as the CPU twins
// define it (cpu/quant_int.hpp, cpu/quant_nf4.hpp) and then converted to the output dtype, so an f64 or
// bf16 output is the f32 value widened or rounded once.

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/tensor.hpp"
#include "qlora/cpu/quant_int.hpp"
#include "qlora/cpu/quant_nf4.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/packed_weight.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora::quant {

namespace detail {

// Decoded NF4 block constants of rows [row_begin, row_end): the f32 scales, or the DQ reconstruction.
inline std::vector<float> nf4_block_absmax(const QuantizedTensor& q, std::int64_t row_begin, std::int64_t row_end) {
  const std::int64_t gpr = q.groups_per_row(), begin = row_begin * gpr, n = (row_end - row_begin) * gpr;
  std::vector<float> absmax(std::size_t(n > 0 ? n : 0));
  if (!q.config.double_quant) {
    const float* s = q.scales.data<float>() + begin;
    std::copy(s, s + n, absmax.begin());
    return absmax;
  }
  const std::uint8_t* codes = q.absmax_codes.data<std::uint8_t>();
  const float* block_scales = q.absmax_scales.data<float>();
  for (std::int64_t i = 0; i < n; ++i)
    absmax[std::size_t(i)] = cpu::double_quant_decode_one(codes[begin + i], block_scales[(begin + i) / kDoubleQuantBlock],
                                                          q.absmax_mean);
  return absmax;
}

template <class T>
void dequantize_rows_cpu(const QuantizedTensor& q, std::int64_t row_begin, std::int64_t row_end, T* out) {
  const std::int64_t rows = row_end - row_begin, group = q.group_size(), gpr = q.groups_per_row();
  const std::uint8_t* codes = q.codes.data<std::uint8_t>() + row_begin * q.row_stride_bytes();
  if (q.config.scheme == Scheme::nf4) {
    const std::vector<float> absmax = nf4_block_absmax(q, row_begin, row_end);
    cpu::dequantize_nf4_rows(codes, absmax.data(), rows, q.cols, group, out);
    return;
  }
  const cpu::IntKind kind = int_kind(q.config.scheme);
  const f16* scales = q.scales.data<f16>() + row_begin * gpr;
  if (!q.zeros.defined())
    cpu::dequantize_int_rows<T, std::uint8_t>(kind, q.config.bits, codes, scales, nullptr, rows, q.cols, group, out);
  else if (q.zeros.dtype() == DType::f32)
    cpu::dequantize_int_rows(kind, q.config.bits, codes, scales, q.zeros.data<float>() + row_begin * gpr, rows, q.cols,
                             group, out);
  else
    cpu::dequantize_int_rows(kind, q.config.bits, codes, scales, q.zeros.data<std::uint8_t>() + row_begin * gpr, rows,
                             q.cols, group, out);
}

}  // namespace detail

// Rows [row_begin, row_end) of deq(W) into out [row_end - row_begin, cols] on q's device: f32, f64, bf16 or
// f16 on the CPU; f32 or bf16 on CUDA (cuda::dequantize_rows, bit-exact with the CPU twin).
inline void dequantize_rows_into(const QuantizedTensor& q, std::int64_t row_begin, std::int64_t row_end, Tensor& out) {
  q.check("dequantize_rows_into");
  const std::string who = "dequantize_rows_into (" + q.config.name() + ")";
  QLORA_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= q.rows,
              who + ": row range [" + std::to_string(row_begin) + ", " + std::to_string(row_end) +
                  ") is out of range for " + std::to_string(q.rows) + " rows");
  QLORA_CHECK(out.defined() && out.shape() == Shape({row_end - row_begin, q.cols}),
              who + ": output " + (out.defined() ? out.str() : std::string("(undefined)")) + " should have shape " +
                  Shape({row_end - row_begin, q.cols}).str());
  QLORA_CHECK(is_floating(out.dtype()), who + ": output dtype " + std::string(dtype_name(out.dtype())) +
                                            " is not a floating type (f32, f64, bf16, f16)");
  QLORA_CHECK(out.device() == q.device(),
              who + ": output is on " + out.device().str() + " but the weight is on " + q.device().str());
  if (row_begin == row_end) return;
  if (q.device().is_cuda()) {
#if defined(QLORA_WITH_CUDA)
    const cuda::PackedWeight packed = packed_weight(q);
    if (out.dtype() == DType::f32)
      cuda::dequantize_rows(packed, row_begin, row_end, out.data<float>(), cuda::current_stream());
    else if (out.dtype() == DType::bf16)
      cuda::dequantize_rows(packed, row_begin, row_end, out.data<bf16>(), cuda::current_stream());
    else
      throw Error(who + ": output dtype " + std::string(dtype_name(out.dtype())) + " is not supported on CUDA (f32 or bf16)");
    return;
#else
    throw Error(who + ": a CUDA weight in a build without CUDA");
#endif
  }
  visit_floating(out.dtype(), [&](auto t) {
    using T = decltype(t);
    detail::dequantize_rows_cpu(q, row_begin, row_end, out.data<T>());
  });
}

// The whole deq(W) [rows, cols] in dtype `out`.
inline Tensor dequantize(const QuantizedTensor& q, DType out = DType::f32) {
  q.check("dequantize");
  Tensor w = Tensor::empty(Shape{q.rows, q.cols}, out, q.device());
  dequantize_rows_into(q, 0, q.rows, w);
  return w;
}

}  // namespace qlora::quant
