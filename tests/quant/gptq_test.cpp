// GPTQ (qlora/quant/gptq.hpp) against the properties of baselines.md section 3 and an independent float64
// implementation of the textbook OBQ / GPTQ recursion (written below: the full inverse Hessian, updated by
// removing each quantized column; not the Cholesky form the library uses).
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "qlora/quant/gptq.hpp"
#include "qlora/quant/gram.hpp"
#include "qlora/quant/layer_error.hpp"
#include "qlora/quant/magr.hpp"
#include "qlora/quant/quant.hpp"
#include "support/files.hpp"
#include "support/random.hpp"

using qlora::DType;
using qlora::Shape;
using qlora::Tensor;
using qlora::test::error_of;
using qlora::quant::GptqOptions;
using qlora::quant::QuantConfig;
using qlora::quant::QuantizedTensor;

namespace {

// Weight-like values (normal, sigma 0.02) with a few 6x outliers, so groups have distinct ranges.
Tensor random_weight(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::vector<float> w = qlora::test::gaussian(std::size_t(rows * cols), seed);
  for (std::size_t i = 0; i < w.size(); i += 53) w[i] *= 6.f;
  return Tensor::from(w, Shape{rows, cols});
}

// H = X^T X / n through GramAccumulator for n correlated inputs: x_j = 0.8 x_{j-1} + noise (neighbouring
// features correlated, as in a real layer) times a per-feature scale in [0.2, 3] (uneven diag H).
Tensor correlated_hessian(std::int64_t cols, std::int64_t n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> scale_dist(0.2, 3.0);
  std::vector<double> scale(static_cast<std::size_t>(cols));
  for (auto& s : scale) s = scale_dist(gen);
  std::vector<float> x(std::size_t(n * cols));
  for (std::int64_t t = 0; t < n; ++t) {
    double prev = normal(gen);
    for (std::int64_t j = 0; j < cols; ++j) {
      prev = 0.8 * prev + 0.6 * normal(gen);
      x[std::size_t(t * cols + j)] = float(prev * scale[std::size_t(j)]);
    }
  }
  qlora::quant::GramAccumulator acc(cols, qlora::Device::cpu());
  acc.add(Tensor::from(x, Shape{n, cols}));
  return acc.gram();
}

Tensor identity(std::int64_t n) {
  std::vector<float> h(std::size_t(n * n), 0.f);
  for (std::int64_t i = 0; i < n; ++i) h[std::size_t(i * n + i)] = 1.f;
  return Tensor::from(h, Shape{n, n});
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

// Every stored member equal byte for byte.
void check_identical(const QuantizedTensor& a, const QuantizedTensor& b) {
  CHECK(a.config == b.config);
  CHECK(same_bytes(a.codes, b.codes));
  CHECK(same_bytes(a.scales, b.scales));
  CHECK(same_bytes(a.zeros, b.zeros));
  CHECK(same_bytes(a.absmax_codes, b.absmax_codes));
  CHECK(same_bytes(a.absmax_scales, b.absmax_scales));
  CHECK(a.absmax_mean == b.absmax_mean);
}

double output_error(const Tensor& w, const QuantizedTensor& q, const Tensor& h) {
  return qlora::quant::layer_output_error(w, qlora::quant::dequantize(q), h);
}

std::vector<std::uint8_t> unpacked_codes(const QuantizedTensor& q) {
  std::vector<std::uint8_t> codes(std::size_t(q.rows * q.cols));
  for (std::int64_t r = 0; r < q.rows; ++r)
    for (std::int64_t c = 0; c < q.cols; ++c)
      codes[std::size_t(r * q.cols + c)] =
          qlora::cpu::unpack_code(q.codes.data<std::uint8_t>() + r * q.row_stride_bytes(), c, q.config.bits);
  return codes;
}

// The textbook recursion in float64 (OBQ's update, GPTQ's fixed column order): with Hinv the inverse of the
// damped H over the columns not yet quantized, quantize column q, spread its error over the others by
// W[:, j] -= (w - q) Hinv[q, j] / Hinv[q, q], then remove q from the inverse:
// Hinv -= Hinv[:, q] Hinv[q, :] / Hinv[q, q]. Group grids are fitted (with the library's grid functions)
// on the updated weights when the loop reaches the group's first column; group 0 from the original W.
std::vector<std::uint8_t> obq_codes(const Tensor& w, const Tensor& h, const QuantConfig& cfg, double damp,
                                    double grid_shrink = 1.0) {
  const std::int64_t rows = w.dim(0), cols = w.dim(1);
  Eigen::MatrixXd wm(rows, cols), hm(cols, cols);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) wm(r, c) = w.data<float>()[r * cols + c];
  for (std::int64_t a = 0; a < cols; ++a)
    for (std::int64_t b = 0; b < cols; ++b) hm(a, b) = h.data<float>()[a * cols + b];
  hm.diagonal().array() += damp * hm.diagonal().mean();
  Eigen::MatrixXd hinv = hm.inverse();
  const qlora::cpu::GptqGridFormat f = qlora::quant::detail::gptq_grid_format(cfg, grid_shrink);
  const std::int64_t group = cfg.group == 0 ? cols : cfg.group;
  std::vector<qlora::cpu::IntGrid> grid(static_cast<std::size_t>(rows));
  std::vector<std::uint8_t> codes(std::size_t(rows * cols));
  std::vector<float> values(static_cast<std::size_t>(group));
  for (std::int64_t q = 0; q < cols; ++q) {
    if (q % group == 0) {
      const std::int64_t n = std::min(group, cols - q);
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t t = 0; t < n; ++t) values[std::size_t(t)] = float(wm(r, q + t));
        grid[std::size_t(r)] = qlora::cpu::gptq_fit_grid(f, values.data(), n);
      }
    }
    const double d = hinv(q, q);
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::uint8_t code = qlora::cpu::gptq_encode(f, float(wm(r, q)), grid[std::size_t(r)]);
      codes[std::size_t(r * cols + q)] = code;
      const double err = (wm(r, q) - double(qlora::cpu::gptq_decode(f, code, grid[std::size_t(r)]))) / d;
      for (std::int64_t j = q + 1; j < cols; ++j) wm(r, j) -= err * hinv(q, j);
    }
    const Eigen::VectorXd column = hinv.col(q);
    hinv -= column * column.transpose() / d;
  }
  return codes;
}

}  // namespace

