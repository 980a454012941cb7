// MagR (qlora/quant/magr.hpp, qlora/cpu/magr.hpp; maths ../shared/methods/magr.md): the proximal step against
// a brute-force minimisation, the objective's descent, magnitude reduction with the output preserved, MagR +
// RTN (with the code's beta) below RTN, the shrunk grid, composition with COMQ (and GPTQ when present), and
// refusals.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "layer_problem.hpp"
#include "qlora/cpu/magr.hpp"
#include "qlora/quant/comq.hpp"
#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/layer_error.hpp"
#include "qlora/quant/magr.hpp"
#include "qlora/quant/quantize.hpp"
#include "support/files.hpp"
#include "support/random.hpp"

#include "qlora/quant/gptq.hpp"

using qlora::Tensor;
using qlora::quant::MagrOptions;
using qlora::quant::QuantConfig;
using qlora::test::error_of;
using qlora::test::error_of_q;
using qlora::test::scales_of;

namespace {

// Brute force for prox_{t||.||inf}(v) = argmin_x 0.5 ||x - v||^2 + t ||x||_inf: for a fixed level c = ||x||_inf
// the best x is clip(v, c), with phi(c) = 0.5 sum max(|v_k| - c, 0)^2 + t c, convex and piecewise quadratic.
// On the piece where the support S = {k : |v_k| > c} is fixed, phi'(c) = 0 at c = (sum_S |v_k| - t) / |S|;
// every subset S gives a candidate (clamped to [0, max|v|]), plus the ends; the best candidate is the
// minimiser. No sorting and no prefix rule: independent of Duchi's algorithm in the code.
double brute_force_level(const std::vector<double>& v, double t) {
  const std::size_t n = v.size();
  double vmax = 0;
  for (const double x : v) vmax = std::max(vmax, std::fabs(x));
  const auto phi = [&](double c) {
    double s = 0;
    for (const double x : v) s += 0.5 * std::pow(std::max(std::fabs(x) - c, 0.0), 2);
    return s + t * c;
  };
  double best = 0, best_phi = phi(0);
  if (phi(vmax) < best_phi) {
    best = vmax;
    best_phi = phi(vmax);
  }
  for (std::uint32_t mask = 1; mask < (1u << n); ++mask) {
    double mass = 0;
    int count = 0;
    for (std::size_t k = 0; k < n; ++k)
      if (mask & (1u << k)) {
        mass += std::fabs(v[k]);
        ++count;
      }
    const double c = std::clamp((mass - t) / count, 0.0, vmax);
    if (phi(c) < best_phi) {
      best_phi = phi(c);
      best = c;
    }
  }
  return best;
}

// Per row max|w'| / max|w|, averaged over rows.
double mean_max_shrink(const Tensor& w, const Tensor& wm) {
  const auto a = w.to_vector<float>(), b = wm.to_vector<float>();
  const std::int64_t rows = w.dim(0), cols = w.dim(1);
  double total = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    float ma = 0, mb = 0;
    for (std::int64_t j = 0; j < cols; ++j) {
      ma = std::max(ma, std::fabs(a[std::size_t(r * cols + j)]));
      mb = std::max(mb, std::fabs(b[std::size_t(r * cols + j)]));
    }
    total += double(mb) / double(ma);
  }
  return total / double(rows);
}

qlora::test::LayerProblem outlier_problem(std::int64_t rows = 128, std::int64_t cols = 256) {
  qlora::test::LayerProblemSpec spec;
  spec.rows = rows;
  spec.cols = cols;
  spec.seed = 7;
  spec.outlier_channels = 8.0 / double(cols);  // magr.md: 8 outlier channels
  return qlora::test::make_layer_problem(spec);
}

}  // namespace

