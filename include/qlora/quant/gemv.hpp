#pragma once
// gemv(q, x): y = x deq(W)^T for a skinny x (generation: batch 1 to 16), reading the packed codes
// directly: the CPU twin of the fused CUDA GEMV (cpu/quant_gemv.hpp gives the summation order).

#include <cstdint>
#include <string>

#include "qlora/core/tensor.hpp"
#include "qlora/cpu/quant_gemv.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/packed_weight.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora::quant {

// x: [batch, cols] (1 <= batch <= 16) or [cols] on q's device. CPU: f32 (or f64 for float64 reference
// checks), y in x's dtype. CUDA: f32 or bf16 (cuda::gemv), y in f32. Returns y [batch, rows] (or [rows]).
inline Tensor gemv(const QuantizedTensor& q, const Tensor& x) {
  q.check("gemv");
  const std::string who = "gemv (" + q.config.name() + ", " + std::to_string(q.rows) + " x " + std::to_string(q.cols) + ")";
  QLORA_CHECK(x.defined(), who + ": x is undefined");
  QLORA_CHECK((x.rank() == 1 || x.rank() == 2) && x.shape().last() == q.cols,
              who + ": x " + x.str() + " should be [batch, " + std::to_string(q.cols) + "] or [" + std::to_string(q.cols) + "]");
  const std::int64_t batch = x.rank() == 2 ? x.dim(0) : 1;
  QLORA_CHECK(batch >= 1 && batch <= cpu::kGemvMaxBatch,
              who + ": batch " + std::to_string(batch) + " is outside 1..16 (use dequantize + matmul for larger batches)");
  QLORA_CHECK(x.device() == q.device(), who + ": x is on " + x.device().str() + " but the weight is on " + q.device().str());
  const Shape y_shape = x.rank() == 2 ? Shape{batch, q.rows} : Shape{q.rows};
  if (q.device().is_cuda()) {
#if defined(QLORA_WITH_CUDA)
    QLORA_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::bf16,
                who + ": x must be f32 or bf16 on CUDA, got " + std::string(dtype_name(x.dtype())));
    Tensor y = Tensor::empty(y_shape, DType::f32, x.device());
    const cuda::PackedWeight packed = packed_weight(q);
    if (x.dtype() == DType::f32) cuda::gemv(packed, x.data<float>(), batch, y.data<float>(), cuda::current_stream());
    else cuda::gemv(packed, x.data<bf16>(), batch, y.data<float>(), cuda::current_stream());
    return y;
#else
    throw Error(who + ": a CUDA weight in a build without CUDA");
#endif
  }
  QLORA_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64,
              who + ": x must be f32 or f64, got " + std::string(dtype_name(x.dtype())));

  Tensor y = Tensor::empty(y_shape, x.dtype(), x.device());
  const std::uint8_t* codes = q.codes.data<std::uint8_t>();
  const std::int64_t group = q.group_size();
  visit_floating(x.dtype(), [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      const T* xp = x.data<T>();
      T* yp = y.data<T>();
      if (q.config.scheme == Scheme::nf4) {
        if (q.config.double_quant)
          cpu::gemv_nf4_double_quant(codes, q.absmax_codes.data<std::uint8_t>(), q.absmax_scales.data<float>(),
                                     q.absmax_mean, q.rows, q.cols, group, xp, batch, yp);
        else
          cpu::gemv_nf4(codes, q.scales.data<float>(), q.rows, q.cols, group, xp, batch, yp);
        return;
      }
      const cpu::IntKind kind = detail::int_kind(q.config.scheme);
      const f16* scales = q.scales.data<f16>();
      if (!q.zeros.defined())
        cpu::gemv_int<T, std::uint8_t>(kind, q.config.bits, codes, scales, nullptr, q.rows, q.cols, group, xp, batch, yp);
      else if (q.zeros.dtype() == DType::f32)
        cpu::gemv_int(kind, q.config.bits, codes, scales, q.zeros.data<float>(), q.rows, q.cols, group, xp, batch, yp);
      else
        cpu::gemv_int(kind, q.config.bits, codes, scales, q.zeros.data<std::uint8_t>(), q.rows, q.cols, group, xp, batch,
                      yp);
    }
  });
  return y;
}

}  // namespace qlora::quant
