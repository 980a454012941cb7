// COMQ (qlora/quant/comq.hpp; maths ../shared/methods/comq.md): the layer error never rises above the RTN
// start, falls well below RTN on correlated inputs with outlier channels (the method file's numeric check),
// equals RTN on a diagonal H, matches an independent X-form implementation of quant.py's update, improves
// with sweeps, and its scale update is the least-squares scale.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "layer_problem.hpp"
#include "qlora/quant/comq.hpp"
#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/layer_error.hpp"
#include "qlora/quant/quantize.hpp"
#include "support/files.hpp"
#include "support/random.hpp"

using qlora::DType;
using qlora::Tensor;
using qlora::quant::ComqOptions;
using qlora::quant::QuantConfig;
using qlora::test::error_of;
using qlora::test::error_of_q;
using qlora::test::scales_of;

namespace {

ComqOptions options(int sweeps, bool greedy, bool scales, bool from_weights = false) {
  ComqOptions o;
  o.sweeps = sweeps;
  o.greedy_order = greedy;
  o.update_scales = scales;
  o.start_from_weights = from_weights;
  return o;
}

}  // namespace

TEST_CASE("quant comq: never above its RTN start, and well below RTN on the outlier problem") {
  // comq.md numeric check: X 2048 x 256 with a decaying spectrum and 2 % outlier channels, W 256 x 256 (here
  // 96 rows, same statistics per row). Its table (greedy, 1 sweep, start Q = W): 0.35-0.38 of RTN; 3 sweeps
  // 0.26-0.28; 3 sweeps + scale updates 0.20-0.23; natural order 1 sweep 0.45-0.77. Our default starts from
  // RTN (slightly worse, 0.264 vs 0.258 there). The bounds below leave a clear margin above those values.
  qlora::test::LayerProblemSpec spec;
  spec.rows = 96;
  spec.seed = 11;
  const auto p = qlora::test::make_layer_problem(spec);
  for (const char* name : {"int4-g0", "int3-g0", "int2-g0", "int3-g64", "int2-g64", "int4-g64-sym", "dint4-g64",
                           "int3-g64-fz"}) {
    CAPTURE(std::string(name));
    const QuantConfig cfg = QuantConfig::parse(name);
    const auto rtn = qlora::quant::quantize(p.w, cfg);
    const double e_rtn = error_of_q(p, rtn);
    const double natural1 = error_of_q(p, qlora::quant::comq_refine(p.w, p.h, rtn, options(1, false, false))) / e_rtn;
    const double greedy1 = error_of_q(p, qlora::quant::comq_quantize(p.w, p.h, cfg)) / e_rtn;
    const double greedy2 = error_of_q(p, qlora::quant::comq_quantize(p.w, p.h, cfg, options(2, true, false))) / e_rtn;
    const double greedy3 = error_of_q(p, qlora::quant::comq_quantize(p.w, p.h, cfg, options(3, true, false))) / e_rtn;
    const double scales1 = error_of_q(p, qlora::quant::comq_quantize(p.w, p.h, cfg, options(1, true, true))) / e_rtn;
    const double scales3 = error_of_q(p, qlora::quant::comq_quantize(p.w, p.h, cfg, options(3, true, true))) / e_rtn;
    const double natural1_w =
        error_of_q(p, qlora::quant::comq_quantize(p.w, p.h, cfg, options(1, false, false, true))) / e_rtn;
    const double greedy1_w = error_of_q(p, qlora::quant::comq_quantize(p.w, p.h, cfg, options(1, true, false, true))) / e_rtn;
    const double greedy3_w = error_of_q(p, qlora::quant::comq_quantize(p.w, p.h, cfg, options(3, true, false, true))) / e_rtn;
    MESSAGE(std::string(name) << ": error / RTN, RTN start: natural 1 sweep " << natural1 << ", greedy 1 " << greedy1
                              << ", greedy 2 " << greedy2 << ", greedy 3 " << greedy3 << ", greedy 1 + scales " << scales1
                              << ", greedy 3 + scales " << scales3 << "; Q = W start: natural 1 " << natural1_w
                              << ", greedy 1 " << greedy1_w << ", greedy 3 " << greedy3_w);
    // Guaranteed by construction (exact coordinate and block minimisers from the RTN codes).
    CHECK(natural1 <= 1.0);
    CHECK(greedy1 <= 1.0);
    CHECK(greedy2 <= greedy1);  // sweep k + 1 continues from sweep k (deterministic prefix)
    CHECK(greedy3 <= greedy2);
    CHECK(scales1 <= greedy1);  // the same code sweep, then a non-increasing scale step
    CHECK(scales3 <= scales1);
    // The method file's direction, with margin. The greedy order matters for the Q = W start (the first
    // sweep rounds with error feedback in that order; natural order is then GPTQ-like); from RTN both orders
    // are close.
    CHECK(greedy1 < 0.6);
    CHECK(greedy3 < 0.45);
    CHECK(scales3 < 0.35);
    CHECK(greedy1_w < 0.6);
    CHECK(greedy3_w < 0.4);
    CHECK(greedy1_w < natural1_w);
  }
}

