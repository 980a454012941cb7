#pragma once
// AdapterFactors: an initial adapter computed by LoftQ or CLoQ (docs/adapter-init.md), as the tensors the
// adapter's parameters take, and how a pooled update D (see linalg.hpp: dW[o, i] = D[o/k, i/p]) becomes them.
//
// Low rank (LowRank{p, k, r'}): D = (s/p) B A. Given D = left diag(sigma) right (an SVD or CLoQ's factored
// form), the singular values are split evenly between the factors as in LoftQ's code (L = U sqrt(S),
// R = sqrt(S) V^T, yxli2123/LoftQ utils.py) and the scale is divided out of both (methods/cloq.md,
// "Factor into LoRA"; baselines.md section 4, framework note), so that the forward's s E_k B A P_p is the
// fitted update at step 0:
//   B = left diag(sqrt sigma) / sqrt(s/p),   A = diag(sqrt sigma) right / sqrt(s/p).
// Components with a numerically zero singular value (<= 1e-12 sigma_max), and those beyond min(d_out/k,
// d_in/p), carry nothing: their B column is 0 and write_adapter_params keeps the layer's default draw for the
// matching row of A, so that they can still train (a zero row of A next to a zero column of B never would).
// Single matrix (FullPooled, hira): D = (s/p) M, so M = D / (s/p).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/nn/init/linalg.hpp"
#include "qlora/nn/merge.hpp"
#include "qlora/nn/quant_linear.hpp"
#include "qlora/ops/matmul.hpp"

namespace qlora::nn::init {

namespace detail {

inline double pooled_scale(const AdapterShape& shape) {
  QLORA_CHECK(shape.scale > 0.f && std::isfinite(shape.scale),
              "adapter init: the adapter scale s = alpha / r must be positive and finite, got " +
                  std::to_string(shape.scale));
  return double(shape.scale) / double(shape.pool);
}

// Refuses an adapter that does not tile a d_out x d_in weight (or none at all).
inline void check_adapter_fits(const AdapterShape& shape, std::int64_t d_out, std::int64_t d_in, std::string_view who) {
  QLORA_CHECK(shape.kind != AdapterKind::none, std::string(who) + ": the layer has no adapter to initialise");
  QLORA_CHECK(shape.pool >= 1 && shape.repeat >= 1 && d_in % shape.pool == 0 && d_out % shape.repeat == 0,
              std::string(who) + ": the adapter (p = " + std::to_string(shape.pool) + ", k = " + std::to_string(shape.repeat) +
                  ") does not tile a " + std::to_string(d_out) + " x " + std::to_string(d_in) + " weight");
  QLORA_CHECK(shape.full_matrix() || shape.rank >= 1,
              std::string(who) + ": a low-rank adapter needs rank >= 1, got " + std::to_string(shape.rank));
}

}  // namespace detail

struct AdapterFactors {
  AdapterShape shape;
  Tensor A, B;  // low rank: f64 CPU, A (r' x d_in/p), B (d_out/k x r'); undefined for the single matrix
  Tensor M;     // single matrix: f64 CPU (d_out/k x d_in/p); undefined for low rank
  std::int64_t rank_used = 0;  // low rank: components [0, rank_used) carry the fit; the rest have B = 0

