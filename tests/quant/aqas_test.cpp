// The AWQ / AQAS scale search (quant/aqas.hpp; w4a8-aqas-slac-dint.md section 1): the statistics against
// hand-computed values, the search with Qa = identity against an independent re-implementation of
// llm-awq's _search_module_scale (weights Qw(W s) / s on raw inputs), and AQAS never worse than no scaling
// (the unscaled W4A8 error computed here from its definition).

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "qlora/quant/aqas.hpp"
#include "support/files.hpp"

using namespace qlora;

namespace {

// Calibration inputs (n, d) with a few outlier channels (x 30), as LLM activations have.
Tensor outlier_inputs(std::int64_t n, std::int64_t d, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> x(std::size_t(n * d));
  for (std::int64_t i = 0; i < n * d; ++i) x[std::size_t(i)] = dist(gen) * (i % d == 5 || i % d == 40 ? 30.0 : 1.0);
  return Tensor::from(x, Shape{n, d});
}

Tensor gaussian_weight(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, 0.02);
  std::vector<double> w(std::size_t(rows * cols));
  for (double& v : w) v = dist(gen);
  return Tensor::from(w, Shape{rows, cols});
}

std::vector<double> matmul_t(const std::vector<double>& x, const std::vector<double>& w, std::int64_t n, std::int64_t d,
                             std::int64_t out) {
  std::vector<double> y(std::size_t(n * out), 0.0);
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (std::int64_t c = 0; c < d; ++c) acc += x[std::size_t(t * d + c)] * w[std::size_t(o * d + c)];
      y[std::size_t(t * out + o)] = acc;
    }
  return y;
}

double mse(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return s / double(a.size());
}

// llm-awq's search for one linear (auto_scale.py, _search_module_scale with module2inspect = the linear),
// written out from its definition: x_max = mean |x| per channel, w_max = mean over rows of |W| / group max,
// s = clamp(x_max^a / w_max^(1-a), 1e-4) / sqrt(max * min), W_try = Qw(W diag(s)) diag(s)^-1 on raw x.
struct AwqSearch {
  std::vector<double> errors;
  int best = 0;
};
AwqSearch awq_reference(const Tensor& x, const Tensor& w, const quant::QuantConfig& format, int grid) {
  const std::int64_t n = x.dim(0), d = x.dim(1), out = w.dim(0), g = format.group == 0 ? d : format.group;
  const std::vector<double> xv = x.to_vector<double>(), wv = w.to_vector<double>();
  std::vector<double> x_max(std::size_t(d), 0.0), w_max(std::size_t(d), 0.0);
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t c = 0; c < d; ++c) x_max[std::size_t(c)] += std::fabs(xv[std::size_t(t * d + c)]) / double(n);
  for (std::int64_t o = 0; o < out; ++o)
    for (std::int64_t c = 0; c < d; ++c) {
      double group_max = 0;
      for (std::int64_t k = c / g * g; k < std::min(d, c / g * g + g); ++k)
        group_max = std::max(group_max, std::fabs(wv[std::size_t(o * d + k)]));
      w_max[std::size_t(c)] += std::fabs(wv[std::size_t(o * d + c)]) / group_max / double(out);
    }
  const std::vector<double> reference = matmul_t(xv, wv, n, d, out);
  AwqSearch r;
  for (int j = 0; j < grid; ++j) {
    const double a = double(j) / grid;
    std::vector<double> s(static_cast<std::size_t>(d));
    for (std::int64_t c = 0; c < d; ++c)
      s[std::size_t(c)] = std::max(std::pow(x_max[std::size_t(c)], a) / std::pow(w_max[std::size_t(c)], 1 - a), 1e-4);
    const double norm = std::sqrt(*std::max_element(s.begin(), s.end()) * *std::min_element(s.begin(), s.end()));
    for (double& v : s) v /= norm;
    std::vector<double> ws(wv.size());
    for (std::size_t i = 0; i < ws.size(); ++i) ws[i] = wv[i] * s[i % std::size_t(d)];
    const Tensor deq = quant::dequantize(quant::quantize(Tensor::from(ws, Shape{out, d}), format), DType::f64);
    std::vector<double> w_try = deq.to_vector<double>();
    for (std::size_t i = 0; i < w_try.size(); ++i) w_try[i] /= s[i % std::size_t(d)];
    r.errors.push_back(mse(matmul_t(xv, w_try, n, d, out), reference));
    if (r.errors.back() < r.errors[std::size_t(r.best)]) r.best = j;
  }
  return r;
}

}  // namespace

