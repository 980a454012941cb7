// LoftQ initialisation of one layer (include/qlora/nn/init/loftq.hpp): full rank reconstructs W; T = 1 is
// quantize-then-SVD (checked against Eigen's Jacobi SVD of the residual, computed here); the structured fit
// of the pooled / repeated presets against brute-force least squares on the expanded update; the factors in
// a real layer give s E_k B A P_p = dW for several (alpha, r); components beyond the reachable rank keep
// the layer's default draw of A; refusals.

#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "nn/init_reference.hpp"
#include "qlora/nn/init/loftq.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/random.hpp"
#include "support/files.hpp"
#include "support/random.hpp"

using namespace qlora;
using nn::AdapterKind;
using nn::init::MatrixXd;

namespace {

Tensor gaussian_weight(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  return Tensor::from(test::gaussian(std::size_t(rows * cols), seed, 0.05), Shape{rows, cols});
}

nn::AdapterShape shape_of(AdapterKind kind, int rank, std::int64_t d_out, std::int64_t d_in, std::int64_t group,
                          float alpha = 8.f, int pool = 0, int repeat = 0) {
  nn::AdapterConfig cfg;
  cfg.kind = kind;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.pool = pool;
  cfg.repeat = repeat;
  return nn::resolve_adapter(cfg, d_out, d_in, group);
}

MatrixXd matrix(const Tensor& t) { return nn::init::to_matrix(t, "test tensor"); }

double rel(const MatrixXd& a, const MatrixXd& b) { return (a - b).norm() / b.norm(); }

std::vector<std::uint8_t> bytes_of(const Tensor& t) {
  std::vector<std::uint8_t> bytes(t.nbytes());
  std::memcpy(bytes.data(), t.data(), bytes.size());
  return bytes;
}

}  // namespace

TEST_CASE("loftq: with full rank, deq(Q) + dW reconstructs W (any T, any format)") {
  const std::int64_t d_out = 24, d_in = 32;
  const Tensor w = gaussian_weight(d_out, d_in, 3);
  for (const char* format : {"int2-g16", "int3-g16", "nf4-g16"}) {
    for (const int steps : {1, 3}) {
      CAPTURE(std::string(format));
      CAPTURE(steps);
      const quant::QuantConfig cfg = quant::QuantConfig::parse(format);
      const nn::AdapterShape shape = shape_of(AdapterKind::lora, int(d_out), d_out, d_in, cfg.group);
      const nn::init::LoftqResult r = nn::init::loftq(w, cfg, shape, {steps});
      CHECK(r.adapter.rank_used == d_out);
      const MatrixXd deq = matrix(quant::dequantize(r.base, DType::f64));
      CHECK(rel(deq, matrix(w)) > 0.05);  // the base alone is far from W ...
      CHECK(rel(deq + matrix(r.adapter.delta_weight()), matrix(w)) < 1e-12);  // ... the adapter closes the gap

      // Through the operator, in its f32 parameters: the merged layer is W to f32 rounding.
      const auto layer = nn::make_linear("q", nn::BaseWeight(r.base), nn::AdapterConfig{AdapterKind::lora, int(d_out), 8.f},
                                         1, 0);
      nn::init::write_adapter_params(*layer, r.adapter);
      CHECK(rel(matrix(layer->merged_weight(DType::f32)), matrix(w)) < 1e-6);
    }
  }
}

TEST_CASE("loftq: T = 1 is quantize-then-SVD (Q = quant(W), dW = the truncated SVD of W - deq(Q))") {
  const std::int64_t d_out = 24, d_in = 32;
  const Tensor w = gaussian_weight(d_out, d_in, 5);
  for (const char* format : {"int2-g16", "nf4"}) {
    for (const int rank : {1, 4, 8}) {
      CAPTURE(std::string(format));
      CAPTURE(rank);
      const quant::QuantConfig cfg = quant::QuantConfig::parse(format);
      const nn::init::LoftqResult r = nn::init::loftq(w, cfg, shape_of(AdapterKind::lora, rank, d_out, d_in, cfg.group), {1});
      const quant::QuantizedTensor q = quant::quantize(w, cfg);
      CHECK(bytes_of(r.base.codes) == bytes_of(q.codes));
      // The reference: Eigen's one-sided Jacobi SVD of the residual, truncated to the rank.
      const MatrixXd residual = matrix(w) - matrix(quant::dequantize(q, DType::f64));
      const Eigen::JacobiSVD<MatrixXd> svd(residual, Eigen::ComputeThinU | Eigen::ComputeThinV);
      const MatrixXd expected = svd.matrixU().leftCols(rank) * svd.singularValues().head(rank).asDiagonal() *
                                svd.matrixV().leftCols(rank).transpose();
      CHECK(rel(matrix(r.adapter.delta_weight()), expected) < 1e-10);
      // Eckart-Young: the error left is the tail of the spectrum.
      const double tail = svd.singularValues().tail(svd.singularValues().size() - rank).squaredNorm();
      CHECK((residual - matrix(r.adapter.delta_weight())).squaredNorm() == doctest::Approx(tail).epsilon(1e-10));
      // The singular values are split evenly: B^T B = A A^T (both diag(sigma) / (s/p)).
      const MatrixXd a = matrix(r.adapter.A), b = matrix(r.adapter.B);
      CHECK(rel(b.transpose() * b, a * a.transpose()) < 1e-10);
    }
  }
}