  // D = (s/p) B A or (s/p) M: the update on the pooled grid (f64 CPU), as LowRank/FullPooled::pooled_delta.
  Tensor pooled_delta() const {
    return scaled_copy(shape.full_matrix() ? M : ops::matmul(B, A), detail::pooled_scale(shape));
  }
  // dW = S_out D S_in^T (d_out x d_in), f64 CPU.
  Tensor delta_weight() const { return expand_delta(pooled_delta(), shape.repeat, shape.pool); }
};

// Low rank, from D = left diag(sigma) right: left (d_out/k x q), sigma (q, descending), right (q x d_in/p).
// Only the first r' components are kept: the caller passes the best ones first (a truncated SVD).
inline AdapterFactors factors_from_svd(const AdapterShape& shape, const MatrixXd& left, const VectorXd& sigma,
                                       const MatrixXd& right) {
  QLORA_CHECK(!shape.full_matrix() && shape.kind != AdapterKind::none && shape.rank >= 1,
              "adapter init: factors_from_svd needs a low-rank adapter, got " + std::string(adapter_kind_name(shape.kind)));
  const double root_scale = std::sqrt(detail::pooled_scale(shape));
  const std::int64_t out_k = left.rows(), in_p = right.cols();
  const double largest = sigma.size() > 0 ? sigma(0) : 0.0;
  std::int64_t used = 0;
  while (used < std::min<std::int64_t>(shape.rank, sigma.size()) && sigma(used) > 1e-12 * largest && sigma(used) > 0)
    ++used;
  MatrixXd a = MatrixXd::Zero(shape.rank, in_p), b = MatrixXd::Zero(out_k, shape.rank);
  for (std::int64_t j = 0; j < used; ++j) {
    const double root = std::sqrt(sigma(j));
    b.col(j) = left.col(j) * (root / root_scale);
    a.row(j) = right.row(j) * (root / root_scale);
  }
  AdapterFactors f;
  f.shape = shape;
  f.A = to_tensor(a);
  f.B = to_tensor(b);
  f.rank_used = used;
  return f;
}

// Low rank: the best rank-r' approximation of D in Frobenius norm (Eckart-Young: its truncated SVD).
inline AdapterFactors best_low_rank_factors(const AdapterShape& shape, const MatrixXd& d) {
  const TruncatedSvd t = truncated_svd(d, shape.rank);
  return factors_from_svd(shape, t.u, t.s, t.v.transpose());
}

// Single matrix: M = D / (s/p).
inline AdapterFactors factors_from_pooled_matrix(const AdapterShape& shape, const MatrixXd& d) {
  QLORA_CHECK(shape.full_matrix(), "adapter init: factors_from_pooled_matrix needs the single-matrix adapter (hira), got " +
                                       std::string(adapter_kind_name(shape.kind)));
  AdapterFactors f;
  f.shape = shape;
  f.M = to_tensor(d / detail::pooled_scale(shape));
  return f;
}

// Writes the factors into a layer's adapter parameters (LowRank: params()[0] = A, params()[1] = B; FullPooled:
// params()[0] = M), converted to the parameters' dtype and device. Rows of A past rank_used keep their value.
inline void write_adapter_params(Linear& layer, const AdapterFactors& f) {
  const AdapterShape a = layer.adapter_shape();
  const std::string who = "adapter init of " + layer.name();
  QLORA_CHECK(a.kind != AdapterKind::none, who + ": the layer has no adapter");
  QLORA_CHECK(a.kind == f.shape.kind && a.pool == f.shape.pool && a.repeat == f.shape.repeat && a.rank == f.shape.rank &&
                  a.scale == f.shape.scale,
              who + ": the computed adapter (" + std::string(adapter_kind_name(f.shape.kind)) + ") does not match the layer's (" +
                  std::string(adapter_kind_name(a.kind)) + ")");
  const std::vector<autograd::Param*> params = layer.params();
  const auto write = [&](autograd::Param& p, const Tensor& value) {
    QLORA_CHECK(p.value.shape() == value.shape(),
                who + ": " + p.name + " has shape " + p.value.shape().str() + ", the init " + value.shape().str());
    p.value.copy_from(value.to(p.value.dtype()).to(p.value.device()));
  };
  if (a.full_matrix()) {
    QLORA_CHECK(params.size() == 1 && f.M.defined(), who + ": expected the single matrix M");
    write(*params[0], f.M);
    return;
  }
  QLORA_CHECK(params.size() == 2 && f.A.defined() && f.B.defined(), who + ": expected the factors A and B");
  Tensor a_value = params[0]->value.to(Device::cpu()).to(DType::f64).clone();
  if (a_value.shape() == f.A.shape()) {
    const std::int64_t row = f.A.dim(1);
    std::copy(f.A.data<double>(), f.A.data<double>() + f.rank_used * row, a_value.data<double>());
  }
  write(*params[0], a_value);
  write(*params[1], f.B);
}

}  // namespace qlora::nn::init