TEST_CASE("quant comq: on a diagonal H the codes are RTN's") {
  // With H diagonal the coordinate target is t = q_j + H_jj (w_j - q_j) / H_jj = w_j: every step rounds w_j,
  // which is RTN on the same grid (comq.md Tests). Exact, for both starts and orders.
  const std::int64_t rows = 12, cols = 200;
  const Tensor w = Tensor::from(qlora::test::gaussian(std::size_t(rows * cols), 3), {rows, cols});
  auto diag = qlora::test::random_vector<float>(std::size_t(cols), 4, 0.5, 3.0);
  for (const bool identity : {true, false}) {
    std::vector<float> h(std::size_t(cols * cols), 0.f);
    for (std::int64_t j = 0; j < cols; ++j) h[std::size_t(j * cols + j)] = identity ? 1.f : diag[std::size_t(j)];
    const Tensor ht = Tensor::from(h, {cols, cols});
    for (const char* name : {"int4-g0", "int3-g64", "int2-g32-sym", "int4-g64-fz", "int8-g128"}) {
      for (const bool greedy : {true, false}) {
        for (const bool from_w : {false, true}) {
          CAPTURE(std::string(name));
          CAPTURE(greedy);
          CAPTURE(from_w);
          const QuantConfig cfg = QuantConfig::parse(name);
          const auto rtn = qlora::quant::quantize(w, cfg);
          const auto comq = qlora::quant::comq_quantize(w, ht, cfg, options(2, greedy, false, from_w));
          CHECK(comq.codes.to_vector<std::uint8_t>() == rtn.codes.to_vector<std::uint8_t>());
          CHECK(scales_of(comq) == scales_of(rtn));
        }
      }
    }
  }
}

TEST_CASE("quant comq: the H-form step equals quant.py's X-form step") {
  // An independent implementation of the released code's update (comq.md "Coordinate update", X form), in
  // f64 on X itself, natural order, one sweep from the RTN codes, plain nearest grid value:
  //   u = X (w - q) - x_j (w_j - q_j);  t = w_j + <x_j, u> / ||x_j||^2;  q_j = nearest grid value to t.
  qlora::test::LayerProblemSpec spec;
  spec.rows = 6;
  spec.cols = 40;
  spec.tokens = 128;
  spec.seed = 21;
  const auto p = qlora::test::make_layer_problem(spec);
  const std::int64_t n = spec.tokens, d = spec.cols;
  const std::vector<double> x = p.x.to_vector<double>();
  // H in f64 from the same X, so that both forms see the same problem.
  std::vector<double> h(std::size_t(d * d), 0.0);
  for (std::int64_t i = 0; i < d; ++i)
    for (std::int64_t k = 0; k < d; ++k) {
      double s = 0;
      for (std::int64_t t = 0; t < n; ++t) s += x[std::size_t(t * d + i)] * x[std::size_t(t * d + k)];
      h[std::size_t(i * d + k)] = s / double(n);
    }
  const Tensor h64 = Tensor::from(h, {d, d});
  const std::vector<float> w = p.w.to_vector<float>();
  for (const char* name : {"int3-g0", "int2-g16", "int4-g16-sym"}) {
    CAPTURE(std::string(name));
    const QuantConfig cfg = QuantConfig::parse(name);
    const auto rtn = qlora::quant::quantize(p.w, cfg);
    const auto comq = qlora::quant::comq_refine(p.w, h64, rtn, options(1, false, false));
    std::vector<float> q = qlora::quant::dequantize(rtn).to_vector<float>();
    const std::vector<qlora::f16> scales = rtn.scales.to_vector<qlora::f16>();
    const std::int64_t gpr = rtn.groups_per_row(), group = rtn.group_size();
    const int qmax = (1 << cfg.bits) - 1;
    for (std::int64_t r = 0; r < spec.rows; ++r) {
      for (std::int64_t j = 0; j < d; ++j) {
        std::vector<double> u(std::size_t(n), 0.0);
        for (std::int64_t t = 0; t < n; ++t) {
          double s = 0;
          for (std::int64_t k = 0; k < d; ++k)
            if (k != j) s += x[std::size_t(t * d + k)] * (double(w[std::size_t(r * d + k)]) - q[std::size_t(r * d + k)]);
          u[std::size_t(t)] = s;
        }
        double xu = 0, xx = 0;
        for (std::int64_t t = 0; t < n; ++t) {
          xu += x[std::size_t(t * d + j)] * u[std::size_t(t)];
          xx += x[std::size_t(t * d + j)] * x[std::size_t(t * d + j)];
        }
        const double target = double(w[std::size_t(r * d + j)]) + xu / xx;
        // Nearest value among the group's levels scale * (k - zero), k = 0..qmax.
        const double scale = qlora::to_float(scales[std::size_t(r * gpr + j / group)]);
        const double zero = cfg.scheme == qlora::quant::Scheme::int_sym
                                ? double(1 << (cfg.bits - 1))
                                : double(rtn.zeros.data<std::uint8_t>()[r * gpr + j / group]);
        double best = 0, best_dist = INFINITY;
        for (int k = 0; k <= qmax; ++k) {
          const double v = scale * (k - zero);
          if (std::fabs(v - target) < best_dist) {
            best_dist = std::fabs(v - target);
            best = v;
          }
        }
        q[std::size_t(r * d + j)] = float(best);
      }
    }
    const std::vector<float> got = qlora::quant::dequantize(comq).to_vector<float>();
    CHECK(got == q);
  }
}