TEST_CASE("quant magr: the prox step equals a brute-force minimisation over clip levels") {
  std::mt19937_64 gen(5);
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  for (int trial = 0; trial < 300; ++trial) {
    const std::size_t n = 1 + std::size_t(trial % 8);
    std::vector<double> v(n);
    for (auto& x : v) x = unit(gen) * (trial % 3 == 0 ? 10.0 : 1.0);
    double l1 = 0;
    for (const double x : v) l1 += std::fabs(x);
    // t from tiny to beyond ||v||_1 (then the prox is 0).
    const double t = l1 * std::array<double, 5>{1e-3, 0.1, 0.5, 0.99, 1.5}[std::size_t(trial % 5)];
    CAPTURE(trial);
    std::vector<double> out(n);
    qlora::cpu::linf_prox_rows(v.data(), out.data(), 1, std::int64_t(n), std::int64_t(n), t);
    const double c = brute_force_level(v, t);
    for (std::size_t k = 0; k < n; ++k) CHECK(std::fabs(out[k] - std::clamp(v[k], -c, c)) <= 1e-12 * (1 + std::fabs(v[k])));
    // Moreau: (v - prox) / t is the projection onto the unit l1 ball: on its surface unless v is inside t's ball.
    double proj = 0;
    for (std::size_t k = 0; k < n; ++k) proj += std::fabs(v[k] - out[k]) / t;
    if (l1 > t) CHECK(proj == doctest::Approx(1.0).epsilon(1e-12));
    else CHECK(proj == doctest::Approx(l1 / t).epsilon(1e-12));
  }
  // t = 0 is the identity.
  std::vector<float> v = qlora::test::random_vector<float>(50, 6), out(50);
  qlora::cpu::linf_prox_rows(v.data(), out.data(), 1, 50, 50, 0.0);
  CHECK(out == v);
}

TEST_CASE("quant magr: the partial sort widens to a full sort when many entries are clipped") {
  // 1000 entries, t large enough that hundreds are clipped (rho > 64 and > 256): the level must satisfy
  // sum max(|v| - c, 0) = t exactly as with a full sort.
  const auto v = qlora::test::random_vector<double>(1000, 8, -1.0, 1.0);
  for (const double t : {0.01, 5.0, 60.0, 200.0}) {
    CAPTURE(t);
    std::vector<double> out(v.size());
    qlora::cpu::linf_prox_rows(v.data(), out.data(), 1, 1000, 1000, t);
    double c = 0, excess = 0;
    for (const double x : out) c = std::max(c, std::fabs(x));
    for (const double x : v) excess += std::max(std::fabs(x) - c, 0.0);
    CHECK(excess == doctest::Approx(t).epsilon(1e-10));
  }
}

TEST_CASE("quant magr: the group-wise prox acts on each (row, group) alone") {
  const std::int64_t rows = 3, cols = 70, group = 16;  // groups of 16, 16, 16, 16, 6
  const auto v = qlora::test::random_vector<float>(std::size_t(rows * cols), 9);
  std::vector<float> out(v.size());
  qlora::cpu::linf_prox_rows(v.data(), out.data(), rows, cols, group, 0.3);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t b = 0; b < cols; b += group) {
      const std::int64_t n = std::min(group, cols - b);
      const std::vector<float> seg(v.begin() + r * cols + b, v.begin() + r * cols + b + n);
      std::vector<float> seg_out(seg.size());
      qlora::cpu::linf_prox_rows(seg.data(), seg_out.data(), 1, n, n, 0.3);
      for (std::int64_t j = 0; j < n; ++j) CHECK(out[std::size_t(r * cols + b + j)] == seg_out[std::size_t(j)]);
    }
  // In place gives the same.
  std::vector<float> inplace = v;
  qlora::cpu::linf_prox_rows(inplace.data(), inplace.data(), rows, cols, group, 0.3);
  CHECK(inplace == out);
}

TEST_CASE("quant magr: lambda_max(H) by power iteration equals Eigen's eigensolver") {
  const auto p = outlier_problem(4, 96);
  const auto h = p.h.to_vector<float>();
  Eigen::MatrixXd m(96, 96);
  for (int i = 0; i < 96; ++i)
    for (int k = 0; k < 96; ++k) m(i, k) = double(h[std::size_t(i * 96 + k)]);
  const double expected = Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(m).eigenvalues().maxCoeff();
  CHECK(qlora::quant::gram_spectral_norm(p.h) == doctest::Approx(expected).epsilon(1e-8));
}

