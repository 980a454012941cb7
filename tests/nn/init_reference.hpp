#pragma once
// Independent references for the adapter-init tests (tests/nn/loftq_test.cpp, cloq_test.cpp): brute-force
// minimisers that know nothing of the closed forms. An objective is given as a residual vector that is
// affine in the pooled update D (d_out/k x d_in/p); its matrix is built column by column from unit updates
// and solved by least squares (the single matrix), or alternated over the two factors of D = B A (low rank).

#include <Eigen/Dense>

#include <cstdint>
#include <functional>
#include <random>

namespace qlora::test {

using Eigen::MatrixXd;
using Eigen::VectorXd;

// dW (rows x cols) from a pooled D by the definition dW[o, i] = D[o / k, i / p] (methods/qblora.md).
inline MatrixXd expand_pooled(const MatrixXd& d, std::int64_t k, std::int64_t p) {
  MatrixXd w(d.rows() * k, d.cols() * p);
  for (std::int64_t o = 0; o < w.rows(); ++o)
    for (std::int64_t i = 0; i < w.cols(); ++i) w(o, i) = d(o / k, i / p);
  return w;
}

// The residual of an objective ||residual(D)||^2 (affine in D) as a function of a parameter vector theta,
// D = unpack(theta).
using Residual = std::function<VectorXd(const MatrixXd& d)>;

// argmin_theta || residual(unpack(theta)) ||^2 for unpack linear: the matrix J of theta -> residual is read
// off unit vectors, then J theta = -residual(0) is solved by a complete orthogonal decomposition (min-norm).
inline VectorXd affine_least_squares(const Residual& residual, const std::function<MatrixXd(const VectorXd&)>& unpack,
                                     std::int64_t n) {
  const VectorXd r0 = residual(unpack(VectorXd::Zero(n)));
  MatrixXd j(r0.size(), n);
  for (std::int64_t c = 0; c < n; ++c) j.col(c) = residual(unpack(VectorXd::Unit(n, c))) - r0;
  return j.completeOrthogonalDecomposition().solve(-r0);
}

// The unconstrained minimiser over D (out x in).
inline MatrixXd brute_force_full(const Residual& residual, std::int64_t out, std::int64_t in) {
  const auto unpack = [&](const VectorXd& t) { return MatrixXd(Eigen::Map<const MatrixXd>(t.data(), out, in)); };
  return unpack(affine_least_squares(residual, unpack, out * in));
}

// The minimum over rank-r D = B A (out x r times r x in) by alternating least squares from several random
// starts: the smallest objective found.
inline double brute_force_low_rank(const Residual& residual, std::int64_t out, std::int64_t in, std::int64_t r,
                                   int iterations = 400, int starts = 3) {
  std::mt19937_64 gen(99);
  std::normal_distribution<double> normal;
  double best = 1e300;
  for (int s = 0; s < starts; ++s) {
    MatrixXd a(r, in), b(out, r);
    for (std::int64_t i = 0; i < a.size(); ++i) a.data()[i] = normal(gen);
    for (std::int64_t i = 0; i < b.size(); ++i) b.data()[i] = normal(gen);
    for (int it = 0; it < iterations; ++it) {
      const auto with_b = [&](const VectorXd& t) { return MatrixXd(Eigen::Map<const MatrixXd>(t.data(), out, r) * a); };
      const VectorXd tb = affine_least_squares(residual, with_b, out * r);
      b = Eigen::Map<const MatrixXd>(tb.data(), out, r);
      const auto with_a = [&](const VectorXd& t) { return MatrixXd(b * Eigen::Map<const MatrixXd>(t.data(), r, in)); };
      const VectorXd ta = affine_least_squares(residual, with_a, r * in);
      a = Eigen::Map<const MatrixXd>(ta.data(), r, in);
    }
    best = std::min(best, residual(b * a).squaredNorm());
  }
  return best;
}

}  // namespace qlora::test