TEST_CASE("quant comq: the scale update is the least-squares scale of the final codes") {
  // Per channel, with the codes fixed the best scale is s = m^T H w / m^T H m (m = code - zero; comq.md
  // "Scale update"); the stored scale is that value rounded to f16 (one f16 step tolerance: the update is
  // skipped when rounding would not lower the error).
  qlora::test::LayerProblemSpec spec;
  spec.rows = 16;
  spec.cols = 128;
  spec.seed = 31;
  const auto p = qlora::test::make_layer_problem(spec);
  const QuantConfig cfg = QuantConfig::parse("int3-g0");
  const auto q = qlora::quant::comq_quantize(p.w, p.h, cfg, options(2, true, true));
  const auto codes = [&] {
    std::vector<std::uint8_t> c(std::size_t(spec.rows * spec.cols));
    qlora::cpu::unpack_codes(q.codes.data<std::uint8_t>(), spec.rows, spec.cols, cfg.bits, c.data());
    return c;
  }();
  const std::vector<float> w = p.w.to_vector<float>(), h = p.h.to_vector<float>();
  const std::int64_t d = spec.cols;
  for (std::int64_t r = 0; r < spec.rows; ++r) {
    const double zero = q.zeros.data<std::uint8_t>()[r];
    double num = 0, den = 0;
    for (std::int64_t i = 0; i < d; ++i) {
      const double mi = double(codes[std::size_t(r * d + i)]) - zero;
      for (std::int64_t k = 0; k < d; ++k) {
        const double mk = double(codes[std::size_t(r * d + k)]) - zero;
        num += mi * double(h[std::size_t(i * d + k)]) * double(w[std::size_t(r * d + k)]);
        den += mi * double(h[std::size_t(i * d + k)]) * mk;
      }
    }
    const double least_squares = num / den;
    const double stored = qlora::to_float(q.scales.data<qlora::f16>()[r]);
    CAPTURE(r);
    CHECK(std::fabs(stored - least_squares) <= std::ldexp(std::fabs(least_squares), -10));  // one f16 ulp
    for (std::int64_t j = 0; j < d; ++j) CHECK(codes[std::size_t(r * d + j)] <= 7);  // 3-bit codes stay in range
  }
}