TEST_CASE("quant gptq: with H = I, GPTQ is RTN (same codes, scales, zeros, absmax)") {
  // H = I: U is diagonal, so no column receives an update and every grid is fitted on the original weights.
  const Tensor w = random_weight(24, 200, 11);
  const Tensor h = identity(200);
  for (const std::string name : {"int4-g64", "int3-g0", "int2-g32-sym", "int4-g128-fz", "int3-g64-mse", "dint4-g32",
                           "dint3-g0-fz", "nf4", "nf4-g32-nodq", "int8-g16"}) {
    CAPTURE(name);
    const QuantConfig cfg = QuantConfig::parse(name);
    const QuantizedTensor rtn = qlora::quant::quantize(w, cfg);
    check_identical(qlora::quant::gptq_quantize(w, h, cfg), rtn);
    GptqOptions opt;
    opt.static_groups = true;
    opt.act_order = true;  // equal diagonal: the stable order is the identity
    opt.block_size = 7;
    check_identical(qlora::quant::gptq_quantize(w, h, cfg, opt), rtn);
  }
}

TEST_CASE("quant gptq: with H = I and MagR's grid shrink, GPTQ is MagR's shrunk RTN") {
  // magr.md: after MagR, optq.py fits find_params with beta, per channel or per group inside GPTQ. With H = I
  // nothing is updated, so every grid GPTQ fits (per channel up front, static, or in the loop) must be
  // magr_rtn_quantize's for the same beta, whose grid test is in magr_test.cpp.
  const Tensor w = random_weight(24, 200, 13);
  const Tensor h = identity(200);
  for (const std::string name : {"int4-g64", "int3-g0", "int2-g32-sym", "int4-g128-fz", "dint4-g32", "int2-g0"}) {
    for (const double beta : {0.8, 0.95}) {
      CAPTURE(name);
      CAPTURE(beta);
      const QuantConfig cfg = QuantConfig::parse(name);
      const QuantizedTensor shrunk_rtn = qlora::quant::magr_rtn_quantize(w, cfg, beta);
      GptqOptions opt;
      opt.grid_shrink = beta;
      const QuantizedTensor q = qlora::quant::gptq_quantize(w, h, cfg, opt);
      check_identical(q, shrunk_rtn);
      CHECK_FALSE(same_bytes(q.scales, qlora::quant::quantize(w, cfg).scales));  // the shrink reached the grids
      opt.static_groups = true;
      opt.act_order = true;
      opt.block_size = 7;
      check_identical(qlora::quant::gptq_quantize(w, h, cfg, opt), shrunk_rtn);
    }
  }
}