TEST_CASE("aqas: x_mag, w_mag and the candidate scales against hand-computed values") {
  const Tensor x = Tensor::from(std::vector<double>{1, -2, 3, 4}, Shape{2, 2});
  const Tensor x2 = Tensor::from(std::vector<double>{-5, 0}, Shape{1, 2});
  const Tensor xs[] = {x, x2};
  // (1 + 3 + 5) / 3 = 3, (2 + 4 + 0) / 3 = 2
  CHECK(quant::input_magnitude(xs) == std::vector<double>{3.0, 2.0});
  // Rows |.|/row max: [0.25, 1], [1, 1]; and a second weight's row [0.5, 1]: means (0.25+1+0.5)/3, 1.
  const Tensor w1 = Tensor::from(std::vector<double>{1, -4, 2, 2}, Shape{2, 2});
  const Tensor w2 = Tensor::from(std::vector<double>{-1, 2}, Shape{1, 2});
  const Tensor ws[] = {w1, w2};
  const std::vector<double> w_mag = quant::weight_magnitude(ws, 0);
  CHECK(w_mag[0] == doctest::Approx(1.75 / 3));
  CHECK(w_mag[1] == doctest::Approx(1.0));
  // a = 0.5: s = sqrt(x) / sqrt(w) = [sqrt(3 / 0.58333), sqrt(2)], divided by sqrt(s0 s1).
  const std::vector<double> s = quant::candidate_scales({3.0, 2.0}, w_mag, 0.5);
  const double s0 = std::sqrt(3.0 / (1.75 / 3)), s1 = std::sqrt(2.0), norm = std::sqrt(s0 * s1);
  CHECK(s[0] == doctest::Approx(s0 / norm));
  CHECK(s[1] == doctest::Approx(s1 / norm));
  CHECK(s[0] * s[1] == doctest::Approx(1.0));  // normalised: sqrt(max * min) = 1
  // Groups of 2 columns out of 4: each group's own max.
  const Tensor w4 = Tensor::from(std::vector<double>{1, 2, 8, -4}, Shape{1, 4});
  const Tensor one[] = {w4};
  CHECK(quant::weight_magnitude(one, 2) == std::vector<double>{0.5, 1.0, 1.0, 0.5});
}

TEST_CASE("aqas: with Qa = identity the search reproduces llm-awq's (same a, same errors)") {
  const Tensor x = outlier_inputs(96, 64, 1);
  const Tensor w = gaussian_weight(48, 64, 2);
  for (const std::string name : {"int4-g32", "int3-g32", "dint4-g32", "int4-g0"}) {
    CAPTURE(name);
    const quant::QuantConfig format = quant::QuantConfig::parse(name);
    const AwqSearch awq = awq_reference(x, w, format, 20);
    const Tensor weights[] = {w}, inputs[] = {x};
    const quant::ScaleSearchResult r = quant::search_scales(weights, inputs, {format, 0, 20, true});
    REQUIRE(r.errors.size() == 20);
    CHECK(r.best_grid == awq.best);
    for (std::size_t j = 0; j < 20; ++j) CHECK(r.errors[j] == doctest::Approx(awq.errors[j]).epsilon(1e-9));
    CHECK(r.alphas[std::size_t(r.best_grid)] > 0.0);  // the outlier channels make scaling worth it
    MESSAGE(name << ": AWQ a = " << r.alphas[std::size_t(r.best_grid)] << ", err " << r.errors[std::size_t(r.best_grid)]
                 << " vs unscaled " << r.identity_error);
  }
}

TEST_CASE("aqas: never worse than no scaling, with the unscaled W4A8 error computed from its definition") {
  const Tensor x = outlier_inputs(80, 64, 3);
  const Tensor w1 = gaussian_weight(32, 64, 4), w2 = gaussian_weight(16, 64, 5);
  const quant::QuantConfig format = quant::QuantConfig::parse("int4-g32");
  const Tensor weights[] = {w1, w2}, inputs[] = {x};
  for (int bits : {8, 6}) {
    CAPTURE(bits);
    // Unscaled W4A8: Qa(x) Qw(W)^T against x W^T, both linears, one mean.
    const std::vector<double> xq = quant::fake_quantize_per_token(x, bits).to_vector<double>(), xv = x.to_vector<double>();
    double sum = 0, count = 0;
    for (const Tensor& w : weights) {
      const std::vector<double> wq = quant::dequantize(quant::quantize(w, format), DType::f64).to_vector<double>();
      const std::vector<double> y = matmul_t(xq, wq, 80, 64, w.dim(0)), ref = matmul_t(xv, w.to_vector<double>(), 80, 64, w.dim(0));
      sum += mse(y, ref) * double(y.size());
      count += double(y.size());
    }
    const double unscaled = sum / count;
    const quant::ScaleSearchResult r = quant::search_scales(weights, inputs, {format, bits, 20, true});
    CHECK(r.identity_error == doctest::Approx(unscaled).epsilon(1e-9));
    CHECK(r.error() <= unscaled);
    CHECK(r.error() == *std::min_element(r.errors.begin(), r.errors.end()));  // here a grid point wins...
    CHECK(r.error() < 0.8 * unscaled);                                        // ...by a margin
    MESSAGE("W4A" << bits << " int4-g32: AQAS a = " << r.alphas[std::size_t(r.best_grid)] << ", err " << r.error()
                  << " vs unscaled " << unscaled);
  }
}