TEST_CASE("quant comq: dead inputs keep their RTN codes; the greedy order is per row") {
  qlora::test::LayerProblemSpec spec;
  spec.rows = 8;
  spec.cols = 64;
  spec.seed = 41;
  const auto p = qlora::test::make_layer_problem(spec);
  // Input channel 5 never fires: its row and column of H are zero.
  std::vector<float> h = p.h.to_vector<float>();
  for (std::int64_t k = 0; k < spec.cols; ++k) h[std::size_t(5 * spec.cols + k)] = h[std::size_t(k * spec.cols + 5)] = 0.f;
  const Tensor ht = Tensor::from(h, {spec.cols, spec.cols});
  const QuantConfig cfg = QuantConfig::parse("int2-g0");
  const auto rtn = qlora::quant::quantize(p.w, cfg);
  for (const bool from_w : {false, true}) {
    const auto comq = qlora::quant::comq_quantize(p.w, ht, cfg, options(2, true, true, from_w));
    const auto a = qlora::quant::dequantize(comq).to_vector<float>();
    const auto b = qlora::quant::dequantize(rtn).to_vector<float>();
    for (std::int64_t r = 0; r < spec.rows; ++r) CHECK(std::isfinite(a[std::size_t(r * spec.cols + 5)]));
    if (!from_w) CHECK(qlora::quant::layer_output_error(p.w, qlora::quant::dequantize(comq), ht) <=
                       qlora::quant::layer_output_error(p.w, qlora::quant::dequantize(rtn), ht));
    std::vector<std::uint8_t> ca(std::size_t(spec.rows * spec.cols)), cb = ca;
    qlora::cpu::unpack_codes(comq.codes.data<std::uint8_t>(), spec.rows, spec.cols, 2, ca.data());
    qlora::cpu::unpack_codes(rtn.codes.data<std::uint8_t>(), spec.rows, spec.cols, 2, cb.data());
    for (std::int64_t r = 0; r < spec.rows; ++r) CHECK(ca[std::size_t(r * spec.cols + 5)] == cb[std::size_t(r * spec.cols + 5)]);
  }
  // The order: |w_j| sqrt(H_jj) descending per row, without the dead column.
  qlora::cpu::ComqScratch s;
  const std::vector<float> w = p.w.to_vector<float>();
  for (std::int64_t r = 0; r < 2; ++r) {
    qlora::cpu::comq_column_order(w.data() + r * spec.cols, h.data(), spec.cols, true, s);
    REQUIRE(s.order.size() == std::size_t(spec.cols - 1));
    for (std::size_t t = 0; t + 1 < s.order.size(); ++t) {
      const auto key = [&](std::int64_t j) {
        return std::fabs(double(w[std::size_t(r * spec.cols + j)])) * std::sqrt(double(h[std::size_t(j * spec.cols + j)]));
      };
      CHECK(key(s.order[t]) >= key(s.order[t + 1]));
      CHECK(s.order[t] != 5);
    }
  }
}

TEST_CASE("quant comq: bad input is refused with a clear message") {
  const Tensor w = Tensor::from(qlora::test::gaussian(4 * 32, 51), {4, 32});
  std::vector<float> h(32 * 32, 0.f);
  for (int j = 0; j < 32; ++j) h[std::size_t(j * 32 + j)] = 1.f;
  const Tensor ht = Tensor::from(h, {32, 32});
  const QuantConfig cfg = QuantConfig::parse("int4-g0");
  CHECK(error_of([&] { qlora::quant::comq_quantize(w, ht, QuantConfig::parse("nf4")); }).find("NF4") != std::string::npos);
  CHECK(error_of([&] { qlora::quant::comq_quantize(w, Tensor::zeros({16, 16}), cfg); }).find("[32, 32]") !=
        std::string::npos);
  auto bad = h;
  bad[3 * 32 + 7] = NAN;
  CHECK(error_of([&] { qlora::quant::comq_quantize(w, Tensor::from(bad, {32, 32}), cfg); }).find("row 3, column 7") !=
        std::string::npos);
  bad = h;
  bad[9 * 32 + 9] = -1.f;
  CHECK(error_of([&] { qlora::quant::comq_quantize(w, Tensor::from(bad, {32, 32}), cfg); }).find("negative diagonal") !=
        std::string::npos);
  CHECK(error_of([&] { qlora::quant::comq_quantize(w, ht, cfg, options(0, true, false)); }).find("sweeps") !=
        std::string::npos);
  const auto other = qlora::quant::quantize(Tensor::from(qlora::test::gaussian(5 * 32, 52), {5, 32}), cfg);
  CHECK(error_of([&] { qlora::quant::comq_refine(w, ht, other); }).find("5 x 32") != std::string::npos);
  auto wbad = w.to_vector<float>();
  wbad[2 * 32 + 1] = INFINITY;
  CHECK(error_of([&] { qlora::quant::comq_quantize(Tensor::from(wbad, {4, 32}), ht, cfg); }).find("row 2") !=
        std::string::npos);
  CHECK_THROWS_AS(qlora::quant::comq_quantize(w, Tensor::zeros({32, 32}, DType::bf16), cfg), qlora::Error);
}