TEST_CASE("quant gptq: a single column is quantized as RTN does") {
  const Tensor w = random_weight(40, 1, 12);
  const Tensor h = Tensor::from(std::vector<float>{3.7f}, Shape{1, 1});
  for (const std::string name : {"int4-g0", "int2-g16", "int4-g64-sym", "dint4-g0", "nf4-nodq"}) {
    CAPTURE(name);
    const QuantConfig cfg = QuantConfig::parse(name);
    check_identical(qlora::quant::gptq_quantize(w, h, cfg), qlora::quant::quantize(w, cfg));
  }
}

TEST_CASE("quant gptq: the lazy block size does not change the codes") {
  // Exact in exact arithmetic; in f32 the trailing GEMM sums in another order than the per-column updates,
  // and on these seeds no rounding decision moves. Block 48 splits 32-wide groups across blocks (the fit
  // then adds the block's pending updates on the fly). The -mse range search picks the first of 80 shrunk
  // grids with the smallest error, and two of them can tie to the last bit: there a last-bit difference in
  // the fitted weights may pick the other grid, so for -mse only the codes are compared.
  const std::int64_t rows = 32, cols = 192;
  const Tensor w = random_weight(rows, cols, 13);
  const Tensor h = correlated_hessian(cols, 512, 14);
  for (const std::string name : {"int4-g32", "int2-g64", "int3-g0", "nf4", "dint4-g32-mse", "int4-g128-sym"}) {
    CAPTURE(name);
    const QuantConfig cfg = QuantConfig::parse(name);
    GptqOptions opt;
    opt.block_size = 1;
    const QuantizedTensor one = qlora::quant::gptq_quantize(w, h, cfg, opt);
    for (std::int64_t block : {32, 48, 128, 1000}) {
      CAPTURE(block);
      opt.block_size = block;
      const QuantizedTensor other = qlora::quant::gptq_quantize(w, h, cfg, opt);
      if (cfg.mse_search) CHECK(unpacked_codes(other) == unpacked_codes(one));
      else check_identical(other, one);
    }
  }
}

TEST_CASE("quant gptq: the layer output error is no larger than RTN's on correlated inputs") {
  const std::int64_t shapes[][2] = {{64, 256}, {48, 384}, {96, 128}};
  std::uint64_t seed = 100;
  for (const auto& shape : shapes) {
    const Tensor w = random_weight(shape[0], shape[1], ++seed);
    const Tensor h = correlated_hessian(shape[1], 2 * shape[1], ++seed);
    for (const std::string name : {"int4-g128", "int3-g0", "int2-g64", "int4-g64-sym", "int3-g32-fz", "dint4-g64", "nf4",
                             "int4-g32-mse"}) {
      CAPTURE(name);
      CAPTURE(shape[1]);
      const QuantConfig cfg = QuantConfig::parse(name);
      const QuantizedTensor q = qlora::quant::gptq_quantize(w, h, cfg);
      q.check("gptq");
      const double gptq = output_error(w, q, h), rtn = output_error(w, qlora::quant::quantize(w, cfg), h);
      MESSAGE(name << " " << shape[0] << "x" << shape[1] << ": GPTQ/RTN output error " << gptq / rtn);
      CHECK(gptq > 0);
      CHECK(gptq < rtn);
    }
  }
}

