#pragma once
// quantize(w, cfg): round-to-nearest quantization of a 2-D weight into a QuantizedTensor (format.hpp),
// on the CPU, with the CPU twins of cpu/quant_int.hpp and cpu/quant_nf4.hpp. The GPTQ-family
// quantizers of this layer produce the same format from their own codes.

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "qlora/core/tensor.hpp"
#include "qlora/cpu/quant_int.hpp"
#include "qlora/cpu/quant_nf4.hpp"
#include "qlora/quant/format.hpp"

namespace qlora::quant {

namespace detail {

inline cpu::IntKind int_kind(Scheme s) {
  switch (s) {
    case Scheme::int_asym: return cpu::IntKind::asym;
    case Scheme::int_sym: return cpu::IntKind::sym;
    case Scheme::dint: return cpu::IntKind::dint;
    case Scheme::nf4: break;
  }
  throw Error("internal: NF4 is not an integer scheme");
}

// Rejects NaN/Inf (naming the first offending row and column) and, for the f16-scaled formats, values so
// large that a group scale would overflow f16 (|w| >= 32752 * qmax, far beyond any real weight).
inline void check_weight_values(const float* w, std::int64_t rows, std::int64_t cols, const QuantConfig& cfg) {
  const bool f16_scales = cfg.scheme != Scheme::nf4;
  const float limit =
      f16_scales ? 0.5f * 65504.f * float(cpu::int_qmax(int_kind(cfg.scheme), cfg.bits)) : std::numeric_limits<float>::max();
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const float v = w[r * cols + c];
      if (!std::isfinite(v))
        throw Error("quantize (" + cfg.name() + "): weight row " + std::to_string(r) + ", column " +
                    std::to_string(c) + " is " + (std::isnan(v) ? "NaN" : "infinite or beyond the f32 range"));
      if (std::fabs(v) >= limit)
        throw Error("quantize (" + cfg.name() + "): weight row " + std::to_string(r) + ", column " +
                    std::to_string(c) + " has magnitude " + std::to_string(v) +
                    ", too large for the f16 group scales of this format");
    }
  }
}

// Stores the f32 block constants absmax [rows, groups_per_row] of an NF4 tensor whose codes are set: as its
// scales, or double quantized (absmax_codes, absmax_scales, absmax_mean) when the config asks for it.
inline void store_nf4_block_absmax(QuantizedTensor& q, const Tensor& absmax) {
  if (!q.config.double_quant) {
    q.scales = absmax;
    return;
  }
  const std::int64_t n = q.rows * q.groups_per_row();
  q.absmax_codes = Tensor::empty(Shape{n}, DType::u8);
  q.absmax_scales = Tensor::empty(Shape{(n + kDoubleQuantBlock - 1) / kDoubleQuantBlock}, DType::f32);
  q.absmax_mean = cpu::double_quant_mean(absmax.data<float>(), n);
  cpu::double_quant_encode(absmax.data<float>(), n, q.absmax_mean, q.absmax_codes.data<std::uint8_t>(),
                           q.absmax_scales.data<float>());
}

}  // namespace detail

// w: f32 or f64 [rows, cols] on the CPU. f64 input is rounded to f32 first (the stored format is f16/f32,
// so the f32 path is the definition; CUDA reproduces it). Throws qlora::Error on an unsupported config,
// a wrong shape/dtype/device, or a NaN/Inf weight (naming its row).
inline QuantizedTensor quantize(const Tensor& w, const QuantConfig& cfg) {
  cfg.validate();
  const std::string who = "quantize (" + cfg.name() + ")";
  QLORA_CHECK(w.defined(), who + ": the weight tensor is undefined");
  QLORA_CHECK(w.rank() == 2, who + ": the weight must be 2-D [rows, cols], got " + w.str());
  QLORA_CHECK(w.device().is_cpu(), who + ": quantization runs on the CPU; the weight is on " + w.device().str());
  QLORA_CHECK(w.dtype() == DType::f32 || w.dtype() == DType::f64,
              who + ": the weight must be f32 or f64, got " + std::string(dtype_name(w.dtype())));
  QLORA_CHECK(w.dim(0) >= 1 && w.dim(1) >= 1, who + ": the weight " + w.str() + " has no elements");
  if (w.dtype() == DType::f64) {  // name NaN/Inf in the input before rounding could hide or create one
    const double* p = w.data<double>();
    for (std::int64_t i = 0; i < w.numel(); ++i)
      QLORA_CHECK(std::isfinite(p[i]), who + ": weight row " + std::to_string(i / w.dim(1)) + ", column " +
                                           std::to_string(i % w.dim(1)) + " is " + (std::isnan(p[i]) ? "NaN" : "infinite"));
  }
  const Tensor w32 = w.to(DType::f32);
  const float* wp = w32.data<float>();

  QuantizedTensor q;
  q.config = cfg;
  q.rows = w.dim(0);
  q.cols = w.dim(1);
  detail::check_weight_values(wp, q.rows, q.cols, cfg);
  const std::int64_t group = q.group_size(), gpr = q.groups_per_row();
  q.codes = Tensor::empty(Shape{q.rows, q.row_stride_bytes()}, DType::u8);

  if (cfg.scheme == Scheme::nf4) {
    Tensor absmax = Tensor::empty(Shape{q.rows, gpr}, DType::f32);
    cpu::quantize_nf4_rows(wp, q.rows, q.cols, group, q.codes.data<std::uint8_t>(), absmax.data<float>());
    detail::store_nf4_block_absmax(q, absmax);
    return q;
  }

  const cpu::IntKind kind = detail::int_kind(cfg.scheme);
  q.scales = Tensor::empty(Shape{q.rows, gpr}, DType::f16);
  f16* scales = q.scales.data<f16>();
  std::uint8_t* codes = q.codes.data<std::uint8_t>();
  if (cfg.scheme == Scheme::int_sym) {
    cpu::quantize_int_rows<std::uint8_t>(kind, cfg.bits, cfg.mse_search, wp, q.rows, q.cols, group, codes, scales,
                                         nullptr);
  } else if (cfg.float_zeros) {
    q.zeros = Tensor::empty(Shape{q.rows, gpr}, DType::f32);
    cpu::quantize_int_rows(kind, cfg.bits, cfg.mse_search, wp, q.rows, q.cols, group, codes, scales,
                           q.zeros.data<float>());
  } else {
    q.zeros = Tensor::empty(Shape{q.rows, gpr}, DType::u8);
    cpu::quantize_int_rows(kind, cfg.bits, cfg.mse_search, wp, q.rows, q.cols, group, codes, scales,
                           q.zeros.data<std::uint8_t>());
  }
  return q;
}

}  // namespace qlora::quant