TEST_CASE("loftq: more alternating steps change the base and lower the Frobenius error on this instance") {
  // Measured (not a theorem: quantization is not a projection onto a convex set): int2-g16, 32 x 64 Gaussian
  // weight, rank 4. The alternation must at least move Q away from quant(W).
  const Tensor w = gaussian_weight(32, 64, 11);
  const quant::QuantConfig cfg = quant::QuantConfig::parse("int2-g16");
  const nn::AdapterShape shape = shape_of(AdapterKind::lora, 4, 32, 64, 16);
  const auto error = [&](const nn::init::LoftqResult& r) {
    return (matrix(w) - matrix(quant::dequantize(r.base, DType::f64)) - matrix(r.adapter.delta_weight())).norm();
  };
  const nn::init::LoftqResult one = nn::init::loftq(w, cfg, shape, {1});
  const nn::init::LoftqResult five = nn::init::loftq(w, cfg, shape, {5});
  CHECK(bytes_of(one.base.codes) != bytes_of(five.base.codes));
  MESSAGE("loftq int2-g16 rank 4, ||W - Q - dW||_F: T=1 " << error(one) << ", T=5 " << error(five));
  CHECK(error(five) < error(one));
}

TEST_CASE("loftq: the structured fit of pooled / repeated adapters equals brute-force least squares") {
  // R (16 x 32); the objective ||R - dW||_F^2 written on the expanded dW[o, i] = D[o/k, i/p] and minimised
  // without the tile-mean argument: over D directly (single matrix) or by alternating least squares over
  // D = B A (low rank).
  const std::int64_t d_out = 16, d_in = 32;
  const MatrixXd residual = matrix(gaussian_weight(d_out, d_in, 21));
  struct Case {
    AdapterKind kind;
    int rank, pool, repeat;
  };
  for (const Case c : {Case{AdapterKind::qblora, 2, 0, 0}, Case{AdapterKind::qalora, 2, 8, 0},
                       Case{AdapterKind::qablora, 2, 8, 2}, Case{AdapterKind::hira, 4, 0, 0},
                       Case{AdapterKind::hira, 4, 2, 2}}) {
    CAPTURE(std::string(nn::adapter_kind_name(c.kind)));
    CAPTURE(c.pool);
    const nn::AdapterShape shape = shape_of(c.kind, c.rank, d_out, d_in, 16, 8.f, c.pool, c.repeat);
    const std::int64_t k = shape.repeat, p = shape.pool, out = d_out / k, in = d_in / p;
    const nn::init::AdapterFactors f = nn::init::fit_adapter_frobenius(residual, shape);
    const MatrixXd d = matrix(f.pooled_delta());
    const test::Residual objective = [&](const MatrixXd& pooled) {
      const MatrixXd e = residual - test::expand_pooled(pooled, k, p);
      return Eigen::VectorXd(Eigen::Map<const Eigen::VectorXd>(e.data(), e.size()));
    };
    CHECK(rel(matrix(f.delta_weight()), test::expand_pooled(d, k, p)) < 1e-14);
    const double fitted = objective(d).squaredNorm();
    if (shape.full_matrix()) {
      CHECK(rel(d, test::brute_force_full(objective, out, in)) < 1e-10);
    } else {
      const double brute = test::brute_force_low_rank(objective, out, in, shape.rank, 150, 2);
      CHECK(fitted <= brute * (1 + 1e-9));
      CHECK(fitted == doctest::Approx(brute).epsilon(1e-6));
      // Nor does any random perturbation of the factors do better.
      for (std::uint64_t s = 0; s < 20; ++s) {
        const MatrixXd a = matrix(f.A) + 1e-3 * matrix(ops::randn(f.A.shape(), 100 + s, Device::cpu()));
        const MatrixXd b = matrix(f.B) + 1e-3 * matrix(ops::randn(f.B.shape(), 200 + s, Device::cpu()));
        CHECK(objective(double(shape.scale) / double(p) * b * a).squaredNorm() >= fitted * (1 - 1e-12));
      }
    }
  }
}