TEST_CASE("quant gptq: act-order and static groups give valid tensors no worse than RTN") {
  const std::int64_t rows = 48, cols = 256;
  const Tensor w = random_weight(rows, cols, 21);
  const Tensor h = correlated_hessian(cols, 512, 22);
  struct Case {
    std::string name;
    bool act_order, static_groups;
  };
  for (const Case& c : {Case{"int3-g0", true, false}, Case{"int4-g64", true, true}, Case{"int2-g32", false, true},
                       Case{"nf4", true, true}, Case{"dint4-g64-fz", true, true}, Case{"int4-g256", true, false}}) {
    CAPTURE(c.name);
    CAPTURE(c.act_order);
    const QuantConfig cfg = QuantConfig::parse(c.name);
    GptqOptions opt;
    opt.act_order = c.act_order;
    opt.static_groups = c.static_groups;
    const QuantizedTensor q = qlora::quant::gptq_quantize(w, h, cfg, opt);
    q.check("gptq");
    const double err = output_error(w, q, h), rtn = output_error(w, qlora::quant::quantize(w, cfg), h);
    MESSAGE(c.name << std::string(c.act_order ? " act-order" : "") << std::string(c.static_groups ? " static" : "") << ": GPTQ/RTN "
                   << err / rtn);
    CHECK(err < rtn);
    if (c.static_groups) {  // the grids are RTN's (fitted on the original weights), only the codes move
      const QuantizedTensor rtn_q = qlora::quant::quantize(w, cfg);
      CHECK(same_bytes(q.scales, rtn_q.scales));
      CHECK(same_bytes(q.zeros, rtn_q.zeros));
      CHECK(same_bytes(q.absmax_codes, rtn_q.absmax_codes));
    }
  }
  // Act-order really reorders: the first column quantized is the one with the largest H_ii, so it keeps its
  // RTN code while the plain order changes some codes of that column.
  const QuantConfig cfg = QuantConfig::parse("int3-g0");
  GptqOptions opt;
  opt.act_order = true;
  const auto ordered = unpacked_codes(qlora::quant::gptq_quantize(w, h, cfg, opt));
  const auto plain = unpacked_codes(qlora::quant::gptq_quantize(w, h, cfg));
  const auto rtn = unpacked_codes(qlora::quant::quantize(w, cfg));
  std::int64_t first = 0;
  for (std::int64_t i = 1; i < cols; ++i)
    if (h.data<float>()[i * cols + i] > h.data<float>()[first * cols + first]) first = i;
  REQUIRE(first != 0);
  int ordered_diff = 0, plain_diff = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    ordered_diff += ordered[std::size_t(r * cols + first)] != rtn[std::size_t(r * cols + first)];
    plain_diff += plain[std::size_t(r * cols + first)] != rtn[std::size_t(r * cols + first)];
  }
  CHECK(ordered_diff == 0);
  CHECK(plain_diff > 0);
}

TEST_CASE("quant gptq: dead inputs (H_ii = 0) dequantize to exactly 0 and do not disturb the rest") {
  const std::int64_t rows = 16, cols = 96;
  const Tensor w = random_weight(rows, cols, 31);
  Tensor h = correlated_hessian(cols, 256, 32);
  for (std::int64_t dead : {0, 5, 64, 95}) {
    for (std::int64_t j = 0; j < cols; ++j) h.data<float>()[dead * cols + j] = h.data<float>()[j * cols + dead] = 0.f;
  }
  for (const std::string name : {"int4-g32", "int3-g0", "dint4-g32", "nf4", "int4-g32-sym"}) {
    CAPTURE(name);
    const QuantConfig cfg = QuantConfig::parse(name);
    for (bool act_order : {false, true}) {
      GptqOptions opt;
      opt.act_order = act_order;
      opt.static_groups = act_order;
      const QuantizedTensor q = qlora::quant::gptq_quantize(w, h, cfg, opt);
      const auto w_hat = qlora::quant::dequantize(q).to_vector<float>();
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t dead : {0, 5, 64, 95}) CHECK(w_hat[std::size_t(r * cols + dead)] == 0.f);
      for (float v : w_hat) CHECK(std::isfinite(v));
      CHECK(output_error(w, q, h) < output_error(w, qlora::quant::quantize(w, cfg), h));
    }
  }
}

