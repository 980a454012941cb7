#pragma once
// RA-LoRA's per-layer numerics (methods/ra-lora.md; docs/adapter-init.md, "RA-LoRA"): the thin SVD of a
// low-rank update B A without forming it, the normalized subspace similarity phi of the LoRA paper, the rank a
// layer asks for (energy and stability criteria), the allocation of ranks under a parameter budget, and the
// re-factoring of a LowRank adapter at a new rank.
//
// Evidence: only RA-LoRA's abstract is verified. The rules below are the method file's "Reconstructed
// algorithm" (our design, unverified against the paper); phi is Hu et al. 2021, Sec. 7.2. The schedule and the
// optimizer state live in train/rank_adaptive.hpp.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <Eigen/Dense>
#include <Eigen/QR>
#include <Eigen/SVD>

#include "qlora/nn/init/linalg.hpp"
#include "qlora/nn/low_rank.hpp"
#include "qlora/ops/random.hpp"

namespace qlora::nn::rank_adaptive {

using Eigen::MatrixXd;
using Eigen::VectorXd;

// B A = u diag(s) v^T with q = min(rows(B), r, cols(A)) triplets, s descending.
struct UpdateSvd {
  MatrixXd u;  // rows(B) x q, orthonormal columns
  VectorXd s;  // q
  MatrixXd v;  // cols(A) x q, orthonormal columns
};

namespace detail {

// Thin QR of m (rows x r): m = q r with q (rows x t) orthonormal, r (t x r) upper triangular, t = min(rows, r).
inline std::pair<MatrixXd, MatrixXd> thin_qr(const MatrixXd& m) {
  const Eigen::HouseholderQR<MatrixXd> qr(m);
  const Eigen::Index t = std::min(m.rows(), m.cols());
  MatrixXd q = qr.householderQ() * MatrixXd::Identity(m.rows(), t);
  MatrixXd r = qr.matrixQR().topRows(t).triangularView<Eigen::Upper>();
  return {std::move(q), std::move(r)};
}

}  // namespace detail

// The SVD of B A in O((m + n) r^2 + r^3) (methods/ra-lora.md, "Efficient thin SVD"): B = Q_B R_B,
// A^T = Q_A R_A, svd(R_B R_A^T) = U' S V'^T, then U = Q_B U', V = Q_A V'.
inline UpdateSvd factored_svd(const MatrixXd& b, const MatrixXd& a) {
  QLORA_CHECK(b.cols() == a.rows(), "factored_svd: B is " + std::to_string(b.rows()) + " x " + std::to_string(b.cols()) +
                                        " but A is " + std::to_string(a.rows()) + " x " + std::to_string(a.cols()));
  const auto [qb, rb] = detail::thin_qr(b);
  const MatrixXd at = a.transpose();
  const auto [qa, ra] = detail::thin_qr(at);
  const Eigen::JacobiSVD<MatrixXd> core(rb * ra.transpose(), Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {qb * core.matrixU(), core.singularValues(), qa * core.matrixV()};
}

// phi(U1, U2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), in [0, 1] (Hu et al. 2021, Sec. 7.2); i and j
// are capped at the columns there are, and an empty side gives 0.
inline double subspace_similarity(const MatrixXd& u1, const MatrixXd& u2, std::int64_t i, std::int64_t j) {
  QLORA_CHECK(u1.rows() == u2.rows(), "subspace_similarity: bases of " + std::to_string(u1.rows()) + " and " +
                                          std::to_string(u2.rows()) + " rows");
  i = std::min<std::int64_t>(i, u1.cols());
  j = std::min<std::int64_t>(j, u2.cols());
  if (i <= 0 || j <= 0) return 0.0;
  return (u1.leftCols(i).transpose() * u2.leftCols(j)).squaredNorm() / double(std::min(i, j));
}

// (a) The smallest k whose top singular values hold `tau` of the energy sum S_i^2 (0 for a zero update).
inline std::int64_t energy_rank(const VectorXd& s, double tau) {
  const double total = s.squaredNorm();
  if (!(total > 0)) return 0;
  double kept = 0;
  for (Eigen::Index k = 0; k < s.size(); ++k) {
    kept += s[k] * s[k];
    if (kept >= tau * total) return k + 1;
  }
  return s.size();
}

// (b) The largest k whose top-k subspace has stopped rotating since the last analysis: phi(U_prev, U, k, k) >= rho
// (0 when none does, or without a previous analysis: U_prev all zeros or empty).
inline std::int64_t stable_rank(const MatrixXd& u_prev, const MatrixXd& u, double rho) {
  if (u_prev.size() == 0 || u_prev.rows() != u.rows()) return 0;
  std::int64_t best = 0;
  for (std::int64_t k = 1; k <= std::min<std::int64_t>(u_prev.cols(), u.cols()); ++k)
    if (subspace_similarity(u_prev, u, k, k) >= rho) best = k;
  return best;
}

// The constants of the per-layer rule (methods/ra-lora.md's suggested defaults).
struct RankRule {
  double energy = 0.90;        // tau
  double stability = 0.90;     // rho
  std::int64_t margin = 4;     // added to max(k_E, k_S): how far a layer may grow per analysis
  std::int64_t min_rank = 8;   // r_min
  std::int64_t max_rank = 128; // r_max
  std::int64_t multiple = 1;   // ranks rounded up to a multiple of this (8 or 16 for tensor cores)

  void validate() const {
    QLORA_CHECK(energy > 0 && energy <= 1, "rank-adaptive: energy threshold " + std::to_string(energy) + " is not in (0, 1]");
    QLORA_CHECK(stability > 0 && stability <= 1,
                "rank-adaptive: stability threshold " + std::to_string(stability) + " is not in (0, 1]");
    QLORA_CHECK(margin >= 0, "rank-adaptive: margin " + std::to_string(margin) + " is negative");
    QLORA_CHECK(multiple >= 1, "rank-adaptive: rank multiple " + std::to_string(multiple) + " is not >= 1");
    QLORA_CHECK(min_rank >= 1 && min_rank <= max_rank, "rank-adaptive: rank bounds [" + std::to_string(min_rank) + ", " +
                                                           std::to_string(max_rank) + "] are not 1 <= min <= max");
  }
};

// One layer's analysis: the update's spectrum and the rank the rule asks for.
struct LayerAnalysis {
  UpdateSvd svd;
  VectorXd energy;              // per direction, of the layer's real update dW: weight * S_i^2
  std::int64_t current = 0;     // the adapter's rank now
  std::int64_t energy_rank = 0, stable_rank = 0;
  std::int64_t desired = 0;     // clamp(round_up(max(k_E, k_S) + margin), r_min, min(r_max, cap))
  std::int64_t cap = 0;         // min(r_max, d_out/k, d_in/p): beyond, a rank adds parameters, not directions
  std::int64_t unit_cost = 0;   // parameters per unit of rank: d_in/p + d_out/k

  // Energy of directions [from, to) (directions the SVD does not have, beyond the current rank, hold none).
  double energy_between(std::int64_t from, std::int64_t to) const {
    double e = 0;
    for (std::int64_t i = std::max<std::int64_t>(from, 0); i < std::min<std::int64_t>(to, energy.size()); ++i) e += energy[i];
    return e;
  }
};

inline std::int64_t round_up(std::int64_t k, std::int64_t multiple) { return (k + multiple - 1) / multiple * multiple; }

// Analyses a LowRank adapter against the left singular vectors of its previous analysis (u_prev: empty or zeros
// for none). Energy is measured on dW = (s/p) E_k B A P_p, whose squared Frobenius norm is (s/p)^2 k p |B A|^2, so
// layers with different pooling compare fairly.
inline LayerAnalysis analyse_layer(const LowRank& layer, const MatrixXd& u_prev, const RankRule& rule) {
  const AdapterShape& shape = layer.shape();
  LayerAnalysis a;
  a.svd = factored_svd(init::to_matrix(layer.B.value, layer.B.name), init::to_matrix(layer.A.value, layer.A.name));
  const double s_over_p = double(shape.scale) / double(shape.pool);
  a.energy = a.svd.s.array().square() * (s_over_p * s_over_p * double(shape.pool * shape.repeat));
  a.current = shape.rank;
  a.energy_rank = energy_rank(a.svd.s, rule.energy);
  a.stable_rank = stable_rank(u_prev, a.svd.u, rule.stability);
  const std::int64_t out_k = layer.B.value.dim(0), in_p = layer.A.value.dim(1);
  a.unit_cost = out_k + in_p;
  a.cap = std::max<std::int64_t>(1, std::min({rule.max_rank, out_k, in_p}));
  const std::int64_t wanted = round_up(std::max(a.energy_rank, a.stable_rank) + rule.margin, rule.multiple);
  a.desired = std::clamp(wanted, std::min(rule.min_rank, a.cap), a.cap);
  return a;
}

// Ranks for every layer with sum_l k_l * unit_cost_l <= budget (methods/ra-lora.md, "optional global budget"):
// the desired ranks when they fit; otherwise all are scaled by budget / cost (rounded down to the multiple, not
// below r_min), then layers give up `multiple` ranks at a time where that drops the least energy until the
// budget holds, and the leftover goes back, `multiple` at a time, to the layers whose cut dropped the most
// energy (never beyond what they asked for). Ties go to the earlier layer. Throws when even r_min everywhere
// does not fit (callers check this up front).
inline std::vector<std::int64_t> allocate_ranks(const std::vector<LayerAnalysis>& layers, std::int64_t budget,
                                                const RankRule& rule) {
  const auto cost = [&](const std::vector<std::int64_t>& k) {
    std::int64_t c = 0;
    for (std::size_t l = 0; l < layers.size(); ++l) c += k[l] * layers[l].unit_cost;
    return c;
  };
  std::vector<std::int64_t> k(layers.size()), floor_of(layers.size());
  for (std::size_t l = 0; l < layers.size(); ++l) {
    k[l] = layers[l].desired;
    floor_of[l] = std::min(rule.min_rank, layers[l].cap);
  }
  if (cost(k) <= budget) return k;
  const double f = double(budget) / double(cost(k));
  for (std::size_t l = 0; l < layers.size(); ++l)
    k[l] = std::max(floor_of[l], std::int64_t(std::floor(double(k[l]) * f)) / rule.multiple * rule.multiple);
  while (cost(k) > budget) {  // r_min can keep the scaled ranks above the budget: cut where it costs least
    std::size_t best = layers.size();
    double best_loss = std::numeric_limits<double>::infinity();
    for (std::size_t l = 0; l < layers.size(); ++l) {
      if (k[l] - rule.multiple < floor_of[l]) continue;
      const double loss = layers[l].energy_between(k[l] - rule.multiple, k[l]);
      if (loss < best_loss) best = l, best_loss = loss;
    }
    QLORA_CHECK(best < layers.size(), "rank-adaptive: the budget of " + std::to_string(budget) +
                                          " parameters is below what the minimum ranks need (" + std::to_string(cost(k)) + ")");
    k[best] -= rule.multiple;
  }
  for (;;) {  // the leftover, to the layers with the largest energy still cut off
    std::size_t best = layers.size();
    double best_gain = -1;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      if (k[l] + rule.multiple > layers[l].desired || cost(k) + rule.multiple * layers[l].unit_cost > budget) continue;
      const double gain = layers[l].energy_between(k[l], k[l] + rule.multiple);
      if (gain > best_gain) best = l, best_gain = gain;
    }
    if (best == layers.size()) break;
    k[best] += rule.multiple;
  }
  return k;
}

// Singular values at or below this fraction of the largest are treated as zero (f32 factors).
inline constexpr double kNullDirection = 1e-7;

// Gives the adapter rank k from its analysis (methods/ra-lora.md, "re-factor"):
// * k == current rank: nothing changes (the factors, hence the optimizer's moments, stay as they are);
// * k < current: the top-k subspace, B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T; the update changes by exactly the
//   dropped energy, ||B A - B' A'||_F = sqrt(sum_{i>k} S_i^2) (Eckart-Young). Directions with a (numerically)
//   zero singular value get a zero column of B and a fresh random row of A, as growth does, so that the layer can
//   still learn there (B = A = 0 would have no gradient at all);
// * k > current: A keeps its rows and gains k - r rows ~ N(0, 1/k^2), B gains k - r zero columns: the output is
//   unchanged.
// New rows are Philox draws keyed by `seed` (the caller mixes in the step and the layer).
inline void set_rank(LowRank& layer, std::int64_t k, const UpdateSvd& svd, std::uint64_t seed) {
  const std::int64_t r = layer.shape().rank, out_k = layer.B.value.dim(0), in_p = layer.A.value.dim(1);
  QLORA_CHECK(k >= 1, layer.A.name + ": rank " + std::to_string(k) + " is not >= 1");
  if (k == r) return;
  const DType dtype = layer.A.value.dtype();
  const Device device = layer.A.value.device();
  // Rows of A ~ N(0, 1/k^2) for the directions [from, k).
  const auto fresh_rows = [&](std::int64_t from) {
    return ops::randn(Shape{k - from, in_p}, seed, Device::cpu(), 0.f, float(1.0 / double(k))).to(DType::f64);
  };
  MatrixXd a(k, in_p), b(out_k, k);
  if (k > r) {
    a.topRows(r) = init::to_matrix(layer.A.value, layer.A.name);
    b.leftCols(r) = init::to_matrix(layer.B.value, layer.B.name);
    a.bottomRows(k - r) = init::to_matrix(fresh_rows(r), layer.A.name);
    b.rightCols(k - r).setZero();
  } else {
    QLORA_CHECK(k <= svd.s.size(), layer.A.name + ": rank " + std::to_string(k) + " exceeds the " +
                                       std::to_string(svd.s.size()) + " directions of its analysis");
    const double largest = svd.s.size() > 0 ? svd.s[0] : 0.0;
    std::int64_t live = 0;
    while (live < k && svd.s[live] > kNullDirection * largest && svd.s[live] > 0) ++live;
    const VectorXd root = svd.s.head(live).cwiseSqrt();
    b.leftCols(live) = svd.u.leftCols(live) * root.asDiagonal();
    a.topRows(live) = root.asDiagonal() * svd.v.leftCols(live).transpose();
    if (live < k) {
      a.bottomRows(k - live) = init::to_matrix(fresh_rows(live), layer.A.name);
      b.rightCols(k - live).setZero();
    }
  }
  layer.set_factors(init::to_tensor(a).to(dtype).to(device), init::to_tensor(b).to(dtype).to(device));
}

// Zero factors of rank k: the layer shaped to receive saved values of that rank (a checkpoint, an adapter
// directory with a rank_pattern).
inline void reshape_for_loading(LowRank& layer, std::int64_t k) {
  QLORA_CHECK(k >= 1, layer.A.name + ": rank " + std::to_string(k) + " is not >= 1");
  if (k == layer.shape().rank) return;
  const Tensor& a = layer.A.value;
  const Tensor& b = layer.B.value;
  layer.set_factors(Tensor::zeros(Shape{k, a.dim(1)}, a.dtype(), a.device()),
                    Tensor::zeros(Shape{b.dim(0), k}, b.dtype(), b.device()));
}

}  // namespace qlora::nn::rank_adaptive
