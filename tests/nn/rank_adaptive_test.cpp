// RA-LoRA's per-layer numerics (nn/rank_adaptive.hpp, methods/ra-lora.md "Tests"): the factored SVD against
// Eigen's SVD of the formed product, phi's two reference values, the ranks the analysis picks on updates built
// with known ranks, re-factoring (the same rank changes nothing; the true rank reproduces B A; fewer directions
// lose exactly the dropped energy), growth leaving the layer's output unchanged, and the budgeted allocation.

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "qlora/nn/linear_factory.hpp"
#include "qlora/nn/rank_adaptive.hpp"
#include "support/random.hpp"

using namespace qlora;
namespace ra = qlora::nn::rank_adaptive;
using Eigen::MatrixXd;
using Eigen::VectorXd;

namespace {

MatrixXd random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  const auto v = test::random_vector<double>(std::size_t(rows * cols), seed);
  return Eigen::Map<const MatrixXd>(v.data(), rows, cols);
}

// Orthonormal columns (rows x cols) from a QR of a random matrix.
MatrixXd orthonormal(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  const Eigen::HouseholderQR<MatrixXd> qr(random_matrix(rows, cols, seed));
  return qr.householderQ() * MatrixXd::Identity(rows, cols);
}

// A LoRA layer (dense random base) whose factors are B = U diag(sqrt s), A = diag(sqrt s) V^T padded with zero
// components up to `rank`: B A has exactly the singular values s (scaled by the layer's s_scale).
std::unique_ptr<nn::Linear> layer_with_spectrum(std::int64_t d_out, std::int64_t d_in, std::int64_t rank,
                                                const std::vector<double>& s, std::uint64_t seed) {
  nn::AdapterConfig cfg;
  cfg.kind = nn::AdapterKind::lora;
  cfg.rank = int(rank);
  cfg.alpha = float(rank);  // s = 1
  auto linear = nn::make_linear("layer" + std::to_string(seed), Tensor::from(test::gaussian(std::size_t(d_out * d_in), seed), Shape{d_out, d_in}),
                                cfg, seed, seed);
  const std::int64_t q = std::int64_t(s.size());
  const MatrixXd u = orthonormal(d_out, q, seed + 1), v = orthonormal(d_in, q, seed + 2);
  MatrixXd b = MatrixXd::Zero(d_out, rank), a = MatrixXd::Zero(rank, d_in);
  for (std::int64_t i = 0; i < q; ++i) {
    b.col(i) = u.col(i) * std::sqrt(s[std::size_t(i)]);
    a.row(i) = v.col(i).transpose() * std::sqrt(s[std::size_t(i)]);
  }
  nn::LowRank& adapter = *linear->low_rank_adapter();
  adapter.A.value.copy_from(nn::init::to_tensor(a).to(DType::f32));
  adapter.B.value.copy_from(nn::init::to_tensor(b).to(DType::f32));
  return linear;
}

MatrixXd product(const nn::LowRank& l) {
  return nn::init::to_matrix(l.B.value, "B") * nn::init::to_matrix(l.A.value, "A");
}

}  // namespace

TEST_CASE("rank_adaptive: the factored SVD of B A equals the SVD of the formed product") {
  for (const auto [m, r, n] : {std::array<Eigen::Index, 3>{12, 5, 9}, {4, 6, 10}, {20, 3, 2}}) {
    CAPTURE(m);
    CAPTURE(r);
    CAPTURE(n);
    const MatrixXd b = random_matrix(m, r, 1), a = random_matrix(r, n, 2);
    const ra::UpdateSvd f = ra::factored_svd(b, a);
    const Eigen::JacobiSVD<MatrixXd> reference(b * a);  // independent: the full m x n product
    const VectorXd& s_ref = reference.singularValues();
    REQUIRE(f.s.size() == std::min({m, r, n}));
    for (Eigen::Index i = 0; i < f.s.size(); ++i) CHECK(f.s[i] == doctest::Approx(s_ref[i]).epsilon(1e-10));
    CHECK((f.u * f.s.asDiagonal() * f.v.transpose() - b * a).norm() < 1e-10 * (b * a).norm());
    CHECK((f.u.transpose() * f.u - MatrixXd::Identity(f.s.size(), f.s.size())).norm() < 1e-12);
  }
}

