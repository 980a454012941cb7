// CLoQ initialisation of one layer (include/qlora/nn/init/cloq.hpp), on calibration inputs with a decaying
// spectrum and two outlier channels (methods/cloq.md's numeric check): the closed form equals the
// independent Cholesky form of methods/cloq.md; it is optimal (no random perturbation and no LoftQ init does
// better on ||X (W - Q - dW)^T||); H = I gives the Frobenius fit and huge damping tends to it; full rank
// reconstructs W; the structured (pooled / repeated) versions against brute-force minimisation of the
// expanded objective; a rank-deficient Gram gives finite results; the scale; refusals.

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "nn/init_reference.hpp"
#include "qlora/nn/init/cloq.hpp"
#include "qlora/nn/init/loftq.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/layer_error.hpp"
#include "support/files.hpp"
#include "support/random.hpp"

using namespace qlora;
using nn::AdapterKind;
using nn::init::MatrixXd;

namespace {

constexpr std::int64_t kOut = 16, kIn = 32;

MatrixXd matrix(const Tensor& t) { return nn::init::to_matrix(t, "test tensor"); }
double rel(const MatrixXd& a, const MatrixXd& b) { return (a - b).norm() / b.norm(); }

// N x d_in inputs with a decaying spectrum (channel i scaled by 1/sqrt(1+i)) and channels 3 and 17 ten times
// larger: the anisotropic case where CLoQ and LoftQ differ.
Tensor calibration_inputs(std::int64_t n, std::uint64_t seed) {
  Tensor x = ops::randn(Shape{n, kIn}, seed, Device::cpu());
  float* p = x.data<float>();
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t i = 0; i < kIn; ++i) p[r * kIn + i] *= float((i == 3 || i == 17 ? 10.0 : 1.0) / std::sqrt(1.0 + i));
  return x;
}

// The problem: W, its int2 base, and H = X^T X / N in f64 (the model-level test goes through GramAccumulator).
struct Problem {
  Tensor w, x;
  quant::QuantizedTensor q;
  MatrixXd h, residual;
  Problem(std::int64_t n, const char* format = "int2-g16", std::uint64_t seed = 1) {
    w = Tensor::from(test::gaussian(std::size_t(kOut * kIn), seed, 0.05), Shape{kOut, kIn});
    x = calibration_inputs(n, seed + 100);
    q = quant::quantize(w, quant::QuantConfig::parse(format));
    const MatrixXd xm = matrix(x);
    h = xm.transpose() * xm / double(n);
    residual = matrix(w) - matrix(quant::dequantize(q, DType::f64));
  }
  // tr((R - dW) H (R - dW)^T) = ||X (W - Q - dW)^T||^2 / N, by quant::layer_output_error.
  double objective(const MatrixXd& delta) const {
    return quant::layer_output_error(nn::init::to_tensor(residual), nn::init::to_tensor(delta), nn::init::to_tensor(h));
  }
};

nn::AdapterShape shape_of(AdapterKind kind, int rank, float alpha = 8.f, int pool = 0, int repeat = 0) {
  nn::AdapterConfig cfg;
  cfg.kind = kind;
  cfg.rank = rank;
  cfg.alpha = alpha;
  cfg.pool = pool;
  cfg.repeat = repeat;
  return nn::resolve_adapter(cfg, kOut, kIn, 16);
}

const nn::init::CloqOptions kExact{0.0, 1e-10};  // no damping: the exact minimiser on the calibration data

}  // namespace

TEST_CASE("cloq: the closed form equals methods/cloq.md's Cholesky form L* = (Rc^-1 [Rc E]_r)^T") {
  const Problem pr(64);
  const Eigen::LLT<MatrixXd> llt(pr.h);
  REQUIRE(llt.info() == Eigen::Success);
  const MatrixXd rc = llt.matrixU();  // H = Rc^T Rc
  const MatrixXd re = rc * pr.residual.transpose();
  const Eigen::JacobiSVD<MatrixXd> svd(re, Eigen::ComputeThinU | Eigen::ComputeThinV);
  for (const int rank : {1, 4, 8}) {
    CAPTURE(rank);
    const MatrixXd truncated = svd.matrixU().leftCols(rank) * svd.singularValues().head(rank).asDiagonal() *
                               svd.matrixV().leftCols(rank).transpose();
    const MatrixXd expected = rc.triangularView<Eigen::Upper>().solve(truncated).transpose();
    const nn::init::AdapterFactors f = nn::init::cloq(pr.w, quant::dequantize(pr.q), nn::init::to_tensor(pr.h),
                                                      shape_of(AdapterKind::lora, rank), kExact);
    CHECK(f.rank_used == rank);
    CHECK(rel(matrix(f.delta_weight()), expected) < 1e-8);
  }
}

