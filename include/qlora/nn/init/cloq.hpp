#pragma once
// CLoQ initialisation of one layer (Deng et al., arXiv 2501.18475; methods/cloq.md): given the quantized
// base Q and the calibration Gram H = X^T X / N of the layer's inputs, the adapter update that minimises the
// layer's output error on the calibration data,
//   min over dW the adapter can express of  || X (R - dW)^T ||_F^2 = tr( (R - dW) H (R - dW)^T ),  R = W - deq(Q),
// in closed form.
//
// Plain LoRA (methods/cloq.md, "Closed form"): with H = V diag(lam) V^T (f64 eigendecomposition),
// Rh = diag(sqrt lam) V^T (so H = Rh^T Rh) and Rh^+ = V diag(1/sqrt lam) on the kept eigenvalues,
//   dW^T = Rh^+ [Rh R^T]_r                  ([.]_r: truncated SVD)
// which is the exact minimiser, also for a singular H (it is the minimiser with no component in null(Rh)).
//
// Pooled / repeated adapters (derived here; docs/adapter-init.md). dW = S_out D S_in^T (linalg.hpp).
//  1. Output side. The rows of dW in one group of k share the row D_a; for any PSD quadratic form,
//     sum_{o in a} |r_o - d|_H^2 = sum_{o in a} |r_o - rbar_a|_H^2 + k |rbar_a - d|_H^2, so R may be replaced by
//     Rbar = (1/k) S_out^T R, the group means of its rows (the objective scales by k, the argmin is unchanged).
//  2. Input side. (Rbar - D S_in^T) is weighed by H; with X_p = X S_in (the inputs summed over each group of
//     p features), Hp = S_in^T H S_in and G = S_in^T H Rbar^T, the problem is reduced-rank regression
//     min || X Rbar^T - X_p D^T ||_F. Its least-squares solution E_p = Hp^+ G leaves a residual orthogonal to
//     range(X_p), so the objective is const + || Rp (E_p - D^T) ||_F^2 with Hp = Rp^T Rp: the plain-LoRA
//     problem again, with (Hp, E_p) for (H, R^T). Its minimiser is D^T = Rp^+ [Rp E_p]_r', where
//     Rp E_p = diag(lam_p^-1/2) V_p^T G (Hp = V_p diag(lam_p) V_p^T). For p = k = 1 this is the formula above.
//  3. The single matrix (hira) has no rank limit: D^T = Rp^+ Rp E_p = Hp^+ G, the weighted least-squares fit.
// So every preset has a CLoQ init; none is refused.
//
// Damping (methods/cloq.md, "Damping"): H is replaced by H + lambda I with lambda = damping * mean(diag H)
// (GPTQ's percdamp; default 0.01), i.e. the objective gains lambda ||R - dW||_F^2 and tends to LoftQ's
// Frobenius fit (T = 1) as damping grows. With damping = 0 the eigenvalues below eigen_cutoff * lam_max are
// dropped (the pseudo-inverse: the exact minimiser of the undamped objective). Pooling a damped H gives
// Hp + p lambda I, the same objective.
//
// The result D = left diag(sigma) right with left = the right singular vectors of Rp E_p (d_out/k x r'),
// right = (Rp^+ U_r)^T, and becomes A, B (or M) as in adapter_factors.hpp: s E_k B A P_p = dW.

#include <Eigen/Eigenvalues>

#include <string>
#include <string_view>

#include "qlora/nn/init/adapter_factors.hpp"

