#pragma once
// The layer reconstruction error that the calibrated quantizers minimise (baselines.md section 3, comq.md):
//   E(W_hat) = tr( (W - W_hat) H (W - W_hat)^T ) = (1/N) || X W^T - X W_hat^T ||_F^2   for H = X^T X / N,
// the mean over calibration rows of the squared output error. Computed in double on the CPU, so tests can
// compare quantizers (GPTQ <= RTN, COMQ never above its start) without f32 noise deciding the order.

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"

namespace qlora::quant {

// w, w_hat: [rows, cols] f32/f64; h: [cols, cols] f32/f64, symmetric; all on the CPU.
inline double layer_output_error(const Tensor& w, const Tensor& w_hat, const Tensor& h) {
  QLORA_CHECK(w.defined() && w_hat.defined() && h.defined() && w.rank() == 2 && w.shape() == w_hat.shape() &&
                  h.rank() == 2 && h.dim(0) == w.dim(1) && h.dim(1) == w.dim(1),
              "layer_output_error: expected W and W_hat [rows, cols] and H [cols, cols]");
  const Tensor a = w.to(Device::cpu()).to(DType::f64), b = w_hat.to(Device::cpu()).to(DType::f64);
  const Tensor hh = h.to(Device::cpu()).to(DType::f64);
  const std::int64_t rows = w.dim(0), cols = w.dim(1);
  const double *pa = a.data<double>(), *pb = b.data<double>(), *ph = hh.data<double>();
  std::vector<double> d(static_cast<std::size_t>(cols)), hd(static_cast<std::size_t>(cols));
  double total = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) d[std::size_t(c)] = pa[r * cols + c] - pb[r * cols + c];
    double row = 0;
    for (std::int64_t i = 0; i < cols; ++i) {
      double s = 0;
      for (std::int64_t j = 0; j < cols; ++j) s += ph[i * cols + j] * d[std::size_t(j)];
      row += d[std::size_t(i)] * s;
    }
    total += row;
  }
  return total;
}

}  // namespace qlora::quant
