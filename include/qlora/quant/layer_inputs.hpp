#pragma once
// Checks of what every calibrated layer quantizer takes (COMQ, MagR; comq.md, magr.md): the weight
// W [rows, cols] and the calibration Gram matrix H [cols, cols] (gram.hpp: X^T X / N). Bad input is one
// qlora::Error naming the quantizer, the tensor and the offending entry, never a crash or a silent NaN.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"

namespace qlora::quant::detail {

// The first non-finite entry of a CPU f32/f64 tensor viewed as [rows, cols] (-1 if none).
inline std::int64_t first_non_finite(const Tensor& t) {
  const std::int64_t n = t.numel();
  if (t.dtype() == DType::f64) {
    const double* p = t.data<double>();
    for (std::int64_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) return i;
  } else {
    const float* p = t.data<float>();
    for (std::int64_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i])) return i;
  }
  return -1;
}

inline void check_host_matrix(const Tensor& t, const std::string& who, const std::string& name) {
  QLORA_CHECK(t.defined(), who + ": " + name + " is an undefined tensor");
  QLORA_CHECK(t.rank() == 2, who + ": " + name + " must be 2-D, got " + t.str());
  QLORA_CHECK(t.device().is_cpu(), who + ": " + name + " must be a CPU tensor, it is on " + t.device().str());
  QLORA_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64,
              who + ": " + name + " must be f32 or f64, got " + std::string(dtype_name(t.dtype())));
  QLORA_CHECK(t.numel() > 0, who + ": " + name + " " + t.str() + " has no elements");
  const std::int64_t bad = first_non_finite(t);
  QLORA_CHECK(bad < 0, who + ": " + name + " row " + std::to_string(bad / std::max<std::int64_t>(1, t.dim(1))) +
                           ", column " + std::to_string(bad % std::max<std::int64_t>(1, t.dim(1))) +
                           " is not finite (NaN or Inf)");
}

// W: 2-D f32/f64 finite CPU tensor; H: [cols, cols] f32/f64 finite CPU tensor with a non-negative diagonal
// (a Gram matrix; symmetry is assumed, not checked, since X^T X from a GEMM is symmetric only to rounding).
inline void check_layer_inputs(const Tensor& w, const Tensor& h, const std::string& who) {
  check_host_matrix(w, who, "the weight W");
  check_host_matrix(h, who, "the Gram matrix H");
  const std::int64_t cols = w.dim(1);
  QLORA_CHECK(h.dim(0) == cols && h.dim(1) == cols, who + ": the Gram matrix H must be [" + std::to_string(cols) +
                                                        ", " + std::to_string(cols) + "] for W " + w.str() +
                                                        ", got " + h.str());
  for (std::int64_t j = 0; j < cols; ++j) {
    const double hjj = h.dtype() == DType::f64 ? h.data<double>()[j * cols + j] : double(h.data<float>()[j * cols + j]);
    QLORA_CHECK(hjj >= 0, who + ": the Gram matrix H has a negative diagonal entry H[" + std::to_string(j) + "][" +
                              std::to_string(j) + "] = " + std::to_string(hjj) + " (expected X^T X / N)");
  }
}

}  // namespace qlora::quant::detail