namespace qlora::nn::init {

struct CloqOptions {
  double damping = 0.01;        // lambda = damping * mean(diag H); 0 = the exact pseudo-inverse solution
  double eigen_cutoff = 1e-10;  // eigenvalues of the (pooled, damped) Gram below cutoff * the largest are dropped
};

// The calibrated adapter for a residual R = W - deq(Q) (d_out x d_in) and a Gram H (d_in x d_in, PSD).
inline AdapterFactors fit_adapter_calibrated(const MatrixXd& residual, const MatrixXd& gram, const AdapterShape& shape,
                                             const CloqOptions& options = {}, std::string_view layer = "layer") {
  const std::string who = "cloq (" + std::string(layer) + ")";
  detail::check_adapter_fits(shape, residual.rows(), residual.cols(), who);
  QLORA_CHECK(gram.rows() == residual.cols() && gram.cols() == residual.cols(),
              who + ": the calibration Gram is " + std::to_string(gram.rows()) + " x " + std::to_string(gram.cols()) +
                  ", the layer's input has " + std::to_string(residual.cols()) + " features");
  QLORA_CHECK(options.damping >= 0 && std::isfinite(options.damping),
              who + ": damping must be >= 0, got " + std::to_string(options.damping));
  QLORA_CHECK(options.eigen_cutoff >= 0 && options.eigen_cutoff < 1,
              who + ": eigen_cutoff must be in [0, 1), got " + std::to_string(options.eigen_cutoff));
  const std::int64_t k = shape.repeat, p = shape.pool;

  MatrixXd h = 0.5 * (gram + gram.transpose());  // exactly symmetric for the eigensolver
  const double mean_diagonal = h.diagonal().mean();
  QLORA_CHECK(mean_diagonal > 0, who + ": the calibration Gram has no positive diagonal entry (the layer saw only "
                                       "zero inputs), so the calibrated objective is empty");
  h.diagonal().array() += options.damping * mean_diagonal;

  const MatrixXd h_in = sum_of_column_groups(h, p).transpose();   // S_in^T H          (d_in/p x d_in)
  const MatrixXd h_pooled = sum_of_column_groups(h_in, p);        // Hp = S_in^T H S_in (d_in/p x d_in/p)
  const MatrixXd g = h_in * mean_of_row_groups(residual, k).transpose();  // G = S_in^T H Rbar^T (d_in/p x d_out/k)

  const Eigen::SelfAdjointEigenSolver<MatrixXd> eig(h_pooled);
  QLORA_CHECK(eig.info() == Eigen::Success, who + ": the eigendecomposition of the calibration Gram failed");
  const VectorXd& lam = eig.eigenvalues();  // ascending
  const double largest = lam(lam.size() - 1);
  QLORA_CHECK(largest > 0, who + ": the calibration Gram has no positive eigenvalue");
  std::int64_t first_kept = 0;
  while (first_kept < lam.size() && !(lam(first_kept) > options.eigen_cutoff * largest)) ++first_kept;
  const std::int64_t kept = lam.size() - first_kept;
  const MatrixXd v = eig.eigenvectors().rightCols(kept);
  const VectorXd inv_root = lam.tail(kept).cwiseSqrt().cwiseInverse();

  const MatrixXd rp_pinv = v * inv_root.asDiagonal();                   // Rp^+      (d_in/p x kept)
  const MatrixXd rp_target = inv_root.asDiagonal() * v.transpose() * g;  // Rp E_p    (kept x d_out/k)
  if (shape.full_matrix()) return factors_from_pooled_matrix(shape, (rp_pinv * rp_target).transpose());
  const TruncatedSvd t = truncated_svd(rp_target, shape.rank);
  // D^T = Rp^+ U_r S_r W_r^T, so D = W_r S_r (Rp^+ U_r)^T.
  return factors_from_svd(shape, t.v, t.s, (rp_pinv * t.u).transpose());
}

// w: the full-precision weight; base_weight: deq(Q), the layer's quantized base as a dense matrix (both
// d_out x d_in, f32/f64); gram: H (d_in x d_in, quant::GramAccumulator::gram()). `layer` names them in errors.
inline AdapterFactors cloq(const Tensor& w, const Tensor& base_weight, const Tensor& gram, const AdapterShape& shape,
                           const CloqOptions& options = {}, std::string_view layer = "layer") {
  const std::string who = "cloq (" + std::string(layer) + ")";
  const MatrixXd weight = to_matrix(w, who + ": weight"), base = to_matrix(base_weight, who + ": quantized base");
  QLORA_CHECK(weight.rows() == base.rows() && weight.cols() == base.cols(),
              who + ": the weight is " + w.shape().str() + " but the quantized base is " + base_weight.shape().str());
  return fit_adapter_calibrated(weight - base, to_matrix(gram, who + ": calibration Gram"), shape, options, layer);
}

}  // namespace qlora::nn::init