TEST_CASE("cloq: optimal on the calibration objective: beats LoftQ (T = 1) and every random perturbation") {
  const Problem pr(64);
  struct Case {
    AdapterKind kind;
    int rank;
  };
  for (const Case c : {Case{AdapterKind::lora, 4}, Case{AdapterKind::lora, 8}, Case{AdapterKind::qblora, 2},
                       Case{AdapterKind::qablora, 2}, Case{AdapterKind::hira, 2}}) {
    CAPTURE(std::string(nn::adapter_kind_name(c.kind)));
    CAPTURE(c.rank);
    const nn::AdapterShape shape = shape_of(c.kind, c.rank);
    const nn::init::AdapterFactors f = nn::init::fit_adapter_calibrated(pr.residual, pr.h, shape, kExact);
    const double none = pr.objective(MatrixXd::Zero(kOut, kIn));
    const double calibrated = pr.objective(matrix(f.delta_weight()));
    const double frobenius = pr.objective(matrix(nn::init::fit_adapter_frobenius(pr.residual, shape).delta_weight()));
    MESSAGE(nn::adapter_kind_name(c.kind) << " r=" << c.rank << ": output error relative to no adapter: LoftQ(T=1) "
                                          << frobenius / none << ", CLoQ " << calibrated / none);
    CHECK(calibrated < frobenius);
    const double s = double(shape.scale) / double(shape.pool);
    for (std::uint64_t seed = 0; seed < 30; ++seed) {
      MatrixXd delta;
      if (shape.full_matrix()) {
        delta = s * (matrix(f.M) + 1e-3 * matrix(ops::randn(f.M.shape(), 300 + seed, Device::cpu())));
      } else {
        const MatrixXd a = matrix(f.A) + 1e-3 * matrix(ops::randn(f.A.shape(), 300 + seed, Device::cpu()));
        const MatrixXd b = matrix(f.B) + 1e-3 * matrix(ops::randn(f.B.shape(), 400 + seed, Device::cpu()));
        delta = s * b * a;
      }
      CHECK(pr.objective(test::expand_pooled(delta, shape.repeat, shape.pool)) >= calibrated * (1 - 1e-12));
    }
  }
}

TEST_CASE("cloq: the structured versions equal brute-force minimisation of ||X (R - dW)^T|| over expanded dW") {
  const Problem pr(48);
  const MatrixXd x = matrix(pr.x);
  for (const nn::AdapterShape shape :
       {shape_of(AdapterKind::hira, 1), shape_of(AdapterKind::hira, 1, 8.f, 2, 2), shape_of(AdapterKind::qblora, 2),
        shape_of(AdapterKind::qablora, 2, 8.f, 8, 2), shape_of(AdapterKind::qalora, 2, 8.f, 4)}) {
    CAPTURE(std::string(nn::adapter_kind_name(shape.kind)));
    CAPTURE(shape.pool);
    CAPTURE(shape.repeat);
    const std::int64_t out = kOut / shape.repeat, in = kIn / shape.pool;
    // The objective on the raw inputs (not H), with dW expanded by its definition.
    const test::Residual objective = [&](const MatrixXd& d) {
      const MatrixXd e = x * (pr.residual - test::expand_pooled(d, shape.repeat, shape.pool)).transpose();
      return Eigen::VectorXd(Eigen::Map<const Eigen::VectorXd>(e.data(), e.size()));
    };
    const nn::init::AdapterFactors f = nn::init::fit_adapter_calibrated(pr.residual, pr.h, shape, kExact);
    const MatrixXd d = matrix(f.pooled_delta());
    const double fitted = objective(d).squaredNorm();
    CHECK(fitted == doctest::Approx(double(x.rows()) * pr.objective(matrix(f.delta_weight()))).epsilon(1e-10));
    if (shape.full_matrix()) {
      CHECK(rel(d, test::brute_force_full(objective, out, in)) < 1e-9);
    } else {
      const double brute = test::brute_force_low_rank(objective, out, in, shape.rank, 150, 2);
      CHECK(fitted == doctest::Approx(brute).epsilon(1e-5));
    }
  }
}

TEST_CASE("cloq: H = I gives the Frobenius fit, huge damping tends to it, full rank reconstructs W") {
  const Problem pr(64);
  for (const nn::AdapterShape shape : {shape_of(AdapterKind::lora, 4), shape_of(AdapterKind::qblora, 2),
                                       shape_of(AdapterKind::hira, 1)}) {
    CAPTURE(std::string(nn::adapter_kind_name(shape.kind)));
    const MatrixXd frobenius = matrix(nn::init::fit_adapter_frobenius(pr.residual, shape).delta_weight());
    const MatrixXd identity = MatrixXd::Identity(kIn, kIn);
    CHECK(rel(matrix(nn::init::fit_adapter_calibrated(pr.residual, identity, shape, kExact).delta_weight()), frobenius) <
          1e-10);
    const nn::init::CloqOptions huge{1e9, 1e-10};
    CHECK(rel(matrix(nn::init::fit_adapter_calibrated(pr.residual, pr.h, shape, huge).delta_weight()), frobenius) < 1e-6);
    const nn::init::CloqOptions some{1.0, 1e-10};
    const double d = rel(matrix(nn::init::fit_adapter_calibrated(pr.residual, pr.h, shape, some).delta_weight()), frobenius);
    CHECK(d > 1e-3);  // moderate damping is still a different init
  }
  // Full rank with an invertible H: Q + dW = W.
  const nn::init::AdapterFactors full =
      nn::init::fit_adapter_calibrated(pr.residual, pr.h, shape_of(AdapterKind::lora, int(kOut)), kExact);
  CHECK(rel(matrix(full.delta_weight()), pr.residual) < 1e-10);
}