TEST_CASE("quant magr: alpha 0 keeps W, a huge alpha drives it to 0, the objective descends") {
  const auto p = outlier_problem(32, 64);
  MagrOptions o;
  o.alpha = 0;
  CHECK(qlora::quant::magr_preprocess(p.w, p.h, o).to_vector<float>() == p.w.to_vector<float>());
  o.alpha = 1e3;
  o.iterations = 5;
  for (const float x : qlora::quant::magr_preprocess(p.w, p.h, o).to_vector<float>()) CHECK(x == 0.f);
  // Objective per iteration (each run repeats the previous one's iterations exactly, then one more): a prox-
  // gradient step of size 1/L decreases it. f32 iterations: a relative slack of 1e-6 for rounding.
  o.alpha = 1e-3;
  std::vector<double> objective;
  for (int k = 0; k <= 12; ++k) {
    o.iterations = k;
    objective.push_back(qlora::quant::magr_objective(p.w, qlora::quant::magr_preprocess(p.w, p.h, o), p.h, o));
  }
  for (std::size_t k = 1; k < objective.size(); ++k) {
    CAPTURE(k);
    CHECK(objective[k] <= objective[k - 1] * (1 + 1e-6));
  }
  o.iterations = 200;
  const double final_objective = qlora::quant::magr_objective(p.w, qlora::quant::magr_preprocess(p.w, p.h, o), p.h, o);
  MESSAGE("MagR objective: start " << objective[0] << ", 12 iterations " << objective.back() << ", 200 iterations "
                                   << final_objective);
  CHECK(final_objective < 0.8 * objective[0]);
}