TEST_CASE("rank_adaptive: phi(U, U) = 1; two random k-subspaces of R^d give about k / d") {
  const MatrixXd u = orthonormal(64, 8, 3);
  for (std::int64_t k = 1; k <= 8; ++k) CHECK(ra::subspace_similarity(u, u, k, k) == doctest::Approx(1.0).epsilon(1e-12));
  // E[phi] = k / d for independent uniformly random subspaces: mean over 200 draws, d = 64, k = 8.
  double mean = 0;
  for (std::uint64_t t = 0; t < 200; ++t) mean += ra::subspace_similarity(orthonormal(64, 8, 100 + 2 * t), orthonormal(64, 8, 101 + 2 * t), 8, 8) / 200;
  CHECK(mean == doctest::Approx(8.0 / 64.0).epsilon(0.1));
  CHECK(ra::subspace_similarity(u, MatrixXd::Zero(64, 8), 4, 4) == 0.0);
}

TEST_CASE("rank_adaptive: the analysis picks the known ranks of constructed updates") {
  ra::RankRule rule;
  rule.energy = 0.99, rule.margin = 0, rule.min_rank = 1, rule.max_rank = 16;
  // True ranks 3, 1, 5 (exactly: the other components are zero), all adapters at rank 8.
  const std::vector<std::vector<double>> spectra = {{3, 2, 1}, {5}, {4, 3, 3, 2, 1}};
  std::vector<std::unique_ptr<nn::Linear>> layers;
  std::vector<ra::LayerAnalysis> analyses;
  for (std::size_t i = 0; i < spectra.size(); ++i) {
    layers.push_back(layer_with_spectrum(16, 24, 8, spectra[i], 10 * i + 7));
    analyses.push_back(ra::analyse_layer(*layers.back()->low_rank_adapter(), MatrixXd(), rule));
    CHECK(analyses.back().energy_rank == std::int64_t(spectra[i].size()));
    CHECK(analyses.back().stable_rank == 0);  // no previous analysis
  }
  const std::vector<std::int64_t> k = ra::allocate_ranks(analyses, 8 * 40 * 3, rule);
  CHECK(k == std::vector<std::int64_t>{3, 1, 5});
  // A budget of 6 units of rank (16 + 24 parameters each) for 3 + 1 + 5 wanted: scaled by 6/9 and rounded down
  // (2, 0 -> r_min 1, 3), which uses the budget exactly.
  const std::vector<std::int64_t> tight = ra::allocate_ranks(analyses, 6 * 40, rule);
  CHECK(tight == std::vector<std::int64_t>{2, 1, 3});

  // Stability: a previous basis that shares the top 2 directions, with its 3rd replaced by a random direction
  // orthogonal to those two, has stopped rotating for k = 2 only.
  nn::LowRank& l2 = *layers[2]->low_rank_adapter();
  const ra::UpdateSvd now = ra::factored_svd(nn::init::to_matrix(l2.B.value, "B"), nn::init::to_matrix(l2.A.value, "A"));
  MatrixXd prev = now.u;
  const VectorXd random = orthonormal(16, 1, 99).col(0);
  prev.col(2) = random - now.u.leftCols(2) * (now.u.leftCols(2).transpose() * random);
  prev.col(2).normalize();
  rule.stability = 0.95;
  CHECK(ra::subspace_similarity(prev, now.u, 2, 2) == doctest::Approx(1.0));
  CHECK(ra::analyse_layer(l2, prev, rule).stable_rank == 2);
  rule.margin = 1;  // desired = max(k_E, k_S) + margin
  CHECK(ra::analyse_layer(l2, prev, rule).desired == 6);
}