TEST_CASE("cloq: a rank-deficient Gram (fewer tokens than features) gives finite results") {
  const Problem pr(12);  // N = 12 < d_in = 32: H has rank 12
  const nn::AdapterShape shape = shape_of(AdapterKind::lora, 4);
  const double none = pr.objective(MatrixXd::Zero(kOut, kIn));
  const double frobenius = pr.objective(matrix(nn::init::fit_adapter_frobenius(pr.residual, shape).delta_weight()));
  double exact = 0;
  for (const double damping : {0.0, 0.01, 0.1}) {
    CAPTURE(damping);
    const nn::init::AdapterFactors f = nn::init::fit_adapter_calibrated(pr.residual, pr.h, shape, {damping, 1e-10});
    const MatrixXd a = matrix(f.A), b = matrix(f.B);
    CHECK(a.allFinite());
    CHECK(b.allFinite());
    CHECK(f.rank_used == 4);
    const double objective = pr.objective(matrix(f.delta_weight()));
    MESSAGE("N = 12 < d_in, damping " << damping << ": output error relative to no adapter " << objective / none
                                      << " (LoftQ T=1: " << frobenius / none << ")");
    CHECK(objective < frobenius);
    if (damping == 0.0) exact = objective;
    else CHECK(objective >= exact * (1 - 1e-9));  // damping trades calibration error for weight error
  }
  // The pseudo-inverse solution has no component in null(H): dW H^+ H = dW.
  const nn::init::AdapterFactors f = nn::init::fit_adapter_calibrated(pr.residual, pr.h, shape, kExact);
  const Eigen::SelfAdjointEigenSolver<MatrixXd> eig(pr.h);
  const MatrixXd null_space = eig.eigenvectors().leftCols(kIn - 12);
  CHECK((matrix(f.delta_weight()) * null_space).norm() < 1e-8 * matrix(f.delta_weight()).norm());
}

TEST_CASE("cloq: the factors in a real layer give s E_k B A P_p = dW for several (alpha, r)") {
  const Problem pr(64, "int3-g16");
  const Tensor x = ops::randn(Shape{5, kIn}, 77, Device::cpu()).to(DType::f64);
  for (const AdapterKind kind : {AdapterKind::lora, AdapterKind::qblora, AdapterKind::hira}) {
    for (const auto& [alpha, rank] : {std::pair{16.f, 2}, std::pair{2.f, 4}}) {
      CAPTURE(std::string(nn::adapter_kind_name(kind)));
      CAPTURE(alpha);
      const nn::AdapterConfig adapter{kind, rank, alpha};
      const auto layer = nn::make_linear("layer", nn::BaseWeight(pr.q), adapter, 3, 0, DType::f64);
      const nn::init::AdapterFactors f = nn::init::cloq(pr.w, quant::dequantize(pr.q), nn::init::to_tensor(pr.h),
                                                        layer->adapter_shape());
      nn::init::write_adapter_params(*layer, f);
      nn::Context ctx;
      ctx.training = false;
      const MatrixXd expected =
          matrix(x) * (matrix(quant::dequantize(pr.q, DType::f64)) + matrix(f.delta_weight())).transpose();
      CHECK(rel(matrix(layer->forward(ctx, x)), expected) < 1e-12);
    }
  }
}

TEST_CASE("cloq: refusals") {
  const Problem pr(64);
  const Tensor base = quant::dequantize(pr.q);
  const Tensor h = nn::init::to_tensor(pr.h);
  const nn::AdapterShape lora = shape_of(AdapterKind::lora, 2);
  CHECK(test::error_of([&] { nn::init::cloq(pr.w, base, Tensor::zeros(Shape{16, 16}), lora, {}, "blk.o"); })
            .find("cloq (blk.o): the calibration Gram is 16 x 16, the layer's input has 32 features") != std::string::npos);
  CHECK(test::error_of([&] { nn::init::cloq(pr.w, base, Tensor::zeros(Shape{kIn, kIn}), lora); })
            .find("no positive diagonal entry") != std::string::npos);
  Tensor nan_h = h.clone();
  nan_h.data<double>()[5] = std::nan("");
  CHECK(test::error_of([&] { nn::init::cloq(pr.w, base, nan_h, lora); }).find("calibration Gram holds a non-finite") !=
        std::string::npos);
  CHECK(test::error_of([&] { nn::init::cloq(pr.w, base, h, lora, {-0.1, 1e-10}); }).find("damping must be >= 0") !=
        std::string::npos);
  CHECK(test::error_of([&] { nn::init::cloq(pr.w, base.slice(0, 8), h, lora); }).find("the quantized base is") !=
        std::string::npos);
  CHECK(test::error_of([&] { nn::init::cloq(pr.w, base, h, nn::AdapterShape{}); }).find("no adapter") !=
        std::string::npos);
}