TEST_CASE("aqas: the identity candidate wins when scaling cannot help") {
  // A weight that int8 per row represents exactly (multiples of 2^-7 in [-1, 127/128], each row reaching
  // both ends, so scale = 2^-7 and zero = 128 exactly): s = 1 has no error at all, every grid point
  // rescales columns off the grid and has some.
  std::vector<double> wv(8 * 32), xv(40 * 32);
  for (std::size_t i = 0; i < wv.size(); ++i)
    wv[i] = (i % 32 == 0 ? -128.0 : i % 32 == 1 ? 127.0 : double(int(i * 37 % 255) - 128)) / 128.0;
  for (std::size_t i = 0; i < xv.size(); ++i) xv[i] = double(i * 7919 % 13) / 13.0 - 0.5 + (i % 5 == 0 ? 3.0 : 0.0);
  const Tensor weights[] = {Tensor::from(wv, Shape{8, 32})}, inputs[] = {Tensor::from(xv, Shape{40, 32})};
  const quant::QuantConfig format = quant::QuantConfig::parse("int8-g0");
  const quant::ScaleSearchResult r = quant::search_scales(weights, inputs, {format, 0, 20, true});
  CHECK(r.identity_error == 0.0);
  CHECK(r.identity_chosen);
  CHECK(!r.alpha().has_value());
  CHECK(r.scales == std::vector<double>(32, 1.0));
  const quant::ScaleSearchResult no_identity = quant::search_scales(weights, inputs, {format, 0, 20, false});
  CHECK(!no_identity.identity_chosen);
  CHECK(no_identity.error() > 0.0);
}

TEST_CASE("aqas: candidates apply Qa(x / s) and Qw(W s); bad groups are refused") {
  const Tensor x = outlier_inputs(6, 32, 7);
  const Tensor w = gaussian_weight(4, 32, 8);
  const Tensor weights[] = {w};
  std::vector<double> s(32);
  for (std::size_t c = 0; c < s.size(); ++c) s[c] = 0.5 + 0.05 * double(c);
  const quant::ScaleCandidate c = quant::make_candidate(weights, s, quant::QuantConfig::parse("int4-g16"), 8);
  // By hand: Qa(x diag(1/s)) Qw(W diag(s))^T.
  std::vector<double> xs = x.to_vector<double>(), ws = w.to_vector<double>();
  for (std::size_t i = 0; i < xs.size(); ++i) xs[i] /= s[i % 32];
  for (std::size_t i = 0; i < ws.size(); ++i) ws[i] *= s[i % 32];
  const std::vector<double> xq = quant::fake_quantize_per_token(Tensor::from(xs, Shape{6, 32}), 8).to_vector<double>();
  const std::vector<double> wq =
      quant::dequantize(quant::quantize(Tensor::from(ws, Shape{4, 32}), quant::QuantConfig::parse("int4-g16")), DType::f64)
          .to_vector<double>();
  const std::vector<double> expected = matmul_t(xq, wq, 6, 32, 4);
  const std::vector<double> got = c.forward(0, x).to_vector<double>();
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(got[i] == doctest::Approx(expected[i]).epsilon(1e-12));

  const Tensor narrow[] = {gaussian_weight(4, 16, 9)};
  const Tensor inputs[] = {x};
  CHECK(test::error_of([&] { quant::search_scales(narrow, inputs, {quant::QuantConfig::parse("int4-g16"), 8, 20, true}); })
            .find("search_scales: calibration input 0 must be (..., 16)") != std::string::npos);
  CHECK(test::error_of([&] { quant::search_scales(weights, inputs, {quant::QuantConfig::parse("int4-g16"), 3, 20, true}); })
            .find("activation bits must be 4..8") != std::string::npos);
}
