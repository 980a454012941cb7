#pragma once
// LoftQ initialisation of one layer (Li et al., ICLR 2024; methods/baselines.md section 4, from
// yxli2123/LoftQ utils.py): choose the low-bit base Q and the adapter together so that deq(Q) + dW ~ W in
// plain Frobenius norm, by T alternating steps
//   res = W
//   repeat T times:  Q = quant(res);  dW = the best structured approximation of W - deq(Q);  res = W - dW
// and return the last Q with its dW. T = 1 (PEFT's default, loftq_iter = 1) is quantize-then-SVD.
//
// The best structured approximation (derived; docs/adapter-init.md). The adapter's update is
// dW = S_out D S_in^T, constant on k x p tiles (linalg.hpp). For any tile t with entries R_t and mean m_t,
//   sum_t |R_t - D_t|^2 = sum_t |R_t - m_t|^2 + k p sum_t (m_t - D_t)^2,
// so minimising ||R - dW||_F over the allowed D is minimising ||tile_means(R) - D||_F (all tiles weigh the
// same k p). Hence:
//   single matrix (hira):   D = tile_means(R)                        (exact projection, full rank)
//   low rank r' (LoRA p = k = 1, Q-BLoRA, QA-LoRA, QA-BLoRA):  D = [tile_means(R)]_r'  (Eckart-Young)
// For LoRA the tile means are R itself and this is LoftQ's truncated SVD. D becomes A, B (or M) with the
// singular values split evenly and the scale s/p divided out (adapter_factors.hpp), so s E_k B A P_p = dW.
//
// Quantization is round-to-nearest (quant::quantize) in the given format, as LoftQ's own quantizer.

#include <string>
#include <string_view>

#include "qlora/nn/init/adapter_factors.hpp"
#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora::nn::init {

struct LoftqOptions {
  int steps = 1;  // T: alternating quantize / fit steps (PEFT's default 1; the LoftQ repo's examples use 5)
};

struct LoftqResult {
  quant::QuantizedTensor base;  // Q of the last step (CPU)
  AdapterFactors adapter;       // the fit of W - deq(Q)
};

// The Frobenius-best adapter of this shape for a residual R (d_out x d_in): argmin ||R - dW||_F over the
// updates the adapter can express (see the header comment).
inline AdapterFactors fit_adapter_frobenius(const MatrixXd& residual, const AdapterShape& shape) {
  detail::check_adapter_fits(shape, residual.rows(), residual.cols(), "adapter init (Frobenius fit)");
  const MatrixXd means = tile_means(residual, shape.repeat, shape.pool);
  return shape.full_matrix() ? factors_from_pooled_matrix(shape, means) : best_low_rank_factors(shape, means);
}

// w: the full-precision weight, f32 or f64 (d_out x d_in, any device; computed on the CPU in f64).
// `layer` names the weight in errors.
inline LoftqResult loftq(const Tensor& w, const quant::QuantConfig& format, const AdapterShape& shape,
                         const LoftqOptions& options = {}, std::string_view layer = "layer") {
  const std::string who = "loftq (" + std::string(layer) + ")";
  QLORA_CHECK(options.steps >= 1, who + ": the number of alternating steps must be >= 1, got " +
                                      std::to_string(options.steps));
  const MatrixXd weight = to_matrix(w, who + ": weight");
  detail::check_adapter_fits(shape, weight.rows(), weight.cols(), who);
  format.validate();

  LoftqResult result;
  MatrixXd target = weight;  // what the next quantization approximates: W - dW
  for (int step = 0; step < options.steps; ++step) {
    result.base = quant::quantize(to_tensor(target), format);
    const MatrixXd residual = weight - to_matrix(quant::dequantize(result.base, DType::f64), who + ": dequantized base");
    result.adapter = fit_adapter_frobenius(residual, shape);
    target = weight - to_matrix(result.adapter.delta_weight(), who + ": adapter update");
  }
  return result;
}

}  // namespace qlora::nn::init