TEST_CASE("quant gptq: equal codes to an independent float64 OBQ recursion on a tiny problem") {
  const std::int64_t rows = 12, cols = 48;
  const Tensor w = random_weight(rows, cols, 41);
  const Tensor h = correlated_hessian(cols, 96, 42);
  for (const std::string name : {"int4-g16", "int3-g0", "int2-g32", "int4-g16-sym", "dint4-g16", "nf4-g16-nodq"}) {
    CAPTURE(name);
    const QuantConfig cfg = QuantConfig::parse(name);
    GptqOptions opt;
    opt.block_size = 20;  // blocks that do not align with the groups
    const auto codes = unpacked_codes(qlora::quant::gptq_quantize(w, h, cfg, opt));
    CHECK(codes == obq_codes(w, h, cfg, opt.damp));
  }
  // MagR's shrunk grids, fitted in the loop from the updated weights (groups) or up front (group 0).
  for (const std::string name : {"int3-g16", "int2-g0", "dint4-g16"}) {
    CAPTURE(name);
    const QuantConfig cfg = QuantConfig::parse(name);
    GptqOptions opt;
    opt.block_size = 20;
    opt.grid_shrink = 0.85;
    const auto codes = unpacked_codes(qlora::quant::gptq_quantize(w, h, cfg, opt));
    CHECK(codes == obq_codes(w, h, cfg, opt.damp, 0.85));
    CHECK(codes != obq_codes(w, h, cfg, opt.damp));
  }
}

TEST_CASE("quant gptq: bad input gives one clear error") {
  const Tensor w = random_weight(8, 32, 51);
  const Tensor h = correlated_hessian(32, 64, 52);
  const QuantConfig cfg = QuantConfig::parse("int4-g16");
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w, correlated_hessian(16, 64, 1), cfg); })
            .find("must be [cols, cols] = [32, 32]") != std::string::npos);
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w.reshape(Shape{256}), h, cfg); }).find("must be 2-D") !=
        std::string::npos);
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w, h.to(DType::bf16), cfg); }).find("f32 or f64") !=
        std::string::npos);
  {
    Tensor negative = h.clone();
    for (std::int64_t i = 0; i < 32 * 32; ++i) negative.data<float>()[i] = -negative.data<float>()[i];
    const std::string e = error_of([&] { qlora::quant::gptq_quantize(w, negative, cfg); });
    CHECK(e.find("not positive definite") != std::string::npos);
    CHECK(e.find("larger --damp") != std::string::npos);
  }
  {
    Tensor nan_h = h.clone();
    nan_h.data<float>()[3 * 32 + 7] = std::nanf("");
    CHECK(error_of([&] { qlora::quant::gptq_quantize(w, nan_h, cfg); }).find("non-finite entry at (3, 7)") !=
          std::string::npos);
  }
  {
    Tensor nan_w = w.clone();
    nan_w.data<float>()[2 * 32 + 5] = std::nanf("");
    CHECK(error_of([&] { qlora::quant::gptq_quantize(nan_w, h, cfg); }).find("row 2, column 5 is NaN") !=
          std::string::npos);
  }
  GptqOptions opt;
  opt.act_order = true;
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w, h, cfg, opt); }).find("needs static_groups") != std::string::npos);
  opt = {};
  opt.block_size = 0;
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w, h, cfg, opt); }).find("block_size must be >= 1") !=
        std::string::npos);
  opt = {};
  opt.damp = -0.1;
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w, h, cfg, opt); }).find("damp must be") != std::string::npos);
  for (const double beta : {0.0, 1.5, double(NAN)}) {
    opt = {};
    opt.grid_shrink = beta;
    CHECK(error_of([&] { qlora::quant::gptq_quantize(w, h, cfg, opt); }).find("grid_shrink (MagR's beta) must be in (0, 1]") !=
          std::string::npos);
  }
  opt = {};
  opt.grid_shrink = 0.9;
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w, h, QuantConfig::parse("nf4-g16"), opt); }).find("NF4 has none") !=
        std::string::npos);
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w, h, QuantConfig::parse("int4-g16-mse"), opt); }).find("drop -mse") !=
        std::string::npos);
#if !defined(QLORA_WITH_CUDA)
  opt = {};
  opt.device = qlora::Device::cuda(0);
  CHECK(error_of([&] { qlora::quant::gptq_quantize(w, h, cfg, opt); }).find("qlora_cuda") != std::string::npos);
#endif
}