TEST_CASE("quant magr: lower max|w| per channel, nearly the same outputs, MagR + RTN below RTN") {
  // magr.md numeric check (X with a decaying spectrum and 8 outlier channels, W ~ N(0, 0.02^2) with 0.2 %
  // outliers x8, alpha 1e-3, 200 iterations): max|w| per row shrinks to 53 % on average with an output change
  // ||X (W' - W)^T|| / ||X W^T|| of 3.6 %; MagR + RTN(beta) has 0.41 / 0.34 / 0.43 of RTN's error at 4 / 3 / 2
  // bits. Here 128 x 256 instead of 512 x 512: the bounds below (shrink < 0.8, output change < 8 %, i.e. about
  // twice the method file's values, MagR + RTN < 0.8 of RTN) hold the direction with margin, not its digits.
  const auto p = outlier_problem();
  const Tensor wm = qlora::quant::magr_preprocess(p.w, p.h);
  const double shrink = mean_max_shrink(p.w, wm);
  const double change = std::sqrt(qlora::quant::layer_output_error(p.w, wm, p.h) /
                                  qlora::quant::layer_output_error(p.w, Tensor::zeros(p.w.shape()), p.h));
  MESSAGE("MagR alpha 1e-3: mean max|w'| / max|w| per row " << shrink << ", output change " << change);
  CHECK(shrink < 0.8);
  CHECK(change < 0.08);
  for (const char* name : {"int4-g0", "int3-g0", "int2-g0"}) {
    CAPTURE(std::string(name));
    const QuantConfig cfg = QuantConfig::parse(name);
    const double beta = qlora::quant::magr_default_beta(cfg);
    const double e_rtn = error_of_q(p, qlora::quant::quantize(p.w, cfg));
    const double e_rtn_beta = error_of_q(p, qlora::quant::magr_rtn_quantize(p.w, cfg, beta));
    const auto magr_q = qlora::quant::magr_rtn_quantize(wm, cfg, beta);
    const double e_magr = error_of_q(p, magr_q);
    // COMQ against the ORIGINAL weights on MagR's grid: never above its MagR + RTN start.
    const double e_magr_comq = error_of_q(p, qlora::quant::comq_refine(p.w, p.h, magr_q));
    MESSAGE(std::string(name) << " (beta " << beta << "): error / RTN: RTN(beta) " << e_rtn_beta / e_rtn << ", MagR + RTN(beta) "
                 << e_magr / e_rtn << ", MagR + RTN + COMQ " << e_magr_comq / e_rtn);
    CHECK(e_magr < 0.8 * e_rtn);
    CHECK(e_magr_comq <= e_magr);
  }
  // Group 128, alpha 1e-4, beta 0.95 (magr.md: group max to 83 %, MagR + RTN 0.85 / 0.79 of RTN at 4 / 2 bits).
  const Tensor wg = qlora::quant::magr_preprocess(p.w, p.h, qlora::quant::magr_options_for_group(128));
  for (const char* name : {"int4-g128", "int2-g128"}) {
    CAPTURE(std::string(name));
    const QuantConfig cfg = QuantConfig::parse(name);
    const double e_rtn = error_of_q(p, qlora::quant::quantize(p.w, cfg));
    const double e_magr = error_of_q(p, qlora::quant::magr_rtn_quantize(wg, cfg, qlora::quant::magr_default_beta(cfg)));
    MESSAGE(std::string(name) << ": MagR(group 128) + RTN(beta 0.95) / RTN " << e_magr / e_rtn);
    CHECK(e_magr < e_rtn);
  }
  // MagR + GPTQ (optq.py after MagR: GPTQ on Wm with beta-shrunk grids). magr.md's table, relative to RTN(W) at
  // 4 / 3 / 2 bits: GPTQ(W) 0.075 / 0.085 / 0.168, GPTQ(W) with beta 0.075 / 0.107 / 0.190, MagR + GPTQ(beta)
  // 0.067 / 0.040 / 0.079. Checked here: MagR + GPTQ(beta) below GPTQ(W) at every width, by 0.8 at 3 and 2
  // bits (the method file has 0.47 and 0.47; this toy gives 0.54 and 0.47). Whether beta alone helps GPTQ
  // depends on the problem (the method file: worse at 3 and 2 bits; this toy: worse at 3, better at 2).
  for (const char* name : {"int4-g0", "int3-g0", "int2-g0"}) {
    CAPTURE(std::string(name));
    const QuantConfig cfg = QuantConfig::parse(name);
    qlora::quant::GptqOptions shrunk;
    shrunk.grid_shrink = qlora::quant::magr_default_beta(cfg);
    const double e_rtn = error_of_q(p, qlora::quant::quantize(p.w, cfg));
    const double e_gptq = error_of_q(p, qlora::quant::gptq_quantize(p.w, p.h, cfg));
    const double e_gptq_beta = error_of_q(p, qlora::quant::gptq_quantize(p.w, p.h, cfg, shrunk));
    const double e_magr_gptq_plain = error_of_q(p, qlora::quant::gptq_quantize(wm, p.h, cfg));
    const double e_magr_gptq = error_of_q(p, qlora::quant::gptq_quantize(wm, p.h, cfg, shrunk));
    MESSAGE(std::string(name) << " (beta " << shrunk.grid_shrink << "): error / RTN: GPTQ(W) " << e_gptq / e_rtn
                 << ", GPTQ(W, beta) " << e_gptq_beta / e_rtn << ", MagR + GPTQ(beta 1) " << e_magr_gptq_plain / e_rtn
                 << ", MagR + GPTQ(beta) " << e_magr_gptq / e_rtn);
    CHECK(e_magr_gptq < e_gptq);
    if (cfg.bits < 4) CHECK(e_magr_gptq < 0.8 * e_gptq);
  }
}