TEST_CASE("rank_adaptive: re-factoring keeps the top subspace; the same rank changes nothing") {
  auto linear = layer_with_spectrum(16, 24, 8, {3, 2, 1.5, 1, 0.5, 0.25}, 5);
  nn::LowRank& l = *linear->low_rank_adapter();
  // Make A's zero rows random and B's columns nonzero everywhere: a general rank-6 product of rank-8 factors.
  const MatrixXd mix = orthonormal(8, 8, 77);
  l.A.value.copy_from(nn::init::to_tensor(mix.transpose() * nn::init::to_matrix(l.A.value, "A")).to(DType::f32));
  l.B.value.copy_from(nn::init::to_tensor(nn::init::to_matrix(l.B.value, "B") * mix).to(DType::f32));
  const MatrixXd before = product(l);
  const std::vector<float> a0 = l.A.value.to_vector<float>(), b0 = l.B.value.to_vector<float>();
  ra::UpdateSvd svd = ra::factored_svd(nn::init::to_matrix(l.B.value, "B"), nn::init::to_matrix(l.A.value, "A"));

  ra::set_rank(l, 8, svd, 1);  // the full current rank: untouched, bit for bit
  CHECK(l.A.value.to_vector<float>() == a0);
  CHECK(l.B.value.to_vector<float>() == b0);

  ra::set_rank(l, 6, svd, 1);  // rank(B A) = 6: the same product in fewer factors
  CHECK(l.shape().rank == 6);
  CHECK(l.A.value.shape() == Shape{6, 24});
  CHECK(l.B.value.shape() == Shape{16, 6});
  CHECK((product(l) - before).norm() < 1e-6 * before.norm());

  svd = ra::factored_svd(nn::init::to_matrix(l.B.value, "B"), nn::init::to_matrix(l.A.value, "A"));
  ra::set_rank(l, 3, svd, 1);  // Eckart-Young: the error is the dropped singular values
  const double dropped = std::sqrt(1.0 * 1.0 + 0.5 * 0.5 + 0.25 * 0.25);
  CHECK((product(l) - before).norm() == doctest::Approx(dropped).epsilon(1e-5));
}

TEST_CASE("rank_adaptive: growth keeps the layer's output; a zero update keeps trainable random rows of A") {
  auto linear = layer_with_spectrum(12, 20, 4, {2, 1, 0.5, 0.1}, 9);
  nn::LowRank& l = *linear->low_rank_adapter();
  const Tensor x = Tensor::from(test::random_vector<float>(5 * 20, 3), Shape{5, 20});
  nn::Context ctx;
  ctx.training = false;
  const std::vector<float> y0 = linear->forward(ctx, x).to_vector<float>();
  const ra::UpdateSvd svd = ra::factored_svd(nn::init::to_matrix(l.B.value, "B"), nn::init::to_matrix(l.A.value, "A"));
  const std::vector<float> a0 = l.A.value.to_vector<float>();
  ra::set_rank(l, 7, svd, 11);
  CHECK(l.shape().rank == 7);
  CHECK(linear->params()[0]->value.shape() == Shape{7, 20});
  const std::vector<float> a1 = l.A.value.to_vector<float>();
  CHECK(std::equal(a0.begin(), a0.end(), a1.begin()));  // old rows kept
  double new_rows = 0;
  for (std::size_t i = a0.size(); i < a1.size(); ++i) new_rows += double(a1[i]) * a1[i];
  CHECK(new_rows > 0);  // fresh N(0, 1/k^2) rows
  CHECK(test::rel_error(linear->forward(ctx, x).to_vector<float>(), y0) < 1e-6);
  CHECK(l.shape().scale == doctest::Approx(1.0));  // s = alpha / r_init stays

  // B = 0 (a fresh adapter): shrinking must not leave A = 0 too (no gradient could ever flow).
  nn::AdapterConfig cfg;
  cfg.rank = 6;
  auto fresh = nn::make_linear("fresh", Tensor::from(test::gaussian(12 * 20, 4), Shape{12, 20}), cfg, 3, 3);
  nn::LowRank& f = *fresh->low_rank_adapter();
  const ra::UpdateSvd zero = ra::factored_svd(nn::init::to_matrix(f.B.value, "B"), nn::init::to_matrix(f.A.value, "A"));
  ra::set_rank(f, 2, zero, 5);
  CHECK(f.A.value.shape() == Shape{2, 20});
  CHECK(nn::init::to_matrix(f.A.value, "A").norm() > 0);
  CHECK(nn::init::to_matrix(f.B.value, "B").norm() == 0);
}
