#pragma once
// Calibrated layer problems shaped like the method files' numeric checks (comq.md, magr.md): inputs
// X [tokens, cols] = G diag(s) M with G Gaussian, a decaying spectrum s_k = (k + 1)^-1/2 and a Gaussian
// mixing matrix M (correlated channels), a fraction of outlier channels scaled up; H = X^T X / tokens
// (computed in f64, stored f32 like GramAccumulator's); W ~ N(0, sigma^2) with a fraction of outlier
// weights scaled up. Seeded: the same arguments give the same problem.

#include <Eigen/Dense>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "qlora/core/half.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/layer_error.hpp"

namespace qlora::test {

struct LayerProblem {
  Tensor w;   // [rows, cols] f32
  Tensor h;   // [cols, cols] f32
  Tensor x;   // [tokens, cols] f64 (for the X-form checks)
};

struct LayerProblemSpec {
  std::int64_t rows = 64, cols = 256, tokens = 2048;
  std::uint64_t seed = 1;
  double outlier_channels = 0.02, channel_gain = 10.0;  // comq.md: 2 % outlier channels
  double weight_sigma = 0.02, outlier_weights = 0.002, weight_gain = 8.0;  // magr.md: 0.2 % outliers x8
};

inline LayerProblem make_layer_problem(const LayerProblemSpec& spec) {
  using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::mt19937_64 gen(spec.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const std::int64_t n = spec.tokens, d = spec.cols;
  Matrix g(n, d), m(d, d);
  for (std::int64_t i = 0; i < n * d; ++i) g.data()[i] = normal(gen);
  for (std::int64_t i = 0; i < d * d; ++i) m.data()[i] = normal(gen) / std::sqrt(double(d));
  for (std::int64_t k = 0; k < d; ++k) g.col(k) *= 1.0 / std::sqrt(double(k + 1));
  Matrix x = g * m;
  for (std::int64_t k = 0; k < d; ++k)
    if (unit(gen) < spec.outlier_channels) x.col(k) *= spec.channel_gain;
  const Matrix h = x.transpose() * x / double(n);

  std::vector<float> w(std::size_t(spec.rows * d));
  for (auto& v : w) {
    v = float(normal(gen) * spec.weight_sigma);
    if (unit(gen) < spec.outlier_weights) v *= float(spec.weight_gain);
  }
  std::vector<float> hf(std::size_t(d * d));
  for (std::int64_t i = 0; i < d * d; ++i) hf[std::size_t(i)] = float(h.data()[i]);
  std::vector<double> xv(x.data(), x.data() + n * d);
  return {Tensor::from(w, {spec.rows, d}), Tensor::from(hf, {d, d}), Tensor::from(xv, {n, d})};
}

// The f16 scales of a quantized tensor as floats (f16 has no ==).
inline std::vector<float> scales_of(const quant::QuantizedTensor& q) {
  std::vector<float> out;
  for (const f16 s : q.scales.to_vector<f16>()) out.push_back(to_float(s));
  return out;
}

// The layer output error tr((W - deq Q) H (W - deq Q)^T) of q on problem p.
inline double error_of_q(const LayerProblem& p, const quant::QuantizedTensor& q) {
  return quant::layer_output_error(p.w, quant::dequantize(q), p.h);
}

}  // namespace qlora::test
