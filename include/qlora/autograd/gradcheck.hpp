#pragma once
// Float64 finite-difference gradient checking: the reference every backward is tested against.
// Central differences f(x+h e_i) - f(x-h e_i) / 2h have O(h^2) truncation error; with h = 1e-6 in double
// the combined truncation and rounding error is ~1e-9 relative for smooth functions of O(1) values.

#include <cmath>
#include <cstddef>
#include <functional>
#include <span>
#include <vector>

namespace qlora::autograd {

using ScalarFunction = std::function<double(std::span<const double>)>;

// d f / d x_i for every i by central differences.
inline std::vector<double> numerical_gradient(const ScalarFunction& f, std::span<const double> x,
                                              double h = 1e-6) {
  std::vector<double> point(x.begin(), x.end());
  std::vector<double> grad(point.size());
  for (std::size_t i = 0; i < point.size(); ++i) {
    const double saved = point[i];
    point[i] = saved + h;
    const double up = f(point);
    point[i] = saved - h;
    const double down = f(point);
    point[i] = saved;
    grad[i] = (up - down) / (2 * h);
  }
  return grad;
}

// ||a - b|| / ||b||  (2-norms; 0 when both are zero, +inf when only b is, NaN anywhere gives NaN).
inline double relative_error(std::span<const double> a, std::span<const double> b) {
  double diff = 0, ref = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    ref += b[i] * b[i];
  }
  if (diff == 0) return 0;
  return std::sqrt(diff) / std::sqrt(ref);
}

// A random linear functional L(y) = sum_i c_i y_i turns a vector-valued op into the scalar that
// finite differences need; its gradient with respect to y is c, the upstream gradient fed to backward.
inline double dot(std::span<const double> a, std::span<const double> b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace qlora::autograd

#include "qlora/core/tensor.hpp"

namespace qlora::autograd {

// Relative error between an analytic gradient and central differences of `loss` with respect to every
// element of x, a float64 host tensor that loss() reads (x is perturbed in place and restored).
inline double gradient_error(const std::function<double()>& loss, Tensor& x, const Tensor& analytic, double h = 1e-6) {
  if (x.dtype() != DType::f64 || !x.device().is_cpu())
    throw Error("gradient_error: finite differences need an f64 host tensor, got " + x.str());
  if (analytic.shape() != x.shape())
    throw Error("gradient_error: analytic gradient " + analytic.shape().str() + " for x " + x.shape().str());
  double* p = x.data<double>();
  std::vector<double> numeric(std::size_t(x.numel()));
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const double saved = p[i];
    p[i] = saved + h;
    const double up = loss();
    p[i] = saved - h;
    const double down = loss();
    p[i] = saved;
    numeric[std::size_t(i)] = (up - down) / (2 * h);
  }
  const std::vector<double> exact = analytic.to(DType::f64).to_vector<double>();
  return relative_error(exact, numeric);
}

}  // namespace qlora::autograd