TEST_CASE("quant magr: the shrunk RTN grid (beta)") {
  const std::int64_t rows = 4, cols = 96;
  const Tensor w = Tensor::from(qlora::test::gaussian(std::size_t(rows * cols), 12), {rows, cols});
  for (const char* name : {"int4-g32", "int2-g0", "int3-g32-sym", "dint4-g32", "int4-g32-fz"}) {
    CAPTURE(std::string(name));
    const QuantConfig cfg = QuantConfig::parse(name);
    const auto plain = qlora::quant::quantize(w, cfg);
    const auto same = qlora::quant::magr_rtn_quantize(w, cfg, 1.0);
    CHECK(same.codes.to_vector<std::uint8_t>() == plain.codes.to_vector<std::uint8_t>());
    CHECK(scales_of(same) == scales_of(plain));
    const auto shrunk = qlora::quant::magr_rtn_quantize(w, cfg, 0.8);
    const auto a = plain.scales.to_vector<qlora::f16>(), b = shrunk.scales.to_vector<qlora::f16>();
    for (std::size_t i = 0; i < a.size(); ++i)  // scale = beta (hi - lo) / qmax, up to the two f16 roundings
      CHECK(qlora::to_float(b[i]) == doctest::Approx(0.8 * qlora::to_float(a[i])).epsilon(2e-3));
    // Every value lies on its group's shrunk grid: re-quantizing the dequantized weights changes nothing.
    const auto values = qlora::quant::dequantize(shrunk).to_vector<float>();
    const auto again = qlora::quant::magr_rtn_quantize(w, cfg, 0.8);
    CHECK(qlora::quant::dequantize(again).to_vector<float>() == values);
  }
  // The asymmetric zero keeps the low end: zero = round(-lo / scale) with the shrunk scale.
  const QuantConfig cfg = QuantConfig::parse("int4-g0");
  const auto q = qlora::quant::magr_rtn_quantize(w, cfg, 0.8);
  const auto wv = w.to_vector<float>();
  for (std::int64_t r = 0; r < rows; ++r) {
    const float lo = std::min(0.f, *std::min_element(wv.begin() + r * cols, wv.begin() + (r + 1) * cols));
    const float scale = qlora::to_float(q.scales.data<qlora::f16>()[r]);
    CHECK(float(q.zeros.data<std::uint8_t>()[r]) == std::clamp(std::nearbyint(-lo / scale), 0.f, 15.f));
  }
}

TEST_CASE("quant magr: bad input is refused with a clear message") {
  const auto p = outlier_problem(4, 32);
  MagrOptions o;
  o.alpha = -1;
  CHECK(error_of([&] { qlora::quant::magr_preprocess(p.w, p.h, o); }).find("alpha") != std::string::npos);
  o = {};
  o.iterations = -3;
  CHECK(error_of([&] { qlora::quant::magr_preprocess(p.w, p.h, o); }).find("iterations") != std::string::npos);
  o = {};
  o.group = -2;
  CHECK(error_of([&] { qlora::quant::magr_preprocess(p.w, p.h, o); }).find("group") != std::string::npos);
  CHECK(error_of([&] { qlora::quant::magr_preprocess(p.w, Tensor::zeros({8, 8})); }).find("[32, 32]") !=
        std::string::npos);
  CHECK(error_of([&] { qlora::quant::magr_preprocess(p.w, Tensor::zeros({32, 32})); }).find("zero") !=
        std::string::npos);
  auto h = p.h.to_vector<float>();
  h[4 * 32 + 2] = NAN;
  CHECK(error_of([&] { qlora::quant::magr_preprocess(p.w, Tensor::from(h, {32, 32})); }).find("row 4, column 2") !=
        std::string::npos);
  const QuantConfig cfg = QuantConfig::parse("int3-g0");
  CHECK(error_of([&] { qlora::quant::magr_rtn_quantize(p.w, cfg, 0.0); }).find("beta") != std::string::npos);
  CHECK(error_of([&] { qlora::quant::magr_rtn_quantize(p.w, cfg, 1.5); }).find("beta") != std::string::npos);
  CHECK(error_of([&] { qlora::quant::magr_rtn_quantize(p.w, QuantConfig::parse("nf4"), 0.9); }).find("NF4") !=
        std::string::npos);
  CHECK(error_of([&] { qlora::quant::magr_rtn_quantize(p.w, QuantConfig::parse("int3-g0-mse"), 0.9); }).find("-mse") !=
        std::string::npos);
#if !defined(QLORA_WITH_CUDA)
  o = {};
  o.device = qlora::Device::cuda(0);
  CHECK(error_of([&] { qlora::quant::magr_preprocess(p.w, p.h, o); }).find("without CUDA") != std::string::npos);
#endif
}