TEST_CASE("loftq: the factors in a real layer give s E_k B A P_p = dW for several (alpha, r)") {
  const std::int64_t d_out = 16, d_in = 32, n = 5;
  const Tensor w = gaussian_weight(d_out, d_in, 31);
  const quant::QuantConfig cfg = quant::QuantConfig::parse("int3-g16");
  const Tensor x = ops::randn(Shape{n, d_in}, 7, Device::cpu());
  for (const AdapterKind kind : {AdapterKind::lora, AdapterKind::qblora, AdapterKind::qablora, AdapterKind::hira}) {
    for (const auto& [alpha, rank] : {std::pair{16.f, 2}, std::pair{4.f, 4}, std::pair{1.f, 8}}) {
      CAPTURE(std::string(nn::adapter_kind_name(kind)));
      CAPTURE(alpha);
      CAPTURE(rank);
      const nn::AdapterConfig adapter{kind, rank, alpha};
      const nn::AdapterShape shape = nn::resolve_adapter(adapter, d_out, d_in, cfg.group);
      const nn::init::LoftqResult r = nn::init::loftq(w, cfg, shape, {2});
      const auto layer = nn::make_linear("layer", nn::BaseWeight(r.base), adapter, 3, 0, DType::f64);
      nn::init::write_adapter_params(*layer, r.adapter);
      nn::Context ctx;
      ctx.training = false;
      const MatrixXd y = matrix(layer->forward(ctx, x.to(DType::f64)));
      const MatrixXd expected =
          matrix(x) * (matrix(quant::dequantize(r.base, DType::f64)) + matrix(r.adapter.delta_weight())).transpose();
      CHECK(rel(y, expected) < 1e-12);
    }
  }
}

TEST_CASE("loftq: components past the reachable rank carry B = 0 and keep the layer's default draw of A") {
  // qalora with one group per row pools the whole row: d_in / p = 1, so only one of the 4 components is used.
  const Tensor w = gaussian_weight(16, 32, 41);
  const quant::QuantConfig cfg = quant::QuantConfig::parse("int2-g0");
  const nn::AdapterConfig adapter{AdapterKind::qalora, 4, 8.f};
  const auto layer = nn::make_linear("layer", nn::BaseWeight(quant::quantize(w, cfg)), adapter, 9, 0);
  const std::vector<float> default_a = layer->params()[0]->value.to_vector<float>();
  REQUIRE(default_a.size() == 4);
  const nn::init::LoftqResult r = nn::init::loftq(w, cfg, layer->adapter_shape());
  CHECK(r.adapter.rank_used == 1);
  nn::init::write_adapter_params(*layer, r.adapter);
  const std::vector<float> a = layer->params()[0]->value.to_vector<float>();
  const std::vector<float> b = layer->params()[1]->value.to_vector<float>();
  CHECK(a[0] != default_a[0]);
  for (std::size_t j = 1; j < 4; ++j) CHECK(a[j] == default_a[j]);
  for (std::size_t o = 0; o < 16; ++o)
    for (std::size_t j = 1; j < 4; ++j) CHECK(b[o * 4 + j] == 0.f);
  // The one used component is the row means of the residual (the tile means of a 1 x 32 tile).
  const MatrixXd residual = matrix(w) - matrix(quant::dequantize(r.base, DType::f64));
  CHECK(rel(matrix(r.adapter.pooled_delta()), residual.rowwise().mean()) < 1e-12);
}

TEST_CASE("loftq: refusals") {
  const Tensor w = gaussian_weight(16, 32, 51);
  const quant::QuantConfig cfg = quant::QuantConfig::parse("int4-g16");
  const nn::AdapterShape lora = shape_of(AdapterKind::lora, 2, 16, 32, 16);
  CHECK(test::error_of([&] { nn::init::loftq(w, cfg, lora, {0}, "blk.q"); }).find("blk.q") != std::string::npos);
  CHECK(test::error_of([&] { nn::init::loftq(w, cfg, lora, {0}); }).find("steps must be >= 1") != std::string::npos);
  CHECK(test::error_of([&] { nn::init::loftq(w, cfg, nn::AdapterShape{}); }).find("no adapter") != std::string::npos);
  CHECK(test::error_of([&] { nn::init::loftq(w, cfg, shape_of(AdapterKind::lora, 2, 48, 48, 16, 8.f, 3)); })
            .find("(p = 3, k = 1) does not tile a 16 x 32 weight") != std::string::npos);
  CHECK(test::error_of([&] { nn::init::loftq(Tensor::zeros(Shape{32}), cfg, lora); }).find("2-D") != std::string::npos);
  Tensor bad = w.clone();
  bad.data<float>()[37] = std::nanf("");
  CHECK(test::error_of([&] { nn::init::loftq(bad, cfg, lora); }).find("row 1, column 5") != std::string::npos);
  // Factors of one adapter cannot be written into a layer with another.
  const nn::init::LoftqResult r = nn::init::loftq(w, cfg, lora);
  const auto other = nn::make_linear("other", nn::BaseWeight(r.base), nn::AdapterConfig{AdapterKind::qblora, 2, 8.f}, 1, 0);
  CHECK(test::error_of([&] { nn::init::write_adapter_params(*other, r.adapter); }).find("does not match") !=
        std::string::npos);
}
